"""Analysis of compressors: the ID / semi-OOD / full-OOD TRA table and the latent space.

- ``tra_table``: the seed's table (Compression is Routing, Table 1): one compressor scored on
  in-domain, semi-out-of-domain and fully-out-of-domain (random tokens) chunks. The numbers
  come from ``cir.compressor.evaluate.evaluate``; this module only labels and renders them.
- ``tra_matrix``: every expert's compressor against every domain's held-out data.
- Latent space: the 8 latents of held-out chunks (``Compressor.encode``), flattened
  ``[L * D]`` or mean-pooled ``[D]``, projected to 2-D with PCA / t-SNE / UMAP (fixed
  ``random_state``), plotted coloured by domain, and summarised by linear separability
  (cross-validated logistic regression), silhouette score and the number of PCA components
  that explain 95% of the variance (the seed reports about 200 of 512 on code).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROLES = ("in-domain", "semi-OOD", "full-OOD")
POOLINGS = ("flat", "mean")


# ---------------------------------------------------------------- TRA tables


@dataclass
class TableRow:
    """One (compressor, dataset) cell of a TRA table."""

    compressor: str
    dataset: str
    role: str
    chunks: int
    tokens: int
    tra: float  # pooled over tokens, as the seed reports it
    tra_chunk_mean: float
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


TABLE_COLUMNS = ("compressor", "dataset", "role", "chunks", "tokens", "tra", "tra_chunk_mean",
                 "loss")


def tra_table(
    compressor: Any,
    datasets: dict[str, tuple[str, Any]],
    name: str = "compressor",
    max_chunks: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    on_batch: Callable[[str, int], None] | None = None,
) -> list[TableRow]:
    """Score one compressor (checkpoint dir or model) on ``{dataset: (role, ChunkDataset)}``."""
    from cir.compressor.evaluate import evaluate

    for ds_name, (role, _) in datasets.items():
        if role not in ROLES:
            raise ValueError(f"{ds_name}: unknown role {role!r}; valid: {', '.join(ROLES)}")
    rows = evaluate(compressor, {k: ds for k, (_, ds) in datasets.items()},
                    batch_size=batch_size, max_chunks=max_chunks, device=device,
                    on_batch=on_batch)
    return [TableRow(name, r.name, datasets[r.name][0], r.chunks, r.tokens, r.tra,
                     r.tra_chunk_mean, r.loss) for r in rows]


def tra_matrix(
    compressors: dict[str, Any],
    datasets: dict[str, Any],
    max_chunks: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    on_batch: Callable[[str, int], None] | None = None,
    full_ood: Sequence[str] = ("random",),
) -> list[TableRow]:
    """Every compressor on every dataset; a dataset named like the compressor is in-domain,
    those in ``full_ood`` (``random``) are full-OOD, every other domain is semi-OOD for
    that compressor."""
    rows: list[TableRow] = []
    for name, comp in compressors.items():
        labelled = {ds: (role_of(name, ds, full_ood), data) for ds, data in datasets.items()}
        rows += tra_table(comp, labelled, name=name, max_chunks=max_chunks,
                          batch_size=batch_size, device=device, on_batch=on_batch)
    return rows


def role_of(expert: str, dataset: str, full_ood: Sequence[str] = ("random",)) -> str:
    if dataset == expert:
        return "in-domain"
    return "full-OOD" if dataset in full_ood else "semi-OOD"


def _fmt(row: TableRow) -> list[str]:
    return [row.compressor, row.dataset, row.role, str(row.chunks), str(row.tokens),
            f"{100 * row.tra:.2f}%", f"{100 * row.tra_chunk_mean:.2f}%", f"{row.loss:.3f}"]


def table_to_markdown(rows: Sequence[TableRow]) -> str:
    head = ("| compressor | dataset | role | chunks | tokens | TRA (pooled) | TRA (chunk mean) "
            "| CE loss |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_fmt(r)) + " |" for r in rows]
    return "\n".join(lines)


def table_to_csv(rows: Sequence[TableRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for r in rows:
        writer.writerow([getattr(r, c) for c in TABLE_COLUMNS])
    return buf.getvalue()


def matrix_view(rows: Sequence[TableRow], value: str = "tra") -> tuple[list[str], list[str],
                                                                      np.ndarray]:
    """``(compressors, datasets, values [C, D])`` of one field of a ``tra_matrix``."""
    comps = list(dict.fromkeys(r.compressor for r in rows))
    dsets = list(dict.fromkeys(r.dataset for r in rows))
    out = np.full((len(comps), len(dsets)), np.nan)
    for r in rows:
        out[comps.index(r.compressor), dsets.index(r.dataset)] = getattr(r, value)
    return comps, dsets, out


# ---------------------------------------------------------------- latent metrics


def pool_latents(z: torch.Tensor | np.ndarray, pooling: str = "flat") -> np.ndarray:
    """Latents ``[N, L, D]`` -> features ``[N, L*D]`` (flat) or ``[N, D]`` (mean)."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 3:
        raise ValueError(f"latents must be [N, L, D], got shape {z.shape}")
    if pooling == "flat":
        return z.reshape(len(z), -1)  # [N, L*D]
    if pooling == "mean":
        return z.mean(axis=1)  # [N, D]
    raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")


