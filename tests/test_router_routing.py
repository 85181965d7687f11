"""Routing on synthetic experts with known losses (nothing trained)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from cir.router.routing import RouteResult, calibrate, ood_auroc, route_chunks, routing_accuracy


@dataclass
class _Scores:
    loss: torch.Tensor
    tra: torch.Tensor


class FixedScorer:
    """Returns preset per-chunk losses and TRAs (looked up by the chunk's first token)."""

    def __init__(self, loss: list[float], tra: list[float]) -> None:
        self.loss, self.tra = torch.tensor(loss), torch.tensor(tra)
        self.calls: list[int] = []

    def score(self, ids, mask, batch_size=None):
        self.calls.append(ids.shape[0])
        idx = ids[:, 0]
        return _Scores(self.loss[idx], self.tra[idx])


@dataclass
class FakeExpert:
    name: str
    compressor: FixedScorer
    threshold: float | None = None


def _chunks(n: int, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(n)[:, None].repeat(1, t)  # chunk i starts with token i
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[-1, 2:] = False  # a padded tail chunk
    return ids, mask


def _experts(thr: float | None = 0.5) -> list[FakeExpert]:
    # chunks 0-2 are "code", 3-4 "prose", 5 is garbage (both bad)
    code = FixedScorer([0.1, 0.2, 0.1, 3.0, 2.5, 6.0], [0.99, 0.98, 0.99, 0.2, 0.3, 0.01])
    prose = FixedScorer([2.0, 2.2, 1.9, 0.3, 0.4, 5.0], [0.3, 0.2, 0.4, 0.95, 0.9, 0.02])
    return [FakeExpert("code", code, thr), FakeExpert("prose", prose, thr)]


def test_routes_to_lowest_loss_and_flags_unknown():
    ids, mask = _chunks(6)
    res = route_chunks(_experts(), ids, mask, temperature=1.0)
    assert res.labels() == ["code", "code", "code", "prose", "prose", "unknown"]
    assert res.loss.shape == (6, 2) and res.tra.shape == (6, 2)
    assert res.n_tokens.tolist() == [4, 4, 4, 4, 4, 2]


def test_loss_ceiling_flags_unknown():
    ids, mask = _chunks(6)
    experts = _experts(thr=None)
    for e in experts:
        e.loss_threshold = 2.1
    res = route_chunks(experts, ids, mask)
    # chunk 5: best loss 5.0 > 2.1; chunk 4: 0.4 fine
    assert res.labels() == ["code", "code", "code", "prose", "prose", "unknown"]
    experts[1].loss_threshold = 0.35
    assert route_chunks(experts, ids, mask).labels()[3:] == ["prose", "unknown", "unknown"]


def test_without_threshold_nothing_is_unknown():
    ids, mask = _chunks(6)
    res = route_chunks(_experts(thr=None), ids, mask)
    assert res.labels()[-1] == "prose"  # 5.0 < 6.0
    assert not res.unknown.any()


def test_soft_weights_are_softmax_and_sum_to_one():
    ids, mask = _chunks(6)
    for temp in (0.1, 1.0, 7.0):
        res = route_chunks(_experts(), ids, mask, temperature=temp)
        torch.testing.assert_close(res.weights.sum(-1), torch.ones(6))
        ref = torch.softmax(-res.loss / temp, dim=-1)
        torch.testing.assert_close(res.weights, ref)
    cold = route_chunks(_experts(), ids, mask, temperature=0.01)
    assert torch.equal(cold.weights.argmax(-1), cold.route)


def test_segments_and_file_decision():
    ids, mask = _chunks(6)
    res = route_chunks(_experts(), ids, mask)
    segs = [(s.label, s.start, s.end, s.n_tokens) for s in res.segments()]
    assert segs == [("code", 0, 3, 12), ("prose", 3, 5, 8), ("unknown", 5, 6, 2)]
    d = res.decision()
    assert d["majority"] == "code"
    assert d["unknown_fraction"] == pytest.approx(2 / 22)
    assert sum(d["shares"].values()) == pytest.approx(1.0)
    means = res.expert_means()
    w = res.n_tokens.double()
    ref = {n: float((res.loss[:, i].double() * w).sum() / w.sum()) for i, n in enumerate(res.names)}
    assert means["code"]["loss"] == pytest.approx(ref["code"])
    assert d["loss_weighted"] == min(ref, key=ref.get)


def test_cat_equals_one_pass_and_batches_are_passed():
    ids, mask = _chunks(6)
    whole = route_chunks(_experts(), ids, mask)
    parts = [route_chunks(_experts(), ids[s : s + 2], mask[s : s + 2]) for s in (0, 2, 4)]
    joined = RouteResult.cat(parts)
    assert joined.labels() == whole.labels()
    torch.testing.assert_close(joined.weights, whole.weights)


def test_errors():
    ids, mask = _chunks(2)
    with pytest.raises(ValueError, match="no experts"):
        route_chunks([], ids, mask)
    with pytest.raises(ValueError, match="temperature"):
        route_chunks(_experts(), ids, mask, temperature=0)


def test_calibrate_threshold_is_quantile_minus_margin():
    tra = torch.linspace(0.5, 1.0, 101)
    scorer = FixedScorer((1 - tra).tolist(), tra.tolist())
    ids = torch.arange(101)[:, None].repeat(1, 3)
    mask = torch.ones_like(ids, dtype=torch.bool)
    cal = calibrate(scorer, ids, mask, quantile=0.1, margin=0.05)
    assert cal["threshold"] == pytest.approx(float(torch.quantile(tra.double(), 0.1)) - 0.05)
    loss = (1 - tra).double()
    assert cal["loss_threshold"] == pytest.approx(float(torch.quantile(loss, 0.9)) + 0.1)
    assert cal["n_chunks"] == 101
    assert cal["tra_quantiles"]["0.5"] == pytest.approx(0.75)
    # with the threshold, 10% of in-domain chunks (minus the margin) are flagged: none here
    exp = FakeExpert("d", scorer, cal["threshold"])
    exp.loss_threshold = cal["loss_threshold"]
    assert not route_chunks([exp], ids, mask).unknown.any()
    with pytest.raises(ValueError):
        calibrate(scorer, ids[:0], mask[:0])


def test_accuracy_and_auroc():
    ids, mask = _chunks(6)
    res = route_chunks(_experts(), ids, mask)
    code = RouteResult(res.names, res.loss[:3], res.tra[:3], res.n_tokens[:3], res.thresholds)
    ood = RouteResult(res.names, res.loss[5:], res.tra[5:], res.n_tokens[5:], res.thresholds)
    assert routing_accuracy(code, "code") == 1.0
    assert routing_accuracy(res, "code") == pytest.approx(0.5)
    assert ood_auroc(code, ood) == 1.0
