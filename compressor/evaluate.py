"""Evaluate a compressor on several datasets: the ID / semi-OOD / full-OOD TRA table and
the AUROC of telling two datasets apart by reconstruction loss (the routing signal).

TRA is reported twice: pooled over tokens (what the paper's table reports) and averaged
per chunk (what a router sees). The AUROC uses each chunk's mean cross-entropy as the
out-of-domain score (``sklearn.metrics.roc_auc_score``). Where a dataset has a document
index, ``document_errors`` says which documents the errors come from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cir.compressor.model import ChunkScores, Compressor

from cir.checkpoint import load_checkpoint


@dataclass
class EvalRow:
    """One dataset's reconstruction figures; ``chunk_loss``/``chunk_tra`` are per chunk."""

    name: str
    chunks: int
    tokens: int
    tra: float  # pooled over tokens
    tra_chunk_mean: float
    loss: float  # mean cross-entropy per token
    chunk_loss: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    chunk_tra: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    chunk_tokens: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    chunk_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    def to_dict(self, per_chunk: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "chunks": self.chunks, "tokens": self.tokens, "tra": self.tra,
            "tra_chunk_mean": self.tra_chunk_mean, "loss": self.loss,
        }
        if per_chunk:
            out["chunk_loss"] = self.chunk_loss.tolist()
            out["chunk_tra"] = self.chunk_tra.tolist()
        return out


def _as_model(checkpoint_or_model: str | Path | Compressor, device: str) -> Compressor:
    if isinstance(checkpoint_or_model, Compressor):
        return checkpoint_or_model
    return load_checkpoint(checkpoint_or_model, device=device, expect="compressor")


def pick_chunks(n: int, max_chunks: int | None) -> np.ndarray:
    """Indices to evaluate: all, or ``max_chunks`` spread evenly over the dataset."""
    if max_chunks is None or max_chunks >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_chunks).round().astype(np.int64))


def score_dataset(
    model: Compressor,
    data: Any,
    batch_size: int | None = None,
    max_chunks: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    precision: str = "auto",
    codes: str = "best",
) -> ChunkScores:
    """Per-chunk scores of ``data`` (a ``ChunkDataset``); ``on_batch(n_chunks)`` after each.
    ``precision`` and ``codes`` as in ``Compressor.score`` (auto: bf16 on CUDA, fp32 on
    CPU; a coded model's best code, or the encoder's pick)."""
    idx = pick_chunks(len(data), max_chunks)
    bs = batch_size or model.default_score_batch()
    parts = []
    for start in range(0, len(idx), bs):
        ids, mask = data.get_batch(idx[start : start + bs])
        parts.append(model.score(ids, mask, batch_size=bs, precision=precision, codes=codes))
        if on_batch is not None:
            on_batch(len(ids))
    if not parts:
        where = getattr(data, "root", "dataset")
        raise ValueError(f"{where}: no chunks to evaluate in split {getattr(data, 'split', '?')}")
    return ChunkScores.cat(parts)


def row_from_scores(name: str, s: ChunkScores, index: np.ndarray | None = None) -> EvalRow:
    """``s`` scored chunks ``index`` of a dataset (default: 0, 1, ...); chunks without
    tokens are dropped."""
    keep = s.n_tokens > 0
    index = np.arange(len(keep)) if index is None else np.asarray(index, dtype=np.int64)
    tokens = int(s.n_tokens.sum())
    loss_sum = float((s.loss[keep].double() * s.n_tokens[keep].double()).sum())
    return EvalRow(
        name=name,
        chunks=int(keep.sum()),
        tokens=tokens,
        tra=float(s.n_correct.sum()) / max(tokens, 1),
        tra_chunk_mean=float(s.tra[keep].double().mean()) if keep.any() else math.nan,
        loss=loss_sum / max(tokens, 1),
        chunk_loss=s.loss[keep].numpy(),
        chunk_tra=s.tra[keep].numpy(),
        chunk_tokens=s.n_tokens[keep].numpy().astype(np.int64),
        chunk_index=index[keep.numpy()],
    )


