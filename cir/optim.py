"""Muon for the Linear weights, AdamW for the rest (``TrainConfig.optimizer = "muon"``).

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") steps a
weight matrix along the orthogonalised Nesterov momentum of its gradient, computed with a
quintic Newton-Schulz iteration in bf16, and scales the step so that its RMS matches
AdamW's (0.2 sqrt(max(A, B)) times the learning rate): the learning rate and decoupled
weight decay tuned for AdamW carry over.

``BatchedMuon`` computes the update ``torch.optim.Muon`` computes with
``adjust_lr_fn="match_rms_adamw"`` (tests/test_optim.py compares them on the CPU), but runs the iteration once for all matrices of a
shape (stacked, with batched matmuls) instead of once per matrix: the 88 weight matrices
of the ``paper`` compressor make 4 stacks, so a step launches a few dozen kernels instead
of a few thousand, which is what bounds ``torch.optim.Muon`` on a GPU (the first Muon run
of docs/results/gpu-tra.md trained at 305K tokens/s against AdamW's 457K).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from cir.checkpoint import CheckpointError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic


def orthogonalise(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Newton-Schulz approximation of ``U V^T`` for each matrix of ``g`` (``[..., A, B]``),
    in bf16, as ``torch.optim.Muon`` computes it for one matrix."""
    a, b, c = NS_COEFFICIENTS
    shape = g.shape
    x = g.bfloat16().reshape(-1, *shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(shape)


class BatchedMuon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and AdamW-matched step size, one Newton-Schulz
    iteration per stack of same-shape matrices. Takes 2-D parameters only."""

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, ns_steps: int = 5, eps: float = 1e-7) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            stacks: dict[tuple[torch.Size, torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    stacks[(p.shape, p.dtype, p.device)].append(p)
            for (shape, _, _), params in stacks.items():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - mom)
                nesterov = torch.stack(grads).lerp_(torch.stack(bufs), mom)
                update = orthogonalise(nesterov, group["ns_steps"], group["eps"])
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                scale = 0.2 * math.sqrt(max(shape))
                torch._foreach_add_(params, list(update.to(params[0].dtype).unbind(0)),
                                    alpha=-lr * scale)


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon trains: 2-D weights of ``nn.Linear`` layers, unless tied to an
    embedding (a tied LM head is an embedding table, not a linear map of hidden states)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out, seen = [], set()
    for m in model.modules():
        w = m.weight if isinstance(m, nn.Linear) else None
        if w is not None and w.requires_grad and w.dim() == 2 and id(w) not in tables | seen:
            seen.add(id(w))
            out.append(w)
    return out


class MuonAdamW:
    """Muon on ``muon`` parameters, AdamW on the rest, stepped as one optimizer: one
    learning rate (``param_groups`` lists both optimizers' groups), one state dict."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise CheckpointError("the saved optimizer state is not Muon + AdamW")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
