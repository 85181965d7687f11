"""Routing baselines and OOD metrics on non-finite scores (a diverged model, NaN latents):
they read NaN as the router does (never the route, the most out-of-domain) and never crash."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cir.router.baselines import (
    DomainModels,
    KnnRouter,
    LikelihoodRouter,
    LossRouter,
    MahalanobisRouter,
    bench_routing,
    ood_metrics,
    recon_losses,
)
from cir.router.routing import route_chunks


class _Scorer:
    def __init__(self, loss: list[float]) -> None:
        self.loss = torch.tensor(loss)

    def score(self, ids, mask, batch_size=None):
        return SimpleNamespace(loss=self.loss, tra=torch.zeros_like(self.loss))


def test_reconstruction_baseline_routes_like_the_router_when_an_expert_diverged():
    ids, mask = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool)
    comps = [_Scorer([float("nan")] * 3), _Scorer([2.0, 1.0, 3.0])]
    experts = [SimpleNamespace(name=str(i), threshold=None, compressor=c)
               for i, c in enumerate(comps)]
    want = route_chunks(experts, ids, mask).route.tolist()
    loss = recon_losses(comps, ids, mask)
    assert LossRouter().scores(loss).argmax(1).tolist() == want == [1, 1, 1]
    np.testing.assert_allclose(LossRouter().ood_score(loss), [2.0, 1.0, 3.0])


def test_likelihood_baseline_skips_a_nan_expert_and_keeps_a_posterior():
    nll = np.array([[np.nan, 10.0], [np.nan, np.nan]])
    n = np.full((2, 2), 5.0)
    r = LikelihoodRouter()
    scores = r.scores((nll, n))
    assert scores[0].argmax() == 1
    np.testing.assert_allclose(np.exp(scores).sum(1), 1.0)  # no NaN row
    assert r.ood_score((nll, n))[0] == pytest.approx(2.0) and r.ood_score((nll, n))[1] == np.inf


def test_ood_metrics_rank_nan_and_inf_as_most_out_of_domain():
    ind = np.array([0.1, 0.2, 0.3, 0.4])
    got = ood_metrics(ind, np.array([np.inf, np.nan, 0.5]))
    assert got == {"auroc": 1.0, "fpr95": 0.0}
    assert ood_metrics(np.array([0.1, np.inf]), np.array([0.05, 0.2]))["auroc"] == 0.25


def test_latent_routers_on_a_nan_latent():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), np.repeat([0, 1], 20)
    q = x[:3].copy()
    q[0, 1] = np.nan
    knn = KnnRouter(k=3).fit(x, y)
    assert knn.scores(q)[0].tolist() == [0.0, 0.0]  # no vote from faiss's id -1
    assert knn.ood_score(q)[0] == np.inf
    maha = MahalanobisRouter().fit(x, y)
    for r in (knn, maha):
        m = ood_metrics(r.ood_score(x[20:]), r.ood_score(q))
        assert 0.0 <= m["auroc"] <= 1.0


def test_bench_routing_refuses_a_domain_without_test_chunks():
    domains = {"a": DomainModels(None, None, [0] * 5, [0] * 5),
               "b": DomainModels(None, None, [0] * 5, [])}
    with pytest.raises(ValueError, match="no test chunks in domain.s. b"):
        bench_routing(domains)


def test_explain_never_routes_to_a_nan_loss():
    from cir.router.latent_index import LatentIndex, explain_chunks

    class Model(torch.nn.Module):
        def __init__(self, loss: float) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.loss = loss

        def score(self, ids, mask):
            n = len(ids)
            return SimpleNamespace(loss=torch.full((n,), self.loss), tra=torch.zeros(n))

        def encode(self, ids, mask):
            return torch.zeros(len(ids), 1, 2)

    index = LatentIndex(dim=2, pooling="mean")
    index.add(np.zeros((1, 2)), [{"chunk": 0}])
    ids, mask = torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    rows = explain_chunks(ids, mask, {"diverged": (Model(float("nan")), index),
                                      "ok": (Model(1.0), index)}, k=1)
    assert rows[0]["route"] == "ok"
