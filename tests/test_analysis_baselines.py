"""Routing baselines on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cir.router.baselines import (
    Chunks,
    FeatureSet,
    GateRouter,
    KnnRouter,
    LikelihoodRouter,
    LossRouter,
    MahalanobisRouter,
    TfidfKMeansRouter,
    accuracy_by_domain,
    domain_posterior,
    evaluate_method,
    ids_to_docs,
    mean_embeddings,
    mount_experiment,
    routing_accuracy,
)


def gaussians(n: int = 80, k: int = 3, dim: int = 6, gap: float = 6.0, seed: int = 0):
    centres = np.random.default_rng(123).normal(size=(k, dim)) * gap  # same for every seed
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n)
    return centres[y] + rng.normal(size=(n * k, dim)), y


def token_docs(n: int = 40, k: int = 3, vocab: int = 30, seed: int = 0):
    """Domain c draws tokens from its own disjoint slice of the vocabulary."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n)
    ids = np.stack([rng.integers(2 + 10 * c, 12 + 10 * c, size=16) for c in y])
    return ids, np.ones_like(ids, dtype=bool), y


@pytest.mark.parametrize("router", [MahalanobisRouter(), KnnRouter(k=5), GateRouter()])
def test_latent_routers_on_separated_gaussians(router):
    x, y = gaussians()
    xt, yt = gaussians(seed=1)
    router.fit(x, y)
    assert routing_accuracy(router.scores(xt), yt) > 0.97
    far = xt + 100.0
    if isinstance(router, GateRouter):
        # max-softmax is confident far from the data: the gate's known OOD blind spot
        assert router.ood_score(far).mean() < 0.5
    else:
        assert router.ood_score(far).min() > np.median(router.ood_score(xt))


def test_mahalanobis_distance_matches_numpy():
    x, y = gaussians(k=2, dim=3)
    r = MahalanobisRouter().fit(x, y)
    q = x[:5]
    for c in range(2):
        d = q - x[y == c].mean(0)
        want = np.einsum("nf,fg,ng->n", d, r.precision, d)
        np.testing.assert_allclose(r.distances(q)[:, c], want, rtol=1e-10)


def test_tfidf_routers_on_disjoint_vocabularies():
    ids, mask, y = token_docs()
    docs = ids_to_docs(ids, mask)
    tids, tmask, ty = token_docs(seed=1)
    tdocs = ids_to_docs(tids, tmask)
    for router in (GateRouter(tfidf=True), TfidfKMeansRouter(n_clusters=6)):
        router.fit(docs, y)
        assert routing_accuracy(router.scores(tdocs), ty) == 1.0


def test_ids_to_docs_drops_padding():
    ids = np.array([[5, 6, 0], [7, 0, 0]])
    assert ids_to_docs(ids, ids > 0) == ["5 6", "7"]


def test_mean_embeddings_ignore_padding():
    emb = torch.arange(12, dtype=torch.float32).view(6, 2)
    ids = torch.tensor([[2, 4, 0]])
    mask = torch.tensor([[True, True, False]])
    np.testing.assert_allclose(mean_embeddings(emb, ids, mask), [[6.0, 7.0]])
    g = torch.Generator().manual_seed(0)  # more chunks than one batch of 1024
    ids = torch.randint(0, 6, (2500, 5), generator=g)
    mask = torch.rand(2500, 5, generator=g) > 0.3
    want = [(emb[i][m].mean(0) if m.any() else torch.zeros(2)).numpy()
            for i, m in zip(ids, mask, strict=True)]
    np.testing.assert_allclose(mean_embeddings(emb, ids, mask), want, rtol=1e-6)
    assert mean_embeddings(emb, ids[:0], mask[:0]).shape == (0, 2)


def test_likelihood_posterior_is_bayes_rule():
    nll = np.array([[10.0, 12.0, 15.0], [30.0, 29.0, 40.0]])
    post = domain_posterior(nll)
    want = np.exp(-nll) / np.exp(-nll).sum(1, keepdims=True)
    np.testing.assert_allclose(post, want)
    prior = np.array([0.5, 0.25, 0.25])
    want = np.exp(-nll) * prior
    np.testing.assert_allclose(domain_posterior(nll, prior=prior),
                               want / want.sum(1, keepdims=True))
    r = LikelihoodRouter()
    assert r.scores((nll, np.ones_like(nll))).argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(r.ood_score((nll, np.full_like(nll, 2.0))), [5.0, 14.5])


def test_loss_router_routes_to_lowest_loss():
    loss = np.array([[1.0, 3.0], [4.0, 2.0]])
    assert LossRouter().scores(loss).argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(LossRouter().ood_score(loss), [1.0, 2.0])


def _featureset(seed: int) -> FeatureSet:
    x, y = gaussians(n=40, seed=seed)
    recon = np.where(np.eye(3, dtype=bool)[y], 1.0, 3.0) + np.random.default_rng(seed).normal(
        scale=0.1, size=(len(y), 3))
    ids = torch.zeros(len(y), 4, dtype=torch.long)
    fs = FeatureSet(Chunks(ids, ids > 0, y))
    fs.feats = {"recon": recon, "latent": x}
    fs.seconds = {"recon": 0.01, "latent": 0.01}
    return fs


