"""Routing baselines against reconstruction routing, on the same held-out chunks.

Every router maps a chunk to per-domain scores ``[N, K]`` (higher = more likely that domain;
the route is the argmax) and to an out-of-domain score ``[N]`` (higher = more likely OOD):

- ``reconstruction`` (ours, Compression is Routing / Expert Gate): each domain's compressor
  reconstructs the chunk; score = -loss; OOD score = the best (lowest) loss.
- ``likelihood`` (DEMix / BTM): each expert LM's summed next-token NLL; the domain
  posterior by Bayes' rule with a uniform prior is ``softmax(-nll_sum)``; OOD score = the
  best per-token NLL.
- ``gate-emb`` / ``gate-tfidf``: a trained gating classifier (logistic regression) on
  mean-pooled token embeddings or on tf-idf of token ids; OOD score = 1 - max probability.
- ``tfidf-kmeans`` (c-BTM): tf-idf + k-means, clusters mapped to domains by majority on the
  training set; score = -distance to the domain's nearest centroid; OOD = nearest distance.
- ``mahalanobis``: per-domain means and one shared (Ledoit-Wolf) covariance fitted on
  training latents; score = -squared Mahalanobis distance; OOD = the smallest distance.
- ``knn-latent``: faiss kNN over training latents; score = share of the k neighbours from
  each domain; OOD = distance to the k-th neighbour.
- ``unigram-mix``: no network; per domain, a mixture of add-one unigrams fitted on that
  domain's training chunks alone (``cir.compressor.evaluate.UnigramMixture``); score = -the
  chunk's mean cross-entropy under the domain's best unigram; OOD = the lowest of those.

``ood_metrics`` gives AUROC (OOD chunks positive, as ``cir.compressor.evaluate.auroc``) and
FPR@95%TPR: the share of OOD chunks still accepted when the threshold accepts 95% of the
in-domain chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What each method needs when a new domain is mounted (besides the new expert itself).
ON_MOUNT: dict[str, str] = {
    "reconstruction": "nothing retrained (add the new compressor)",
    "likelihood": "nothing retrained (add the new expert LM)",
    "gate-emb": "retrain the gate on all domains' data",
    "gate-tfidf": "retrain the gate on all domains' data",
    "tfidf-kmeans": "re-cluster all domains' data and remap clusters",
    "mahalanobis": "add one mean; refit the shared covariance on all domains",
    "knn-latent": "add the new domain's latents to the index",
    "unigram-mix": "nothing retrained (fit the new domain's unigrams)",
}


# ---------------------------------------------------------------- metrics


def routing_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax score is the true domain index."""
    return float((np.asarray(scores).argmax(1) == np.asarray(labels)).mean())