def evaluate(
    checkpoint_or_model: str | Path | Compressor,
    datasets: dict[str, Any],
    batch_size: int | None = None,
    max_chunks: int | None = None,
    device: str = "cpu",
    on_batch: Callable[[str, int], None] | None = None,
    precision: str = "auto",
    codes: str = "best",
) -> list[EvalRow]:
    """One ``EvalRow`` per named dataset (same order), with per-chunk scores for AUROC."""
    model = _as_model(checkpoint_or_model, device)
    rows = []
    for name, data in datasets.items():
        cb = None if on_batch is None else (lambda n, _name=name: on_batch(_name, n))
        scores = score_dataset(model, data, batch_size, max_chunks, cb, precision, codes)
        rows.append(row_from_scores(name, scores, pick_chunks(len(data), max_chunks)))
    return rows


def restrict_row(row: EvalRow, data: Any, keep: np.ndarray, name: str) -> EvalRow:
    """``row`` over the chunks of the documents ``keep`` selects (``bool [D]``, ``data``'s
    document index order), without scoring again: e.g. only documents mostly unseen in
    training (``cir.data.overlap.document_shares``)."""
    index = data.documents() if hasattr(data, "documents") else None
    if index is None:
        raise ValueError(f"{row.name}: no document index to select documents by (rebuild the dataset)")
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(index),):
        raise ValueError(f"keep has shape {keep.shape}, the document index {len(index)} documents")
    sel = keep[index.of_chunks(row.chunk_index)]  # [C] scored chunks of kept documents
    tokens = row.chunk_tokens[sel]
    n = max(int(tokens.sum()), 1)
    return EvalRow(
        name=name,
        chunks=int(sel.sum()),
        tokens=int(tokens.sum()),
        tra=float((row.chunk_tra[sel].astype(np.float64) * tokens).sum() / n),
        tra_chunk_mean=float(row.chunk_tra[sel].astype(np.float64).mean()) if sel.any() else math.nan,
        loss=float((row.chunk_loss[sel].astype(np.float64) * tokens).sum() / n),
        chunk_loss=row.chunk_loss[sel],
        chunk_tra=row.chunk_tra[sel],
        chunk_tokens=tokens,
        chunk_index=row.chunk_index[sel],
    )


WORST_BY = ("tra", "errors")


def document_errors(
    row: EvalRow, data: Any, worst: int = 10, by: str = "tra"
) -> dict[str, Any] | None:
    """Where a row's reconstruction errors sit, by document (None without a document index).

    Per scored document: chunks, tokens, TRA pooled over its tokens and mean cross-entropy;
    the ``worst`` documents, and the share of all wrong tokens and of all tokens that they
    hold. ``by="tra"``: lowest TRA first (fewest correct tokens on ties), which finds the
    documents the compressor cannot read; ``by="errors"``: most wrong tokens first, the
    ``worst`` documents that hold the largest share of the errors (how concentrated they
    are). Only scored chunks count, so with ``max_chunks`` a document's figures cover the
    chunks drawn from it."""
    if by not in WORST_BY:
        raise ValueError(f"by must be one of {', '.join(WORST_BY)}, got {by!r}")
    index = data.documents() if hasattr(data, "documents") else None
    if index is None or len(row.chunk_index) == 0:
        return None
    doc = index.of_chunks(row.chunk_index)  # [C] document number of each scored chunk
    docs, inverse = np.unique(doc, return_inverse=True)
    tokens = np.bincount(inverse, weights=row.chunk_tokens).astype(np.int64)  # [D]
    correct = np.bincount(inverse, weights=row.chunk_tra.astype(np.float64) * row.chunk_tokens)
    correct = correct.round().astype(np.int64)
    loss = np.bincount(inverse, weights=row.chunk_loss.astype(np.float64) * row.chunk_tokens) / tokens
    chunks = np.bincount(inverse)
    tra = correct / tokens
    wrong = tokens - correct
    if by == "tra":
        order = np.lexsort((correct, tra))[:worst]  # lowest TRA first
    else:
        order = np.lexsort((-tokens, -wrong))[:worst]  # most wrong tokens first
    return {
        "by": by,
        "documents": len(docs),
        "tra_document_mean": float(tra.mean()),
        "worst": [{"id": index.ids[docs[i]], "chunks": int(chunks[i]), "tokens": int(tokens[i]),
                   "tra": float(tra[i]), "loss": float(loss[i])} for i in order],
        "worst_error_share": float(wrong[order].sum() / max(wrong.sum(), 1)),
        "worst_token_share": float(tokens[order].sum() / tokens.sum()),
    }