def test_evaluate_method_and_mount_experiment():
    train, test = _featureset(0), _featureset(1)
    ood = _featureset(2)
    ood.feats = {"recon": ood.feats["recon"] + 5.0, "latent": ood.feats["latent"] + 100.0}
    for method in ("reconstruction", "mahalanobis", "knn-latent"):
        row = evaluate_method(method, train, test, {"far": ood}, k_nn=5)
        assert row["accuracy"] > 0.97
        assert row["ood"]["far"]["auroc"] > 0.99 and row["ood"]["far"]["fpr95"] == 0.0
        mount = mount_experiment(method, train, test, k_nn=5)
        assert mount["accuracy_before"] > 0.97 and mount["accuracy_after"] > 0.97
    assert mount_experiment("reconstruction", train, test)["update_s"] == 0.0


def test_accuracy_by_domain_counts_each_domains_rows():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0],
                       [0.1, 0.9, 0.0], [0.3, 0.7, 0.0]])
    labels = np.array([0, 0, 0, 1, 1])  # domain 0: 2 of 3 home; domain 1: 2 of 2; 2: none
    assert accuracy_by_domain(scores, labels) == [pytest.approx(2 / 3), 1.0, None]
    assert routing_accuracy(scores, labels) == pytest.approx(4 / 5)


def test_unigram_mix_routes_by_each_domains_own_unigrams():
    """Three domains of disjoint 40-token vocabularies: every chunk goes home, an unseen
    vocabulary scores as OOD, and a domain's scores do not change when another is mounted
    (each domain's unigrams are fitted on its own chunks alone)."""
    import scipy.sparse as sp
    from cir.compressor.evaluate import token_bags
    from cir.router.baselines import UnigramMixtureRouter

    rng = np.random.default_rng(0)

    def chunks(domain: int, n: int):
        ids = torch.as_tensor(2 + 40 * domain + rng.integers(0, 40, size=(n, 24)))
        mask = torch.ones_like(ids)
        mask[::5, 16:] = 0  # padding is not counted
        return ids, mask

    parts = [chunks(d, 30) for d in range(3)]
    bags = token_bags(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), 200)
    assert sp.issparse(bags) and bags.shape == (90, 200)
    assert bags[0].sum() == 16 and bags[1].sum() == 24
    y = np.repeat(np.arange(3), 30)
    held = [chunks(d, 10) for d in range(3)]
    test = token_bags(torch.cat([p[0] for p in held]), torch.cat([p[1] for p in held]), 200)
    router = UnigramMixtureRouter(n_components=2).fit(bags, y)
    assert routing_accuracy(router.scores(test), np.repeat(np.arange(3), 10)) == 1.0
    alien = token_bags(*chunks(3, 10), 200)  # tokens 122..161, never trained on
    assert router.ood_score(alien).min() > router.ood_score(test).max()
    two = UnigramMixtureRouter(n_components=2).fit(bags[:60], y[:60])
    np.testing.assert_array_equal(two.scores(test), router.scores(test)[:, :2])


def test_bench_runs_unigram_mix_beside_the_others(monkeypatch):
    from cir.compressor.evaluate import UnigramMixture

    train = _bag_features(0)
    test = _bag_features(1)
    row = evaluate_method("unigram-mix", train, test, {"alien": _bag_features(2, alien=True)})
    assert row["accuracy"] == 1.0 and row["ood"]["alien"]["auroc"] == 1.0
    fitted = []  # the rows of every domain's fit, in order
    real = UnigramMixture.fit_bags.__func__
    monkeypatch.setattr(UnigramMixture, "fit_bags", classmethod(
        lambda cls, bags, *a, **k: fitted.append(bags.shape[0]) or real(cls, bags, *a, **k)))
    mount = mount_experiment("unigram-mix", train, test)
    assert mount["accuracy_after"] == 1.0 and mount["update"].startswith("nothing retrained")
    # before (2 domains), after (3), the old domains' scores (3), then the update: the
    # new domain's 12 chunks alone
    assert fitted == [12] * 9 and mount["update_s"] > 0.0


def _bag_features(seed: int, alien: bool = False) -> FeatureSet:
    from cir.compressor.evaluate import token_bags

    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 12)
    base = np.full(36, 3) if alien else y
    ids = torch.as_tensor(2 + 30 * base[:, None] + rng.integers(0, 30, (36, 20)))
    mask = torch.ones_like(ids)
    fs = FeatureSet(Chunks(ids, mask, y))
    fs.feats["bags"] = token_bags(ids, mask, 128)
    return fs


def test_baselines_see_at_least_a_small_compressors_training_data_by_default():
    import inspect

    from cir.compressor.train import default_train_config
    from cir.router.baselines import MAX_TRAIN_CHUNKS, bench_routing

    small = default_train_config("small")
    assert inspect.signature(bench_routing).parameters["max_train"].default == MAX_TRAIN_CHUNKS
    assert MAX_TRAIN_CHUNKS >= small.steps * small.batch_size