def linear_separability(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a standardised logistic regression predicting ``y``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2:
        raise ValueError("linear separability needs at least two classes")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise ValueError("every class needs at least two samples for cross-validation")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv).mean())


def silhouette(x: np.ndarray, y: np.ndarray) -> float:
    """Mean silhouette coefficient of the domain labels (Euclidean), in [-1, 1]."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(x, y))


def pca_components_for(x: np.ndarray, variance: float = 0.95) -> int:
    """Fewest principal components whose explained variance reaches ``variance``."""
    from sklearn.decomposition import PCA

    ratios = PCA().fit(x).explained_variance_ratio_
    return int(min(np.searchsorted(np.cumsum(ratios), variance - 1e-9) + 1, len(ratios)))


def latent_summary(x: np.ndarray, labels: Sequence[str], seed: int = 0,
                   exclude: str | None = "random") -> dict[str, Any]:
    """Separability numbers of features ``x [N, F]`` labelled by domain; PCA-95% also per
    domain (the seed's figure is for code alone). With an ``exclude`` label (random tokens,
    whose latents dominate the variance) and two other domains, the same numbers without it
    are under ``"without_" + exclude``."""
    y = np.asarray(labels)
    names, counts = np.unique(y, return_counts=True)
    out: dict[str, Any] = {
        "n": int(len(x)),
        "dim": int(x.shape[1]),
        "domains": {str(n): int(c) for n, c in zip(names, counts, strict=True)},
        "linear_separability": linear_separability(x, y, seed=seed),
        "silhouette": silhouette(x, y),
        "pca_components_95": pca_components_for(x, 0.95),
        "pca_components_95_by_domain": {str(n): pca_components_for(x[y == n], 0.95)
                                        for n, c in zip(names, counts, strict=True) if c > 1},
    }
    rest = y != exclude
    if exclude is not None and (~rest).any() and len(np.unique(y[rest])) >= 2:
        out[f"without_{exclude}"] = latent_summary(x[rest], y[rest], seed=seed, exclude=None)
    return out


def dataset_label(spec: str) -> str:
    """A short legend label for a dataset name or directory (drops a fingerprint suffix)."""
    name = Path(str(spec)).name or str(spec)
    return re.sub(r"-[0-9a-f]{12}$", "", name)


# ---------------------------------------------------------------- projections and plots


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(x)


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca",
                random_state=seed).fit_transform(x)


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    neighbours = int(max(2, min(15, len(x) - 1)))
    # a seeded UMAP runs on one thread; saying so keeps umap from warning that it does
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


PROJECTIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "pca": _pca, "tsne": _tsne, "umap": _umap,
}
METHOD_TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def project(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates ``[N, 2]`` of features ``x [N, F]`` (fixed ``random_state``)."""
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; valid: {', '.join(PROJECTIONS)}")
    if len(x) < 4:
        raise ValueError(f"a 2-D projection needs at least 4 points, got {len(x)}")
    return np.asarray(PROJECTIONS[method](np.asarray(x, dtype=np.float32), seed), np.float64)


def plot_projection(coords: np.ndarray, labels: Sequence[str], title: str, path: Path,
                    method: str = "") -> Path:
    """Scatter ``coords [N, 2]``, one colour per domain, with title, legend and axis labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(labels)
    domains = list(dict.fromkeys(y.tolist()))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for i, name in enumerate(domains):
        sel = y == name
        ax.scatter(coords[sel, 0], coords[sel, 1], s=14, alpha=0.75, color=cmap(i % 10),
                   label=f"{name} ({int(sel.sum())})", edgecolors="none")
    axis = METHOD_TITLES.get(method, method or "dim")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(title)
    ax.legend(title="domain", loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.5,
              frameon=False)
    ax.grid(True, alpha=0.25)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def collect_latents(model: Any, datasets: dict[str, Any],
                    max_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latents ``[N, L, D]`` of every dataset's chunks and their domain labels ``[N]``."""
    from cir.compressor.evaluate import latents_of

    parts, labels = [], []
    for name, data in datasets.items():
        z = latents_of(model, data, max_chunks=max_chunks).numpy()  # [n, L, D]
        parts.append(z)
        labels += [name] * len(z)
    return np.concatenate(parts), np.asarray(labels)


@dataclass
class LatentReport:
    """What ``latent_plots`` wrote and measured."""

    out_dir: Path
    pooling: str
    summary: dict[str, Any]
    plots: dict[str, Path] = field(default_factory=dict)
    coords: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "pooling": self.pooling, "summary": self.summary,
                "plots": {k: str(v) for k, v in self.plots.items()},
                "coords": {k: str(v) for k, v in self.coords.items()}}


def write_coords(path: Path, coords: np.ndarray, labels: Sequence[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "domain", "x", "y"])
        for i, (lab, (cx, cy)) in enumerate(zip(labels, coords, strict=True)):
            writer.writerow([i, lab, f"{cx:.6g}", f"{cy:.6g}"])
    return path