def accuracy_by_domain(scores: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Per domain index (a column of ``scores``), the share of its rows routed to it
    (None for a domain without rows)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    hit = scores.argmax(1) == labels
    return [float(hit[labels == k].mean()) if (labels == k).any() else None
            for k in range(scores.shape[1])]


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict:
    """AUROC (OOD positive) and FPR at ``tpr`` of in-domain chunks accepted."""
    from sklearn.metrics import roc_auc_score

    a = np.asarray(id_scores, dtype=np.float64)
    b = np.asarray(ood_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("OOD metrics need chunks on both sides")
    a, b = _finite_ranks(a, b)
    labels = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    auroc = float(roc_auc_score(labels, np.concatenate([a, b])))
    # accept a chunk as in-domain when its OOD score is <= t; the smallest t accepting at
    # least `tpr` of the in-domain chunks is their ceil(tpr * n)-th smallest score.
    t = np.sort(a)[int(np.ceil(tpr * len(a))) - 1]
    return {"auroc": auroc, "fpr95": float((b <= t).mean())}


def _finite_ranks(*parts: np.ndarray) -> tuple[np.ndarray, ...]:
    """OOD scores with NaN read as the most OOD (as the router reads a NaN loss) and the
    infinities moved just past the finite values, order kept (sklearn refuses both)."""
    parts = tuple(np.where(np.isnan(p), np.inf, p) for p in parts)
    finite = np.concatenate([p[np.isfinite(p)] for p in parts])
    hi = finite.max() + 1.0 if len(finite) else 1.0
    lo = finite.min() - 1.0 if len(finite) else -1.0
    return tuple(np.where(p == np.inf, hi, np.where(p == -np.inf, lo, p)) for p in parts)


def _nan_as_inf(x: Any) -> np.ndarray:
    """Losses / NLLs with NaN (a diverged model) read as +inf, as the router reads them."""
    return np.nan_to_num(np.asarray(x, dtype=np.float64), nan=np.inf, posinf=np.inf)


# ---------------------------------------------------------------- routers on features


class Router:
    """A fitted router: ``scores(x) [N, K]`` (argmax = route) and ``ood_score(x) [N]``."""

    name = "router"
    # each domain's part is fitted on that domain's rows alone: a mount fits the new one only
    fits_per_domain = False

    def fit(self, x: Any, y: np.ndarray) -> Router:
        return self

    def scores(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def ood_score(self, x: Any) -> np.ndarray:
        raise NotImplementedError


class LossRouter(Router):
    """Per-expert losses ``[N, K]`` given (reconstruction CE or per-token NLL): no fitting."""

    name = "reconstruction"

    def scores(self, x: np.ndarray) -> np.ndarray:
        return -_nan_as_inf(x)  # a NaN loss is never the route (cir.router.routing)

    def ood_score(self, x: np.ndarray) -> np.ndarray:
        return _nan_as_inf(x).min(1)


class LikelihoodRouter(Router):
    """DEMix/BTM: ``x = (nll_sum [N, K], n_tokens [N, K])`` -> log posterior (uniform prior)."""

    name = "likelihood"

    def scores(self, x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return domain_posterior(_nan_as_inf(x[0]), log=True)

    def ood_score(self, x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        nll, n = _nan_as_inf(x[0]), np.asarray(x[1], dtype=np.float64)
        return (nll / np.maximum(n, 1)).min(1)


def domain_posterior(nll_sum: np.ndarray, log: bool = False,
                     prior: np.ndarray | None = None) -> np.ndarray:
    """``p(domain | chunk)`` from summed NLLs ``[N, K]``: Bayes' rule, uniform prior default."""
    logp = -np.asarray(nll_sum, dtype=np.float64)
    if prior is not None:
        logp = logp + np.log(np.asarray(prior, dtype=np.float64))
    top = logp.max(1, keepdims=True)
    none = ~np.isfinite(top)  # no expert gives the chunk a finite likelihood: uniform
    logp = np.where(none, 0.0, logp - np.where(none, 0.0, top))
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return logp if log else np.exp(logp)


class GateRouter(Router):
    """A trained gating classifier: (tf-idf or scaling) + logistic regression."""

    def __init__(self, tfidf: bool = False, seed: int = 0) -> None:
        self.tfidf = tfidf
        self.name = "gate-tfidf" if tfidf else "gate-emb"
        self.seed = seed

    def fit(self, x: Any, y: np.ndarray) -> GateRouter:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        first = _tfidf() if self.tfidf else StandardScaler()
        self.model = make_pipeline(first, LogisticRegression(max_iter=2000,
                                                             random_state=self.seed))
        self.model.fit(x, y)
        self.k = int(np.max(y)) + 1
        return self

    def _proba(self, x: Any) -> np.ndarray:
        p = self.model.predict_proba(x)
        out = np.zeros((p.shape[0], self.k))
        out[:, self.model.classes_] = p  # a class absent from training keeps probability 0
        return out

    def scores(self, x: Any) -> np.ndarray:
        return np.log(np.maximum(self._proba(x), 1e-300))

    def ood_score(self, x: Any) -> np.ndarray:
        return 1.0 - self._proba(x).max(1)


def _tfidf() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(token_pattern=r"\S+", lowercase=False, sublinear_tf=True)


def ids_to_docs(ids: Any, mask: Any) -> list[str]:
    """Token-id chunks ``[N, T]`` as whitespace-separated documents for tf-idf."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    return [" ".join(map(str, row[m])) for row, m in zip(ids, mask, strict=True)]


class TfidfKMeansRouter(Router):
    """c-BTM: tf-idf + k-means; each cluster routes to its training majority domain."""

    name = "tfidf-kmeans"

    def __init__(self, n_clusters: int = 8, seed: int = 0) -> None:
        self.n_clusters = n_clusters
        self.seed = seed

    def fit(self, x: Sequence[str], y: np.ndarray) -> TfidfKMeansRouter:
        from sklearn.cluster import KMeans

        y = np.asarray(y)
        self.vec = _tfidf().fit(x)
        feats = self.vec.transform(x)
        c = min(self.n_clusters, feats.shape[0])
        self.km = KMeans(n_clusters=c, n_init=4, random_state=self.seed).fit(feats)
        self.k = int(y.max()) + 1
        self.cluster_domain = np.array([
            np.bincount(y[self.km.labels_ == j], minlength=self.k).argmax()
            if (self.km.labels_ == j).any() else 0 for j in range(c)])
        return self

    def _dist(self, x: Sequence[str]) -> np.ndarray:
        return self.km.transform(self.vec.transform(x))  # [N, C]

    def scores(self, x: Sequence[str]) -> np.ndarray:
        d = self._dist(x)
        out = np.full((d.shape[0], self.k), -np.inf)
        for j, dom in enumerate(self.cluster_domain):
            out[:, dom] = np.maximum(out[:, dom], -d[:, j])
        return out

    def ood_score(self, x: Sequence[str]) -> np.ndarray:
        return self._dist(x).min(1)


class MahalanobisRouter(Router):
    """Per-domain means + one shared Ledoit-Wolf covariance of the within-domain residuals."""

    name = "mahalanobis"

    def fit(self, x: np.ndarray, y: np.ndarray) -> MahalanobisRouter:
        from sklearn.covariance import LedoitWolf

        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        self.k = int(y.max()) + 1
        self.means = np.stack([x[y == c].mean(0) if (y == c).any() else
                               np.full(x.shape[1], np.inf) for c in range(self.k)])
        resid = x - self.means[y]
        self.precision = LedoitWolf(assume_centered=True).fit(resid).precision_
        return self

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of every row to every domain mean ``[N, K]``."""
        x = np.asarray(x, dtype=np.float64)
        out = np.empty((len(x), self.k))
        for c, mu in enumerate(self.means):
            diff = x - mu  # [N, F]
            out[:, c] = np.einsum("nf,fg,ng->n", diff, self.precision, diff)
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        return -np.nan_to_num(self.distances(x), nan=np.inf, posinf=np.inf)

    def ood_score(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num(self.distances(x), nan=np.inf).min(1)


class KnnRouter(Router):
    """kNN in latent space (faiss, exact L2): vote shares and the k-th neighbour distance."""

    name = "knn-latent"

    def __init__(self, k: int = 10) -> None:
        self.k_nn = k

    def fit(self, x: np.ndarray, y: np.ndarray) -> KnnRouter:
        from cir.router.latent_index import LatentIndex

        x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y)
        self.k = int(self.y.max()) + 1
        self.index = LatentIndex(dim=x.shape[1], pooling="given")
        self.index.add(x, [{} for _ in range(len(x))])
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        _, ids = self.index.search(x, self.k_nn)
        # faiss answers id -1 where it finds no neighbour (a NaN query): no vote, not y[-1]
        votes = np.where(ids >= 0, self.y[ids], -1)  # [N, k]
        return np.stack([(votes == c).mean(1) for c in range(self.k)], axis=1)

    def ood_score(self, x: np.ndarray) -> np.ndarray:
        dist, ids = self.index.search(x, self.k_nn)
        return np.where(ids[:, -1] >= 0, dist[:, -1], np.inf)


UNIGRAM_MIX_COMPONENTS = 8  # unigrams per domain of the unigram-mix baseline


class UnigramMixtureRouter(Router):
    """Each domain's own mixture of ``n_components`` unigrams; lowest cross-entropy wins."""

    name = "unigram-mix"
    fits_per_domain = True

    def __init__(self, n_components: int = UNIGRAM_MIX_COMPONENTS, seed: int = 0) -> None:
        self.n_components = n_components
        self.seed = seed

    def fit(self, x: Any, y: np.ndarray) -> UnigramMixtureRouter:
        from cir.compressor.evaluate import UnigramMixture

        y = np.asarray(y)
        self.k = int(y.max()) + 1
        self.mixtures = [UnigramMixture.fit_bags(x[np.nonzero(y == c)[0]], self.n_components,
                                                 seed=self.seed) if (y == c).any() else None
                         for c in range(self.k)]
        return self

    def losses(self, x: Any) -> np.ndarray:
        """Mean cross-entropy of every chunk under every domain's best unigram ``[N, K]``."""
        return np.stack([np.full(x.shape[0], np.inf) if m is None else m.bag_loss(x)
                         for m in self.mixtures], axis=1)

    def scores(self, x: Any) -> np.ndarray:
        return -np.nan_to_num(self.losses(x), nan=np.inf)

    def ood_score(self, x: Any) -> np.ndarray:
        return np.nan_to_num(self.losses(x), nan=np.inf).min(1)


def baseline_routers(n_clusters: int = 8, k_nn: int = 10, seed: int = 0) -> dict[str, Router]:
    """The trained baselines, keyed by name; each reads one feature kind (``FEATURE_OF``)."""
    return {
        "gate-emb": GateRouter(tfidf=False, seed=seed),
        "gate-tfidf": GateRouter(tfidf=True, seed=seed),
        "tfidf-kmeans": TfidfKMeansRouter(n_clusters=n_clusters, seed=seed),
        "mahalanobis": MahalanobisRouter(),
        "knn-latent": KnnRouter(k=k_nn),
        "unigram-mix": UnigramMixtureRouter(seed=seed),
    }


FEATURE_OF: dict[str, str] = {
    "reconstruction": "recon", "likelihood": "nll", "gate-emb": "emb",
    "gate-tfidf": "docs", "tfidf-kmeans": "docs", "mahalanobis": "latent",
    "knn-latent": "latent", "unigram-mix": "bags",
}


# ---------------------------------------------------------------- features from models


@dataclass
class Chunks:
    """Token chunks ``ids, mask [N, T]`` with domain labels ``[N]`` (index into domains)."""

    ids: Any
    mask: Any
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def take_chunks(datasets: Sequence[Any], max_chunks: int | None, read: bool = True) -> Chunks:
    """Evenly spread chunks of each dataset, labelled by its position in ``datasets``;
    ``read=False``: their labels only (ids and mask ``[N, 0]``), for when no feature is
    computed from them."""
    import torch
    from cir.compressor.evaluate import pick_chunks

    ids, mask, labels = [], [], []
    for c, data in enumerate(datasets):
        picked = pick_chunks(len(data), max_chunks)
        if read:
            i, m = data.get_batch(picked)
        else:
            i, m = torch.zeros(len(picked), 0, dtype=torch.long), torch.zeros(len(picked), 0)
        ids.append(i)
        mask.append(m.bool())
        labels += [c] * len(i)
    return Chunks(torch.cat(ids), torch.cat(mask), np.asarray(labels, dtype=np.int64))


def recon_losses(compressors: Sequence[Any], ids: Any, mask: Any) -> np.ndarray:
    """Reconstruction loss of every chunk under every compressor ``[N, K]``, scored by the
    router itself (``cir.router.routing.route_chunks``)."""
    from types import SimpleNamespace

    from cir.router.routing import route_chunks

    experts = [SimpleNamespace(name=str(i), threshold=None, compressor=c)
               for i, c in enumerate(compressors)]
    return route_chunks(experts, ids, mask).loss.double().numpy()  # [N, K]


def lm_nll(lms: Sequence[Any], ids: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and predicted-token counts of every chunk under every expert LM ``[N, K]``."""
    from cir.experts.evaluate import perplexity

    outs = [perplexity(lm, ids, mask) for lm in lms]
    return (np.stack([o["nll_sum"].double().numpy() for o in outs], axis=1),
            np.stack([o["n_tokens"].double().numpy() for o in outs], axis=1))


def mean_embeddings(embedding: Any, ids: Any, mask: Any) -> np.ndarray:
    """Mean of the real tokens' embedding rows ``[N, D]`` (``embedding``: ``[V, D]``)."""
    import torch

    table = torch.as_tensor(embedding).float()
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), 1024):  # [1024, T, D] at a time, not all chunks at once
            e = table[ids[s : s + 1024]]  # [B, T, D]
            m = mask[s : s + 1024].float().unsqueeze(-1)  # [B, T, 1]
            out.append(((e * m).sum(1) / m.sum(1).clamp_min(1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, table.shape[1]), dtype=np.float32)


@dataclass
class FeatureSet:
    """Every feature kind of one set of chunks, and the wall time each took to compute."""

    chunks: Chunks
    feats: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def subset(self, keep: np.ndarray) -> FeatureSet:
        out = FeatureSet(Chunks(self.chunks.ids[keep], self.chunks.mask[keep],
                                self.chunks.labels[keep]), seconds=dict(self.seconds))
        for name, f in self.feats.items():
            if isinstance(f, tuple):
                out.feats[name] = tuple(a[keep] for a in f)
            elif isinstance(f, list):
                out.feats[name] = [f[i] for i in np.flatnonzero(keep)]
            else:  # numpy arrays and sparse matrices alike
                out.feats[name] = f[np.flatnonzero(keep)]
        return out

    def columns(self, cols: Sequence[int]) -> FeatureSet:
        """Only experts ``cols`` mounted: per-expert features keep those columns."""
        out = FeatureSet(self.chunks, dict(self.feats), dict(self.seconds))
        cols = list(cols)
        if "recon" in out.feats:
            out.feats["recon"] = out.feats["recon"][:, cols]
        if "nll" in out.feats:
            out.feats["nll"] = tuple(a[:, cols] for a in out.feats["nll"])
        return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compute_features(chunks: Chunks, compressors: Sequence[Any], lms: Sequence[Any] | None,
                     reference: Any, pooling: str = "mean",
                     kinds: Sequence[str] | None = None) -> FeatureSet:
    """Features of ``chunks`` (``kinds``, default all): reconstruction losses, LM NLLs (when
    ``lms``), mean token embeddings, tf-idf documents, the ``reference`` compressor's
    pooled latents."""
    from cir.compressor.evaluate import token_bags
    from cir.router.latent_index import encode_pooled

    fs = FeatureSet(chunks)
    ids, mask = chunks.ids, chunks.mask
    jobs: dict[str, Callable[[], Any]] = {
        "recon": lambda: recon_losses(compressors, ids, mask),
        "emb": lambda: mean_embeddings(reference.tok_emb.weight.detach().cpu(), ids, mask),
        "docs": lambda: ids_to_docs(ids, mask),
        "latent": lambda: encode_pooled(reference, ids, mask, pooling),
        "bags": lambda: token_bags(ids, mask, reference.config.vocab_size),
    }
    if lms:
        jobs["nll"] = lambda: lm_nll(lms, ids, mask)
    if kinds is not None:
        jobs = {k: v for k, v in jobs.items() if k in kinds}
    for name, job in jobs.items():
        fs.feats[name], fs.seconds[name] = _timed(job)
    return fs


# ---------------------------------------------------------------- the benchmark


def make_router(method: str, n_clusters: int = 8, k_nn: int = 10, seed: int = 0) -> Router:
    if method == "reconstruction":
        return LossRouter()
    if method == "likelihood":
        return LikelihoodRouter()
    routers = baseline_routers(n_clusters=n_clusters, k_nn=k_nn, seed=seed)
    if method not in routers:
        raise ValueError(f"unknown routing method {method!r}; valid: {', '.join(FEATURE_OF)}")
    return routers[method]


def evaluate_method(method: str, train: FeatureSet, test: FeatureSet,
                    ood: dict[str, FeatureSet], **router_kw: Any) -> dict[str, Any]:
    """Fit ``method`` on ``train``; accuracy on ``test``; AUROC/FPR95 against each OOD set."""
    feat = FEATURE_OF[method]
    if feat not in test.feats:
        raise ValueError(f"{method} needs feature {feat!r}, which was not computed")
    router, fit_s = _timed(lambda: make_router(method, **router_kw).fit(
        train.feats.get(feat), train.chunks.labels))
    scores, pred_s = _timed(lambda: router.scores(test.feats[feat]))
    id_ood = router.ood_score(test.feats[feat])
    n = len(test.chunks)
    out: dict[str, Any] = {
        "method": method,
        "accuracy": routing_accuracy(scores, test.chunks.labels),
        "accuracy_by_domain": accuracy_by_domain(scores, test.chunks.labels),
        "fit_s": fit_s,
        "ms_per_chunk": 1000 * (test.seconds.get(feat, 0.0) + pred_s) / max(n, 1),
        "on_mount": ON_MOUNT[method],
        "ood": {},
    }
    for name, fs in ood.items():
        out["ood"][name] = ood_metrics(id_ood, router.ood_score(fs.feats[feat]))
    return out


def mount_experiment(method: str, train: FeatureSet, test: FeatureSet,
                     **router_kw: Any) -> dict[str, Any]:
    """Route with the first K-1 domains, then mount the K-th: accuracy before (on the old
    domains) and after (on all K, with the update the method needs), and the update's cost."""
    k = int(train.chunks.labels.max()) + 1
    old = list(range(k - 1))
    tr_old = train.subset(train.chunks.labels < k - 1).columns(old)
    te_old = test.subset(test.chunks.labels < k - 1).columns(old)
    before = evaluate_method(method, tr_old, te_old, {}, **router_kw)
    after = evaluate_method(method, train, test, {}, **router_kw)
    feat = FEATURE_OF[method]
    router = make_router(method, **router_kw).fit(train.feats.get(feat), train.chunks.labels)
    old_sel = test.chunks.labels < k - 1
    old_scores = router.scores(test.subset(old_sel).feats[feat])
    retrains = method not in ("reconstruction", "likelihood")
    update_s = after["fit_s"] if retrains else 0.0
    if router.fits_per_domain:  # mounting fits the new domain's part alone
        new = train.subset(train.chunks.labels == k - 1)
        update_s = _timed(lambda: make_router(method, **router_kw).fit(
            new.feats[feat], new.chunks.labels))[1]
    return {
        "method": method,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "old_domains_after": routing_accuracy(old_scores, test.chunks.labels[old_sel]),
        "update": ON_MOUNT[method],
        "update_s": update_s,
    }


def flops_per_chunk(method: str, compressors: Sequence[Any], lms: Sequence[Any] | None,
                    n_train: int, n_domains: int, latent_dim: int) -> float | None:
    """Rough forward FLOPs to route one chunk (matmuls only; None where not estimated)."""
    if not compressors:
        return None
    c0 = compressors[0]
    seq = c0.config.seq_len
    encoder = c0.encoder_flops()  # the latent routers read the first compressor's latents
    table: dict[str, float | None] = {
        "reconstruction": float(sum(c.scoring_flops() for c in compressors)),
        "likelihood": (float(sum(2.0 * sum(p.numel() for p in m.parameters()) * seq
                                 for m in lms)) if lms else None),
        "gate-emb": 2.0 * c0.config.d_model * n_domains,
        "gate-tfidf": None,
        "tfidf-kmeans": None,
        "mahalanobis": encoder + n_domains * 2.0 * latent_dim * (latent_dim + 1),
        "knn-latent": encoder + 2.0 * n_train * latent_dim,
        # one log-probability gathered and added per token, cluster and domain
        "unigram-mix": 2.0 * seq * UNIGRAM_MIX_COMPONENTS * n_domains,
    }
    return table.get(method)


@dataclass
class DomainModels:
    """One mounted domain: its compressor, its expert LM (optional) and its data splits."""

    compressor: Any
    lm: Any
    train: Any
    test: Any


# Training chunks per domain the baselines are fitted on by default: more than a `small`
# compressor draws in training (1,000 steps x 16) and than a 5M-token corpus holds (~10K),
# and a bound on memory (ids, and tf-idf documents) for larger corpora.
MAX_TRAIN_CHUNKS = 24_000


def bench_routing(
    domains: dict[str, DomainModels],
    ood: dict[str, Any] | None = None,
    max_train: int | None = MAX_TRAIN_CHUNKS,
    max_test: int | None = 200,
    methods: Sequence[str] | None = None,
    pooling: str = "mean",
    seed: int = 0,
    n_clusters: int | None = None,
    k_nn: int = 10,
    max_train_latent: int | None = 200,
) -> dict[str, Any]:
    """Every routing method on the same held-out chunks of ``domains`` (>= 2), OOD sets
    (name -> ``ChunkDataset``: random tokens, a domain not mounted), and, with 3 or more
    domains, the mount experiment. The first domain's compressor gives the shared latent
    space and token embeddings of the feature baselines.

    The baselines are fitted on ``max_train`` training chunks per domain (``None``: all;
    the default ``MAX_TRAIN_CHUNKS`` is at least the data a `small` compressor trains on);
    those on latents (Mahalanobis, kNN) on at most ``max_train_latent`` of them, since each
    costs an encoder pass."""
    if len(domains) < 2:
        raise ValueError("routing needs at least two domains")
    names = list(domains)
    comps = [d.compressor for d in domains.values()]
    lms = [d.lm for d in domains.values()]
    lms = lms if all(m is not None for m in lms) else None
    methods = list(methods or [m for m in FEATURE_OF if m != "likelihood" or lms])
    kw = {"n_clusters": n_clusters or 4 * len(names), "k_nn": k_nn, "seed": seed}

    def feats(sets: Sequence[Any], n: int | None, kinds: Any = None) -> FeatureSet:
        chunks = take_chunks(sets, n, read=kinds is None or bool(kinds))
        return compute_features(chunks, comps, lms, comps[0], pooling, kinds)

    # reconstruction and likelihood routing fit nothing: no need to score training chunks
    for split in ("train", "test"):
        empty = [n for n, d in domains.items() if len(getattr(d, split)) == 0]
        if empty:
            raise ValueError(f"no {split} chunks in domain(s) {', '.join(empty)}: routing "
                             "accuracy would leave them out")
    needed = {FEATURE_OF[m] for m in methods}  # features only the named methods read
    train_sets = [d.train for d in domains.values()]
    train = feats(train_sets, max_train, needed & {"emb", "docs", "bags"})
    n_latent = min((n for n in (max_train, max_train_latent) if n is not None), default=None)
    train_latent = feats(train_sets, n_latent, needed & {"latent"})

    def train_for(method: str) -> FeatureSet:
        return train_latent if FEATURE_OF[method] == "latent" else train

    test = feats([d.test for d in domains.values()], max_test, needed)
    ood_sets = {k: feats([v], max_test, needed) for k, v in (ood or {}).items()}
    latent_dim = (test.feats["latent"].shape[1] if "latent" in test.feats
                  else comps[0].config.d_model)
    rows = []
    for m in methods:
        row = evaluate_method(m, train_for(m), test, ood_sets, **kw)
        row["flops_per_chunk"] = flops_per_chunk(m, comps, lms, len(train_for(m).chunks),
                                                 len(names), latent_dim)
        row["accuracy_by_domain"] = dict(zip(names, row["accuracy_by_domain"], strict=True))
        rows.append(row)
    mount = ([mount_experiment(m, train_for(m), test, **kw) for m in methods]
             if len(names) >= 3 else [])
    return {"domains": names, "n_train": len(train.chunks),
            "n_train_latent": len(train_latent.chunks), "n_test": len(test.chunks),
            "ood_sets": {k: len(v.chunks) for k, v in ood_sets.items()},
            "pooling": pooling, "methods": rows, "mount": mount,
            "mounted_last": names[-1] if mount else None}
