"""BatchedMuon against torch.optim.Muon: the same steps, one Newton-Schulz per stack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cir.optim import BatchedMuon, orthogonalise

# the reference implementation; the project itself declares torch >= 2.3
needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                      reason="torch.optim.Muon needs torch >= 2.9")


def _layers(seed: int) -> nn.ModuleList:
    torch.manual_seed(seed)  # same-shape matrices (stacked), a wide and a tall one
    return nn.ModuleList([nn.Linear(24, 24, bias=False), nn.Linear(24, 24, bias=False),
                          nn.Linear(24, 48, bias=False), nn.Linear(48, 24, bias=False),
                          nn.Linear(24, 48, bias=False)])


def _loss(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(layers[0](x))
    h = torch.tanh(layers[1](h))
    h = layers[3](torch.tanh(layers[2](h))) + layers[3](torch.tanh(layers[4](h)))
    return (h - x.flip(-1)).pow(2).mean()


@needs_torch_muon
def test_orthogonalise_is_torch_muons_iteration_matrix_by_matrix():
    torch.manual_seed(0)
    g = torch.randn(3, 40, 16)
    ref = torch.stack([torch.optim._muon._zeropower_via_newtonschulz(
        m, (3.4445, -4.7750, 2.0315), 5, 1e-7) for m in g])
    got = orthogonalise(g)
    assert got.shape == g.shape
    assert (got.float() - ref.float()).abs().max() < 0.02  # bf16 rounding of two kernels
    s = torch.linalg.svdvals(got.float())
    assert s.min() > 0.5 and s.max() < 1.3  # near-orthogonal: the quintic's band


@needs_torch_muon
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_muon_matches_torch_muon_over_steps(weight_decay):
    ours, ref = _layers(0), _layers(0)
    opt = BatchedMuon(ours.parameters(), lr=0.02, weight_decay=weight_decay)
    ref_opt = torch.optim.Muon(ref.parameters(), lr=0.02, weight_decay=weight_decay,
                               adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours.parameters()]
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randn(64, 24)
        for layers, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(layers, x).backward()
            o.step()
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), start, strict=True):
        moved = (q - p0).norm()
        assert moved > 0.05 * p0.norm()  # the steps did something
        assert (p - q).norm() < 1e-3 * moved  # and the same thing
    a = opt.state_dict()["state"][0]["momentum_buffer"]
    b = ref_opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.allclose(a, b, rtol=0.05, atol=1e-4)


def test_batched_muon_refuses_vectors():
    with pytest.raises(ValueError, match="2-D weights only"):
        BatchedMuon([nn.Parameter(torch.zeros(4))])