def auroc(in_domain: EvalRow, other: EvalRow) -> float:
    """AUROC of separating ``other`` (positive) from ``in_domain`` by per-chunk loss."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([in_domain.chunk_loss, other.chunk_loss])
    labels = np.concatenate([np.zeros(len(in_domain.chunk_loss)), np.ones(len(other.chunk_loss))])
    if len(in_domain.chunk_loss) == 0 or len(other.chunk_loss) == 0:
        raise ValueError("AUROC needs chunks on both sides")
    return float(roc_auc_score(labels, scores))


def auroc_table(rows: list[EvalRow], in_domain: str | None = None) -> dict[str, float]:
    """AUROC of every other row against the in-domain row (the first one by default)."""
    ref = next((r for r in rows if r.name == in_domain), None) if in_domain else rows[0]
    if ref is None:
        raise ValueError(f"no dataset named {in_domain!r}; have {[r.name for r in rows]}")
    return {r.name: auroc(ref, r) for r in rows if r is not ref}


def unigram_logprobs(data: Any, vocab_size: int, batch: int = 4096) -> np.ndarray:
    """Log-probabilities ``[V]`` of a unigram model of ``data``'s real tokens (add-one)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for start in range(0, len(data), batch):
        ids, mask = data.get_batch(np.arange(start, min(len(data), start + batch)))
        counts += np.bincount(ids[mask.bool()].numpy(), minlength=vocab_size)
    return np.log(counts / counts.sum())


def unigram_chunk_loss(
    logp: np.ndarray, data: Any, max_chunks: int | None = None, batch: int = 4096
) -> np.ndarray:
    """Per-chunk mean cross-entropy of ``data`` under ``logp``, for the same chunks (and
    in the same order) as ``score_dataset``; chunks without tokens are dropped as there."""
    idx = pick_chunks(len(data), max_chunks)
    out = []
    for start in range(0, len(idx), batch):
        ids, mask = data.get_batch(idx[start : start + batch])
        m = mask.bool().numpy()  # [B, T]
        n = m.sum(1)
        nll = np.where(m, -logp[ids.numpy()], 0.0).sum(1)
        out.append(nll[n > 0] / n[n > 0])
    return np.concatenate(out) if out else np.zeros(0)


def unigram_auroc_table(
    rows: list[EvalRow], datasets: dict[str, Any], train_data: Any, vocab_size: int,
    max_chunks: int | None = None,
) -> dict[str, float]:
    """The same AUROC table with a baseline score: each chunk's cross-entropy under a
    unigram model of the in-domain (first) dataset's training split. A compressor earns
    its keep as a router where its AUROC beats this bag-of-tokens one."""
    logp = unigram_logprobs(train_data, vocab_size)
    return _rescored_auroc_table(rows, datasets,
                                 lambda data: unigram_chunk_loss(logp, data, max_chunks))


def _rescored_auroc_table(rows: list[EvalRow], datasets: dict[str, Any],
                          chunk_loss: Callable[[Any], np.ndarray]) -> dict[str, float]:
    """``auroc_table`` of ``rows`` with each row's chunk losses replaced by a baseline's,
    ``chunk_loss(dataset)`` (aligned with the rows' chunks)."""
    return auroc_table([dataclasses.replace(r, chunk_loss=chunk_loss(datasets[r.name]))
                        for r in rows])


def token_bags(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> Any:
    """Token counts ``[N, V]`` of each chunk's real tokens (a sparse CSR matrix), one row
    per chunk of ``ids, mask [N, T]``, empty chunks included."""
    import scipy.sparse as sp

    m = mask.bool().numpy()
    rows, cols = np.nonzero(m)
    return sp.csr_matrix((np.ones(len(rows)), (rows, ids.numpy()[rows, cols])),
                         shape=(m.shape[0], vocab_size))


def chunk_bags(data: Any, vocab_size: int, max_chunks: int | None = None,
               batch: int = 4096) -> Any:
    """Token counts ``[N, V]`` (a sparse CSR matrix) of ``data``'s chunks: the same chunks,
    in the same order, as ``score_dataset`` (chunks without tokens are dropped as there)."""
    import scipy.sparse as sp

    idx = pick_chunks(len(data), max_chunks)
    parts = []
    for start in range(0, len(idx), batch):
        ids, mask = data.get_batch(idx[start : start + batch])
        keep = mask.bool().any(1)  # chunks with tokens
        parts.append(token_bags(ids[keep], mask[keep], vocab_size))
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, vocab_size))


