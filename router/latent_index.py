"""A faiss index over compressor latents: which training chunks does a new chunk resemble?

Each expert's training chunks are encoded by that expert's compressor; the pooled latents go
into an exact ``faiss.IndexFlatL2`` and a sidecar JSONL keeps, for every vector, where the
chunk came from (dataset, chunk index, source and offset when the dataset knows them) and
a short decoded text snippet. ``explain`` shows, for each chunk of a file, the nearest
training chunks under every expert, so a user sees what a route was based on.

Files in an index directory: ``latents.faiss`` (faiss native format, no pickle),
``latents.jsonl`` (one metadata object per vector, in index order), ``latents.json``
(pooling, dimension, count).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cir.router.analysis import pool_latents
from cir.router.routing import nan_last

INDEX_FILE = "latents.faiss"
META_FILE = "latents.jsonl"
INFO_FILE = "latents.json"
INDEX_DIR = "latent_index"  # inside an expert's registry directory


def _as_f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


@dataclass
class LatentIndex:
    """Exact L2 nearest neighbours over pooled latents, with one metadata dict per vector."""

    dim: int
    pooling: str = "flat"
    meta: list[dict[str, Any]] = field(default_factory=list)
    index: Any = None

    def __post_init__(self) -> None:
        import faiss

        if self.index is None:
            self.index = faiss.IndexFlatL2(self.dim)
        if self.index.d != self.dim:
            raise ValueError(f"index dimension {self.index.d} != {self.dim}")

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, x: np.ndarray, meta: Sequence[dict[str, Any]]) -> None:
        """Add vectors ``x [N, dim]`` with their metadata (same length)."""
        x = _as_f32(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors [N, {self.dim}], got {x.shape}")
        if len(meta) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(meta)} metadata rows")
        self.index.add(x)
        self.meta.extend(dict(m) for m in meta)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances ``[N, k]`` and ids ``[N, k]`` of the ``k`` nearest vectors."""
        if len(self) == 0:
            raise ValueError("the latent index is empty")
        k = min(k, len(self))
        d2, ids = self.index.search(_as_f32(x), k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def neighbours(self, x: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """For each query vector, its ``k`` nearest entries: metadata plus ``distance``."""
        dist, ids = self.search(x, k)
        return [[{**self.meta[j], "distance": float(d)} for d, j in zip(drow, irow, strict=True)
                 if j >= 0] for drow, irow in zip(dist, ids, strict=True)]

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        with open(directory / META_FILE, "w") as f:
            for m in self.meta:
                f.write(json.dumps(m) + "\n")
        info = {"dim": self.dim, "pooling": self.pooling, "count": len(self)}
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LatentIndex:
        import faiss

        directory = Path(directory)
        if not (directory / INFO_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no latent index ({INFO_FILE} missing); "
                                    "build one with `route-cli index build`")
        info = json.loads((directory / INFO_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        with open(directory / META_FILE) as f:
            meta = [json.loads(line) for line in f if line.strip()]
        if len(meta) != index.ntotal:
            raise ValueError(f"{directory}: {index.ntotal} vectors but {len(meta)} metadata rows")
        return cls(dim=int(info["dim"]), pooling=info["pooling"], meta=meta, index=index)


def chunk_meta(data: Any, i: int) -> dict[str, Any]:
    """Where chunk ``i`` of a dataset came from, as far as the dataset says."""
    for name in ("chunk_info", "chunk_meta", "meta"):
        fn = getattr(data, name, None)
        if callable(fn):
            try:
                info = fn(int(i))
            except (IndexError, KeyError, TypeError, ValueError):
                continue
            if isinstance(info, dict):
                return {k: v for k, v in info.items() if isinstance(v, (str, int, float))}
    return {}


def snippet(tokenizer: Any, ids: np.ndarray, mask: np.ndarray, chars: int = 160) -> str:
    """The first ``chars`` characters of a chunk's decoded text (empty without a tokenizer)."""
    if tokenizer is None:
        return ""
    text = tokenizer.decode([int(t) for t in ids[mask.astype(bool)]])
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def build_index(
    model: Any,
    data: Any,
    pooling: str = "flat",
    max_chunks: int | None = None,
    tokenizer: Any = None,
    dataset_name: str = "",
    batch_size: int = 64,
    snippet_chars: int = 160,
    on_batch: Callable[[int], None] | None = None,
) -> LatentIndex:
    """Encode a dataset's chunks with ``model`` (a compressor) into a new ``LatentIndex``."""
    import torch
    from cir.compressor.evaluate import pick_chunks

    idx = pick_chunks(len(data), max_chunks)
    cfg = model.config
    dim = cfg.d_model * (cfg.n_latents if pooling == "flat" else 1)
    out = LatentIndex(dim=dim, pooling=pooling)
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        ids, mask = data.get_batch(part)
        with torch.inference_mode():
            z = model.encode(ids.to(device), mask.to(device)).float().cpu()  # [b, L, D]
        meta = [{"dataset": dataset_name, "chunk": int(i), **chunk_meta(data, int(i)),
                 "text": snippet(tokenizer, ids[j].numpy(), mask[j].numpy(), snippet_chars)}
                for j, i in enumerate(part)]
        out.add(pool_latents(z, pooling), meta)
        if on_batch is not None:
            on_batch(len(part))
    return out


def encode_pooled(model: Any, ids: Any, mask: Any, pooling: str,
                  batch_size: int = 64) -> np.ndarray:
    """Pooled latents ``[N, F]`` of chunks ``ids, mask [N, T]``."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    parts = []
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            z = model.encode(ids[s : s + batch_size].to(device),
                             mask[s : s + batch_size].to(device)).float().cpu()
            parts.append(pool_latents(z, pooling))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def explain_chunks(
    ids: Any,
    mask: Any,
    experts: dict[str, tuple[Any, LatentIndex]],
    k: int = 3,
    tokenizer: Any = None,
    snippet_chars: int = 160,
) -> list[dict[str, Any]]:
    """For each chunk: its reconstruction loss and ``k`` nearest training chunks under each
    expert (``{name: (compressor, index)}``), and the route (lowest loss)."""
    out: list[dict[str, Any]] = [
        {"chunk": i, "text": snippet(tokenizer, ids[i].numpy(), mask[i].numpy(), snippet_chars),
         "experts": {}} for i in range(len(ids))
    ]
    for name, (model, index) in experts.items():
        scores = model.score(ids, mask)
        found = index.neighbours(encode_pooled(model, ids, mask, index.pooling), k)
        for i, row in enumerate(out):
            row["experts"][name] = {"loss": float(scores.loss[i]), "tra": float(scores.tra[i]),
                                    "neighbours": found[i]}
    for row in out:  # a NaN loss (a diverged compressor) is never the route, as in routing
        row["route"] = min(row["experts"], key=lambda n: nan_last(row["experts"][n]["loss"]))
    return out


def index_dir(expert_path: str | Path, out: str | Path | None = None, name: str = "") -> Path:
    """Where an expert's latent index lives: ``EXPERT/latent_index`` or ``OUT/NAME``."""
    return Path(out) / name if out is not None else Path(expert_path) / INDEX_DIR