def _headline(s: dict[str, Any]) -> str:
    line = (f"linear sep. {100 * s['linear_separability']:.1f}%, silhouette "
            f"{s['silhouette']:.2f}, PCA-95% {s['pca_components_95']}/{s['dim']} dims")
    if "without_random" in s:
        w = s["without_random"]
        line += (f"\nwithout random: linear sep. {100 * w['linear_separability']:.1f}%, "
                 f"silhouette {w['silhouette']:.2f}")
    return line


def latent_plots(
    x: np.ndarray,
    labels: Sequence[str],
    out_dir: Path,
    methods: Sequence[str] = ("umap", "tsne", "pca"),
    pooling: str = "flat",
    title: str = "latents",
    seed: int = 0,
    on_method: Callable[[str], None] | None = None,
) -> LatentReport:
    """Project pooled latents ``x [N, F]`` with each method; write PNG + CSV + summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = LatentReport(out_dir, pooling, latent_summary(x, labels, seed=seed))
    s = report.summary
    for method in methods:
        if on_method is not None:
            on_method(method)
        coords = project(x, method, seed=seed)
        stem = f"latents_{pooling}_{method}"
        report.coords[method] = write_coords(out_dir / f"{stem}.csv", coords, labels)
        full = f"{title}: {METHOD_TITLES.get(method, method)} of {pooling} latents\n" + _headline(s)
        report.plots[method] = plot_projection(coords, labels, full, out_dir / f"{stem}.png",
                                               method)
    (out_dir / f"summary_{pooling}.json").write_text(
        json.dumps(report.to_dict(), indent=2) + "\n")
    return report


# ---------------------------------------------------------------- registry helpers

DATA_META_KEYS = ("dataset", "dataset_path", "data")


def expert_dataset(registry: Any, info: Any, overrides: dict[str, str] | None = None) -> str:
    """The dataset (name or directory) of an expert's domain: ``overrides[name]``, a dataset
    named in its ``meta.json``, or its corpus rebuilt from the recorded ``source`` with the
    registry tokenizer (cached under ``$CIR_HOME/analysis/corpora``; the train/val/test
    split is a stable hash of each document, so held-out chunks stay held out)."""
    if overrides and info.name in overrides:
        return overrides[info.name]
    for key in DATA_META_KEYS:
        value = info.meta.get(key)
        if isinstance(value, str) and value:
            return value
    kept = registry.data_dir(info.name)  # the very corpus the mount trained on
    if (kept / "manifest.json").is_file():
        return str(kept)
    source = info.meta.get("source")
    if not source:
        raise ValueError(f"{info.name}: meta.json names neither a dataset nor a source; "
                         f"give it as --data {info.name}=DATASET")
    return str(rebuild_corpus(registry, info))


def rebuild_corpus(registry: Any, info: Any) -> Path:
    """Rebuild (once) the chunk dataset a mounted expert was trained on."""
    from cir.data import build_dataset

    from cir.paths import cir_home

    corpus = info.meta.get("corpus") or {}
    mount_cfg = info.meta.get("mount_config") or {}
    key = str(info.meta.get("corpus_fingerprint", ""))[:12] or "nofp"
    out = cir_home() / "analysis" / "corpora" / f"{info.name}-{key}"
    if not (out / "manifest.json").is_file():
        seq_len = int(corpus.get("seq_len") or info_seq_len(info))
        build_dataset(out, info.meta["source"], tokenizer=registry.tokenizer_path,
                      seq_len=seq_len, max_tokens=mount_cfg.get("max_tokens"), overwrite=True)
    return out


def info_seq_len(info: Any) -> int:
    from cir.checkpoint import read_config

    return int(read_config(info.checkpoint("compressor"))[1].seq_len)


def open_eval_dataset(spec: str, split: str, like: Any = None, n_random: int = 256) -> Any:
    """Open ``spec`` at ``split``; ``random`` takes the shape of compressor ``like``."""
    from cir.data import open_dataset

    if spec == "random":
        if like is None:
            raise ValueError("the random dataset needs a compressor to take its shape from")
        return open_dataset("random", split, vocab_size=like.config.vocab_size,
                            seq_len=like.config.seq_len, n_chunks=n_random)
    return open_dataset(spec, split)


def registry_domains(registry: Any, overrides: dict[str, str] | None = None,
                     names: Sequence[str] | None = None) -> dict[str, tuple[Any, str]]:
    """``{expert: (Expert with its compressor loaded, dataset spec)}`` of a registry."""
    loaded = registry.load(list(names) if names else None)
    if loaded.errors:
        name, err = loaded.errors[0]
        raise ValueError(f"expert {name} cannot be loaded: {err}")
    if not loaded.experts:
        raise ValueError(f"registry {registry.root} has no experts; mount some first "
                         "(route-cli quickstart)")
    return {e.name: (e, expert_dataset(registry, e.info, overrides)) for e in loaded.experts}