@dataclass
class TopicModel:
    """A bag-of-tokens compressor: latent Dirichlet allocation with ``n_topics`` topics,
    fitted on the in-domain training chunks. Encoding a chunk infers its ``n_topics``
    weights; decoding mixes the topics' token distributions. It sees which tokens a chunk
    holds but never their order, so it is the ceiling of a compressor that has not yet
    learned order. With one topic it is the add-one unigram exactly."""

    lda: Any
    topics: np.ndarray  # [K, V] token distributions, rows sum to one

    @classmethod
    def fit(cls, train_data: Any, vocab_size: int, n_topics: int, seed: int = 0,
            max_iter: int = 10) -> TopicModel:
        from sklearn.decomposition import LatentDirichletAllocation

        if n_topics < 1:
            raise ValueError(f"a topic model needs at least one topic, got {n_topics}")
        # batch variational Bayes: deterministic for a seed, and with one topic the
        # topic-word posterior is exactly counts + 1 (topic_word_prior is 1 / n_topics)
        lda = LatentDirichletAllocation(n_topics, learning_method="batch", max_iter=max_iter,
                                        random_state=seed)
        lda.fit(chunk_bags(train_data, vocab_size))
        topics = lda.components_ / lda.components_.sum(1, keepdims=True)
        return cls(lda, topics)

    def chunk_loss(self, data: Any, max_chunks: int | None = None) -> np.ndarray:
        """Per-chunk mean cross-entropy of ``data``'s tokens under its own topic mixture
        (chunks aligned with ``score_dataset``'s)."""
        bags = chunk_bags(data, self.topics.shape[1], max_chunks)
        if bags.shape[0] == 0:
            return np.zeros(0)
        probs = self.lda.transform(bags) @ self.topics  # [N, V], every entry > 0
        nll = -np.asarray(bags.multiply(np.log(probs)).sum(1)).ravel()
        return nll / np.asarray(bags.sum(1)).ravel()


@dataclass
class UnigramMixture:
    """A bag-of-tokens compressor with a discrete bottleneck: ``n_clusters`` add-one
    unigrams of the training chunks, fitted by hard EM (each chunk to the unigram that
    gives it the highest likelihood, each unigram refitted on its chunks, until no chunk
    moves). A chunk's score is its mean cross-entropy under its best unigram, as a coded
    compressor's is under its best code. With one cluster it is the add-one unigram
    exactly; it never sees token order."""

    log_probs: np.ndarray  # [K, V] each cluster's log token distribution
    iterations: int  # EM rounds run

    @classmethod
    def fit_bags(cls, bags: Any, n_clusters: int, seed: int = 0,
                 max_iter: int = 50) -> UnigramMixture:
        """Fit on token counts ``bags`` (``[N, V]``, sparse or dense). Starts from
        ``n_clusters`` distinct chunks drawn with ``seed`` as the clusters' first members;
        a cluster left without chunks falls back to the add-one uniform."""
        import scipy.sparse as sp

        if n_clusters < 1:
            raise ValueError(f"a unigram mixture needs at least one cluster, got {n_clusters}")
        bags = sp.csr_matrix(bags, dtype=np.float64)
        n, vocab = bags.shape
        if n == 0:
            raise ValueError("a unigram mixture needs at least one training chunk")
        rng = np.random.default_rng(seed)
        first = rng.choice(n, size=min(n_clusters, n), replace=False)
        assign = np.full(n, -1)
        assign[first] = np.arange(len(first))
        log_probs = cls._refit(bags, assign, n_clusters)
        assign = np.full(n, -1)  # from the seeds' unigrams, every chunk chooses
        for it in range(1, max_iter + 1):
            new = np.asarray(bags @ log_probs.T).argmax(1)  # [N] the likeliest cluster
            if np.array_equal(new, assign):
                return cls(log_probs, it)
            assign = new
            log_probs = cls._refit(bags, assign, n_clusters)
        return cls(log_probs, max_iter)

    @classmethod
    def fit(cls, train_data: Any, vocab_size: int, n_clusters: int, seed: int = 0,
            max_iter: int = 50) -> UnigramMixture:
        return cls.fit_bags(chunk_bags(train_data, vocab_size), n_clusters, seed, max_iter)

    @staticmethod
    def _refit(bags: Any, assign: np.ndarray, n_clusters: int) -> np.ndarray:
        onehot = np.zeros((n_clusters, len(assign)))
        member = assign >= 0
        onehot[assign[member], np.nonzero(member)[0]] = 1.0
        counts = 1.0 + np.asarray((bags.T @ onehot.T).T)  # [K, V] add-one counts
        return np.log(counts / counts.sum(1, keepdims=True))

    def bag_loss(self, bags: Any) -> np.ndarray:
        """Mean cross-entropy ``[N]`` of each bag under its best cluster (NaN for an empty
        bag)."""
        import scipy.sparse as sp

        bags = sp.csr_matrix(bags, dtype=np.float64)
        n_tokens = np.asarray(bags.sum(1)).ravel()
        best = np.asarray(bags @ self.log_probs.T).max(1) if bags.shape[0] else np.zeros(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_tokens > 0, -best / n_tokens, np.nan)

    def chunk_loss(self, data: Any, max_chunks: int | None = None) -> np.ndarray:
        """Per-chunk scores of ``data``, aligned with ``score_dataset``'s chunks."""
        return self.bag_loss(chunk_bags(data, self.log_probs.shape[1], max_chunks))


