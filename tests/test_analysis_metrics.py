"""Latent-space metrics, projections, plots, the faiss index and OOD metrics on synthetic data
with known answers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from cir.router.analysis import (
    latent_plots,
    latent_summary,
    linear_separability,
    pca_components_for,
    pool_latents,
    project,
    silhouette,
)
from cir.router.baselines import ood_metrics
from cir.router.latent_index import LatentIndex


def blobs(gap: float, n: int = 60, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim))
    b = rng.normal(size=(n, dim))
    b[:, 0] += gap
    return np.concatenate([a, b]), np.array(["a"] * n + ["b"] * n)


def test_separability_of_separated_and_overlapping_blobs():
    x, y = blobs(gap=20.0)
    assert linear_separability(x, y) == pytest.approx(1.0)
    assert silhouette(x, y) > 0.7
    x, y = blobs(gap=0.0, n=200)
    assert abs(linear_separability(x, y) - 0.5) < 0.1
    assert abs(silhouette(x, y)) < 0.05


def test_silhouette_matches_a_direct_computation():
    x, y = blobs(gap=3.0, n=10, dim=3)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    s = []
    for i in range(len(x)):
        same = (y == y[i]) & (np.arange(len(x)) != i)
        a = d[i, same].mean()
        b = d[i, y != y[i]].mean()
        s.append((b - a) / max(a, b))
    assert silhouette(x, y) == pytest.approx(np.mean(s), rel=1e-6)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_pca_components_of_known_rank(rank):
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(200, rank)) @ rng.normal(size=(rank, 20))  # rank exactly `rank`
    assert pca_components_for(x, 0.95) <= rank
    assert pca_components_for(x, 1.0) == rank
    # equal variance on `rank` orthogonal axes: 95% needs all of them
    q = np.linalg.qr(rng.normal(size=(20, rank)))[0]
    iso = np.sign(rng.normal(size=(400, rank))) @ q.T
    assert pca_components_for(iso, 0.95) == rank


def test_pool_latents_shapes_and_values():
    z = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    assert pool_latents(z, "flat").shape == (2, 12)
    np.testing.assert_allclose(pool_latents(z, "flat")[1], z[1].reshape(-1).numpy())
    np.testing.assert_allclose(pool_latents(z, "mean"), z.mean(1).numpy())
    with pytest.raises(ValueError, match="valid: flat, mean"):
        pool_latents(z, "max")


def test_projection_is_deterministic_and_pca_separates_blobs():
    x, y = blobs(gap=20.0, n=30)
    a, b = project(x, "tsne", seed=3), project(x, "tsne", seed=3)
    np.testing.assert_allclose(a, b)
    p = project(x, "pca")
    assert p.shape == (60, 2)
    assert linear_separability(p, y) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="valid: pca, tsne, umap"):
        project(x, "lda")


def test_latent_plots_write_png_csv_and_summary(tmp_path):
    x, y = blobs(gap=10.0, n=25)
    report = latent_plots(x, y, tmp_path, methods=("pca", "tsne"), pooling="mean", title="t")
    for m in ("pca", "tsne"):
        png = report.plots[m]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        lines = report.coords[m].read_text().splitlines()
        assert lines[0] == "index,domain,x,y" and len(lines) == 51
    summary = json.loads((tmp_path / "summary_mean.json").read_text())
    assert summary["summary"] == latent_summary(x, y)
    assert summary["summary"]["domains"] == {"a": 25, "b": 25}


def test_faiss_index_matches_brute_force_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    query = rng.normal(size=(20, 16)).astype(np.float32)
    index = LatentIndex(dim=16, pooling="mean")
    index.add(base, [{"chunk": i, "text": f"t{i}"} for i in range(300)])
    dist, ids = index.search(query, 5)
    brute = np.linalg.norm(query[:, None] - base[None], axis=-1)  # [Q, N]
    want = np.argsort(brute, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, want, 1), rtol=1e-4)
    loaded = LatentIndex.load(index.save(tmp_path / "idx"))
    assert loaded.pooling == "mean" and len(loaded) == 300
    nb = loaded.neighbours(query[:1], 2)[0]
    assert [n["chunk"] for n in nb] == want[0, :2].tolist()
    assert nb[0]["text"] == f"t{want[0, 0]}"
    with pytest.raises(ValueError, match="metadata"):
        index.add(base[:2], [{}])


def test_ood_metrics_against_sklearn_and_a_hand_computation():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=200), rng.normal(loc=1.0, size=150)
    got = ood_metrics(a, b)
    labels = np.r_[np.zeros(200), np.ones(150)]
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[a, b]))
    # hand computation: in-domain scores 1..20, threshold accepts 19 of 20 (95%) -> t = 19
    ind = np.arange(1, 21, dtype=float)
    ood = np.array([0.5, 10, 19, 19.5, 25, 30, 40, 50])
    r = ood_metrics(ind, ood)
    assert r["fpr95"] == pytest.approx(3 / 8)
    wins = sum((o > i) + 0.5 * (o == i) for o in ood for i in ind)
    assert r["auroc"] == pytest.approx(wins / (20 * 8))


def test_summary_without_random_and_per_domain_pca():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6)) @ np.diag([1, 1, 0, 0, 0, 0])  # rank 2
    b = rng.normal(size=(40, 6)) @ np.diag([0, 0, 1, 1, 1, 0]) + 5.0  # rank 3
    r = rng.normal(size=(40, 6)) * 100.0  # huge variance: dominates the pooled PCA
    x = np.concatenate([a, b, r])
    y = np.array(["a"] * 40 + ["b"] * 40 + ["random"] * 40)
    s = latent_summary(x, y)
    assert s["pca_components_95_by_domain"] == {"a": 2, "b": 3, "random": 6}
    assert s["without_random"]["domains"] == {"a": 40, "b": 40}
    assert s["without_random"]["linear_separability"] == pytest.approx(1.0)
    assert "without_random" not in latent_summary(x[:80], y[:80])


def test_dataset_label_is_short():
    from cir.router.analysis import dataset_label

    assert dataset_label("/x/corpora/python-code-4b1626de4724") == "python-code"
    assert dataset_label("/x/datasets/pycode") == "pycode" and dataset_label("random") == "random"


@pytest.mark.slow
def test_umap_projection_is_deterministic_and_separates_blobs():
    x, y = blobs(gap=20.0, n=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # umap warns about seeded n_jobs
        a, b = project(x, "umap", seed=0), project(x, "umap", seed=0)
    np.testing.assert_allclose(a, b)
    assert linear_separability(a, y) == pytest.approx(1.0)