def topic_auroc_table(
    rows: list[EvalRow], datasets: dict[str, Any], train_data: Any, vocab_size: int,
    n_topics: int, max_chunks: int | None = None, seed: int = 0,
) -> dict[str, float]:
    """The AUROC table scored by a ``TopicModel`` of the in-domain training split (the
    unigram baseline is its one-topic case): how far a bag-of-tokens compressor that
    adapts to its input through ``n_topics`` weights separates the rows."""
    model = TopicModel.fit(train_data, vocab_size, n_topics, seed=seed)
    return _rescored_auroc_table(rows, datasets, lambda data: model.chunk_loss(data, max_chunks))


def cluster_auroc_table(
    rows: list[EvalRow], datasets: dict[str, Any], train_data: Any, vocab_size: int,
    n_clusters: int, max_chunks: int | None = None, seed: int = 0,
) -> dict[str, float]:
    """The AUROC table scored by a ``UnigramMixture`` of ``n_clusters`` unigrams of the
    in-domain training split: a bag-of-tokens compressor with a discrete bottleneck, as a
    coded compressor (``n_codes``) is."""
    model = UnigramMixture.fit(train_data, vocab_size, n_clusters, seed=seed)
    return _rescored_auroc_table(rows, datasets, lambda data: model.chunk_loss(data, max_chunks))


def rows_to_markdown(
    rows: list[EvalRow],
    aurocs: dict[str, float] | None = None,
    unigram: dict[str, float] | None = None,
    bags: dict[str, dict[str, float]] | None = None,
) -> str:
    """The TRA table as Markdown (AUROC vs the in-domain row, and the unigram's and other
    bag-of-tokens baselines', ``bags``, keyed by their column's name, when given)."""
    head = "| dataset | chunks | tokens | TRA (tokens) | TRA (chunk mean) | CE loss |"
    sep = "|---|---:|---:|---:|---:|---:|"
    extra = [(t, a) for t, a in (("AUROC vs ID", aurocs), ("AUROC unigram", unigram))
             if a is not None]
    extra += [(f"AUROC {label}", a) for label, a in (bags or {}).items()]
    for title, _ in extra:
        head, sep = head + f" {title} |", sep + "---:|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r.name} | {r.chunks} | {r.tokens} | {100 * r.tra:.2f}% | "
                f"{100 * r.tra_chunk_mean:.2f}% | {r.loss:.3f} |")
        for _, a in extra:
            line += f" {a[r.name]:.4f} |" if r.name in a else " - |"
        lines.append(line)
    return "\n".join(lines)


def latents_of(model: Compressor, data: Any, max_chunks: int | None = None) -> torch.Tensor:
    """Latents ``[N, L, D]`` of a dataset's chunks (for plots and nearest neighbours)."""
    idx = pick_chunks(len(data), max_chunks)
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), 64):
            ids, mask = data.get_batch(idx[start : start + 64])
            out.append(model.eval().encode(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)  # [N, L, D]
