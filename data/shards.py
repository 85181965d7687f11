"""Chunk datasets on disk: build them from a source, open them as memmaps.

A dataset is a directory::

    manifest.json     name, source, seq_len, vocab_size, dtype, tokenizer sha256,
                      per split: documents, tokens, chunks, bytes; skipped files by reason;
                      warnings (e.g. an empty val or test split)
    tokenizer.json    the tokenizer the ids come from
    <split>.bin       uint16 (uint32 for vocabularies over 65536) ids, [N, seq_len], row-major
    <split>.len       int32 real tokens per chunk, [N] (padding is at the tail)
    <split>.docs.jsonl  per-document chunking only: one line per document in chunk order,
                      {"id": document id, "chunks": its number of chunks}; datasets built
                      without it read as before, only without a document index

Default chunking is per document: a chunk never mixes two documents, so each chunk has
one domain (routing scores chunks). ``pack=True`` instead concatenates documents with an
EOS between them and cuts full chunks (no padding except a split's last chunk), the usual
layout for LM training. Builds stream documents and append to the shard files, so memory
is bounded; they happen in a temporary directory renamed into place at the end, so an
interrupted build never leaves a directory that reads as a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cir.data.chunking import DEFAULT_SEQ_LEN, chunk_ids, encode_many
from cir.data.sources import Document, SkipStats, iter_documents
from cir.data.split import SPLITS, split_of
from cir.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_ID,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from tokenizers import Tokenizer

from cir.paths import datasets_dir

FORMAT_VERSION = 1
DOCS_SUFFIX = ".docs.jsonl"
ENCODE_BATCH = 256
BATCH_CHARS = 4 * 2**20
TOKENIZER_TRAIN_BYTES = 64 * 2**20
TRAIN_BYTES_PER_TOKEN = 4  # about what a trained 8K BPE gives on code and prose: the text the budget encodes


def ids_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _spec_str(source: Any) -> str | list[str]:
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    return str(source)


# --------------------------------------------------------------------------- writing


@dataclass
class SplitWriter:
    """Appends chunks of one split to ``<split>.bin`` / ``<split>.len``."""

    root: Path
    split: str
    seq_len: int
    dtype: np.dtype
    pack: bool
    documents: int = 0
    tokens: int = 0
    chunks: int = 0
    bytes: int = 0
    _buffer: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0

    def __post_init__(self) -> None:
        self._bin = open(self.root / f"{self.split}.bin", "wb")  # noqa: SIM115 - closed in close()
        self._len = open(self.root / f"{self.split}.len", "wb")  # noqa: SIM115
        # per-document chunking: which chunks came from which document (packed chunks mix them)
        self._docs = None if self.pack else open(  # noqa: SIM115
            self.root / f"{self.split}{DOCS_SUFFIX}", "w", encoding="utf-8")

    def add(self, text_bytes: int, ids: np.ndarray, doc_id: str = "") -> None:
        self.documents += 1
        self.tokens += len(ids)
        self.bytes += text_bytes
        if self._docs is not None:
            chunks, lengths = chunk_ids(ids, self.seq_len, self.dtype)
            self._write(chunks, lengths)
            self._docs.write(json.dumps({"id": doc_id, "chunks": len(chunks)}) + "\n")
            return
        self._buffer.append(np.append(ids, EOS_ID).astype(np.int64))
        self._buffered += len(ids) + 1
        if self._buffered >= self.seq_len:
            self._flush_packed(final=False)

    def _flush_packed(self, final: bool) -> None:
        stream = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.int64)
        keep = len(stream) if final else len(stream) // self.seq_len * self.seq_len
        if keep:
            self._write(*chunk_ids(stream[:keep], self.seq_len, self.dtype))
        rest = stream[keep:]
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._len.write(lengths.astype(np.int32).tobytes())
        self.chunks += len(ids)

    def close(self) -> dict[str, int]:
        if self.pack:
            self._flush_packed(final=True)
        self._bin.close()
        self._len.close()
        if self._docs is not None:
            self._docs.close()
        return {"documents": self.documents, "tokens": self.tokens, "chunks": self.chunks, "bytes": self.bytes}


def _batches(docs: Iterable[Document], size: int, max_chars: int) -> Iterator[list[Document]]:
    """Groups of up to ``size`` documents and about ``max_chars`` characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(tok: Tokenizer, batch: list[Document]) -> list[np.ndarray]:
    """Ids of each document; long ones piecewise, so one Encoding never holds megabytes."""
    return encode_many(tok, [doc.text for doc in batch])


def _dedup(docs: Iterable[Document], stats: SkipStats) -> Iterator[Document]:
    """Drop exact duplicate texts (vendored copies): one text must not sit in two splits."""
    seen: set[bytes] = set()
    for doc in docs:
        key = hashlib.blake2b(doc.text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key in seen:
            stats.add("duplicate", doc.id)
            continue
        seen.add(key)
        yield doc


ProgressFn = Callable[[dict[str, Any]], None]


def _train_texts(
    source: Any, strict: bool, max_bytes: int, max_file_bytes: int, on_progress: ProgressFn | None,
    exclude: tuple[Path, ...] = (),
) -> Iterator[str]:
    """Texts of the train split, up to ``max_bytes``, for training the tokenizer."""
    total = documents = 0
    docs = iter_documents(source, SkipStats(), strict, max_file_bytes, exclude=exclude)
    for doc in _dedup(docs, SkipStats()):
        if split_of(doc.id) != "train":
            continue
        yield doc.text
        total += len(doc.text.encode("utf-8", "surrogatepass"))
        documents += 1
        if on_progress is not None and documents % ENCODE_BATCH == 0:
            on_progress({"phase": "tokenizer", "documents": documents, "bytes": total})
        if total >= max_bytes:
            return


def _resolve_tokenizer(
    tmp: Path, source: Any, tokenizer: str | os.PathLike | None, vocab_size: int,
    max_tokens: int | None, strict: bool, max_file_bytes: int, on_progress: ProgressFn | None,
    exclude: tuple[Path, ...] = (),
) -> Tokenizer:
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        cap = TOKENIZER_TRAIN_BYTES if max_tokens is None else min(TOKENIZER_TRAIN_BYTES, TRAIN_BYTES_PER_TOKEN * max_tokens)
        texts = _train_texts(source, strict, cap, max_file_bytes, on_progress, exclude)
        tok = train_tokenizer(texts, vocab_size)
    save_tokenizer(tok, tmp / "tokenizer.json")
    return tok


def _encode_all(
    tok: Tokenizer, docs: Iterable[Document], writers: dict[str, SplitWriter],
    max_tokens: int | None, on_progress: ProgressFn | None,
) -> bool:
    """Encode and write every document; True when the train budget stopped the stream."""
    for batch in _batches(docs, ENCODE_BATCH, BATCH_CHARS):
        for doc, ids in zip(batch, _encode_batch(tok, batch), strict=True):
            writers[split_of(doc.id)].add(len(doc.text.encode("utf-8", "surrogatepass")), ids, doc.id)
            if max_tokens is not None and writers["train"].tokens >= max_tokens:
                break
        if on_progress is not None:
            on_progress(_progress_counts(writers))
        if max_tokens is not None and writers["train"].tokens >= max_tokens:
            return True
    return False


def _progress_counts(writers: dict[str, SplitWriter]) -> dict[str, Any]:
    return {
        "phase": "encode",
        "documents": sum(w.documents for w in writers.values()),
        "tokens": sum(w.tokens for w in writers.values()),
        "train_tokens": writers["train"].tokens,
    }


def build_dataset(
    out_dir: str | os.PathLike,
    source: Any,
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    pack: bool = False,
    strict: bool = False,
    max_file_bytes: int = 8 * 2**20,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Build a chunk dataset from ``source`` into ``out_dir``; returns its manifest.

    ``tokenizer`` is a tokenizer.json path; without one a byte-level BPE of ``vocab_size``
    is trained on the train split. ``max_tokens`` stops once the train split has that many
    tokens. ``overwrite`` replaces a dataset or an empty folder, nothing else. ``name`` is
    the manifest's name (default: ``out_dir``'s folder name). See the module docstring for
    the layout.
    """
    out = Path(out_dir)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max-tokens must be >= 1, got {max_tokens}")
    _check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest = _build_into(
            tmp, name or out.name, source, tokenizer, vocab_size, seq_len, max_tokens, pack, strict,
            max_file_bytes, on_progress, exclude=(tmp, out),
        )
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build_into(
    tmp: Path, name: str, source: Any, tokenizer: Any, vocab_size: int, seq_len: int,
    max_tokens: int | None, pack: bool, strict: bool, max_file_bytes: int,
    on_progress: ProgressFn | None, exclude: tuple[Path, ...] = (),
) -> dict[str, Any]:
    # the build's own folders (in progress, and the dataset it replaces) may sit inside a
    # source folder: never read them as documents
    tok = _resolve_tokenizer(
        tmp, source, tokenizer, vocab_size, max_tokens, strict, max_file_bytes, on_progress, exclude
    )
    vocab = tok.get_vocab_size()
    dtype = ids_dtype(vocab)
    stats = SkipStats()
    writers = {s: SplitWriter(tmp, s, seq_len, dtype, pack) for s in SPLITS}
    docs = _dedup(iter_documents(source, stats, strict, max_file_bytes, exclude=exclude), stats)
    try:
        truncated = _encode_all(tok, docs, writers, max_tokens, on_progress)
    finally:
        splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["documents"] == 0:
        raise ValueError(f"source {source!r} gave no training documents ({stats.total} files skipped: {dict(stats.counts)})")
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": _spec_str(source),
        "seq_len": seq_len,
        "vocab_size": vocab,
        "dtype": dtype.name,
        "pack": pack,
        "tokenizer_sha256": tokenizer_hash(tmp / "tokenizer.json"),
        "max_tokens": max_tokens,
        "truncated": truncated,
        "splits": splits,
        "skipped": stats.to_dict(),
        "warnings": _split_warnings(splits),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _split_warnings(splits: dict[str, dict[str, int]]) -> list[str]:
    """An empty val or test split builds (train is what a build must have), but every
    held-out figure of it would be missing: say so rather than build it silently."""
    total = sum(s["documents"] for s in splits.values())
    return [
        f"the {split} split has no documents ({total} in all; about 5% of them go to each of "
        "val and test): held-out figures will be missing; use a larger source"
        for split in ("val", "test") if splits[split]["documents"] == 0
    ]


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is a dataset or an empty folder."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"dataset already exists: {out} (pass overwrite to replace it)")
    if not out.is_dir():
        raise FileExistsError(f"{out} is not a folder: overwrite replaces only a dataset")
    if not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not a dataset (no manifest.json) and not empty: "
                              "overwrite replaces only a dataset")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished build into place; an old dataset goes only once the new one is there."""
    old = None
    _check_replaceable(out, overwrite)  # again: it may have appeared while we were building
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None and old.is_symlink():  # a link to the old dataset: the link goes
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading

MANIFEST_KEYS = ("name", "source", "seq_len", "vocab_size", "dtype", "pack", "tokenizer_sha256",
                 "truncated", "splits", "skipped", "created_at")
SPLIT_FIELDS = ("documents", "tokens", "chunks", "bytes")
ID_DTYPES = ("uint16", "uint32")


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """``root/manifest.json``, checked: ValueError naming the file when it is not JSON, not
    of this format or not the shape a build writes (a torn or hand-edited manifest)."""
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"{path}: not a dataset manifest ({e}); rebuild the dataset") from None
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: dataset format {manifest.get('format_version')} != {FORMAT_VERSION}, rebuild it")
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ValueError(f"{path}: not a dataset manifest ({problem}); rebuild the dataset")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: Any) -> str | None:
    """What the readers would trip on in ``manifest``, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        return f"no {', '.join(missing)}"
    if not all(_is_count(manifest[key]) and manifest[key] > 0 for key in ("seq_len", "vocab_size")):
        return "seq_len and vocab_size must be positive integers"
    if manifest["dtype"] not in ID_DTYPES:
        return f"dtype {manifest['dtype']!r} is not one of {', '.join(ID_DTYPES)}"
    if not isinstance(manifest["skipped"], dict) or not isinstance(manifest["skipped"].get("counts"), dict):
        return "skipped has no counts"
    return _splits_problem(manifest["splits"])


def _splits_problem(splits: Any) -> str | None:
    """What is missing from ``splits`` (each of train, val, test with its counts), or None."""
    for split in SPLITS:
        stats = splits.get(split) if isinstance(splits, dict) else None
        if stats is None:
            return f"no splits.{split}"
        if not isinstance(stats, dict) or not all(_is_count(stats.get(f)) for f in SPLIT_FIELDS):
            return f"splits.{split} must hold {', '.join(SPLIT_FIELDS)} as integers"
    return None


def shard_problems(root: str | os.PathLike, split: str, manifest: dict[str, Any]) -> list[str]:
    """``"<path>: what is wrong"`` for each of the split's shard files whose size is not
    what ``manifest`` says (deleted, truncated, or another build's); empty when they fit."""
    chunks = manifest["splits"][split]["chunks"]
    row_bytes = manifest["seq_len"] * np.dtype(manifest["dtype"]).itemsize
    expected = {f"{split}.bin": chunks * row_bytes, f"{split}.len": chunks * np.dtype(np.int32).itemsize}
    problems = []
    for file_name, size in expected.items():
        path = Path(root) / file_name
        actual = path.stat().st_size if path.is_file() else None
        if actual is None:
            problems.append(f"{path}: missing")
        elif actual != size:
            problems.append(f"{path}: {actual} bytes, manifest says {size}")
    return problems


@dataclass(frozen=True)
class DocumentIndex:
    """Which document each chunk of a split came from: document ``d`` holds chunks
    ``starts[d]:starts[d + 1]`` (``starts [D + 1]``; a document without tokens has none)."""

    ids: list[str]
    starts: np.ndarray  # int64 [D + 1]

    @classmethod
    def read(cls, path: Path, n_chunks: int) -> DocumentIndex:
        ids, counts = [], []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    ids.append(str(row["id"]))
                    counts.append(int(row["chunks"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_no}: not a document index line ({e})") from None
        starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if starts[-1] != n_chunks or (len(counts) and min(counts) < 0):
            raise ValueError(f"{path}: indexes {starts[-1]} chunks, the split has {n_chunks}")
        return cls(ids, starts)

    @classmethod
    def concat(cls, parts: list[DocumentIndex]) -> DocumentIndex:
        starts, offset = [np.zeros(1, np.int64)], 0
        for part in parts:
            starts.append(part.starts[1:] + offset)
            offset += int(part.starts[-1])
        return cls([i for part in parts for i in part.ids], np.concatenate(starts))

    def __len__(self) -> int:
        return len(self.ids)

    def of_chunks(self, chunk_index: Any) -> np.ndarray:
        """Document number of each chunk index, ``int64 [B]``."""
        idx = np.asarray(chunk_index, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.starts[-1]):
            raise IndexError(f"chunk index out of range for {self.starts[-1]} chunks")
        return np.searchsorted(self.starts, idx, side="right") - 1


def _chunk_info(index: DocumentIndex | None, i: int) -> dict[str, Any]:
    if index is None:
        return {}
    d = int(index.of_chunks([i])[0])
    return {"source": index.ids[d], "part": int(i - index.starts[d])}


class ChunkDataset:
    """One split of a built dataset: zero-copy memmap ids ``[N, T]`` and lengths ``[N]``."""

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        self.split = split
        self.manifest: dict[str, Any] = read_manifest(self.root)
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        problems = shard_problems(self.root, split, self.manifest)
        if problems:
            raise ValueError(f"{problems[0]}; rebuild the dataset")
        n = self.manifest["splits"][split]["chunks"]
        dtype = np.dtype(self.manifest["dtype"])
        if n:
            self.ids = np.memmap(self.root / f"{split}.bin", dtype=dtype, mode="r", shape=(n, self.seq_len))  # [N, T]
        else:
            self.ids = np.zeros((0, self.seq_len), dtype=dtype)
        self.lengths = np.fromfile(self.root / f"{split}.len", dtype=np.int32)  # [N]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def documents(self) -> DocumentIndex | None:
        """The split's document index; None for packed datasets and ones built without it.
        Read once per opened split."""
        if not hasattr(self, "_documents"):
            path = self.root / f"{self.split}{DOCS_SUFFIX}"
            self._documents = DocumentIndex.read(path, len(self)) if path.is_file() else None
        return self._documents

    def chunk_info(self, i: int) -> dict[str, Any]:
        """Where chunk ``i`` came from: ``{"source": document id, "part": k}`` (its k-th
        chunk), or ``{}`` without a document index."""
        return _chunk_info(self.documents(), i)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # pickled by path (e.g. to DataLoader workers): re-mapped, never copied
        return (type(self), (str(self.root), self.split))

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return f"ChunkDataset({str(self.root)!r}, split={self.split!r}, chunks={len(self)}, seq_len={self.seq_len})"

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` LongTensor ``[B, T]`` and ``mask`` BoolTensor ``[B, T]`` (True = real token)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        ids = torch.from_numpy(self.ids[idx].astype(np.int64))  # [B, T]
        lengths = torch.from_numpy(self.lengths[idx].astype(np.int64))  # [B]
        mask = torch.arange(self.seq_len)[None, :] < lengths[:, None]  # [B, T]
        return ids, mask


class ConcatChunks:
    """Chunk datasets end to end, as one (chunk ``i`` of the second follows the first's
    last): several corpora trained on together, or the splits of one. They must share
    ``seq_len``, vocabulary and tokenizer; ``root`` and ``manifest`` are the first's."""

    def __init__(self, parts: list[Any], split: str | None = None) -> None:
        if not parts:
            raise ValueError("ConcatChunks needs at least one dataset")
        first = parts[0]
        for part in parts[1:]:
            if (part.seq_len, part.vocab_size) != (first.seq_len, first.vocab_size):
                raise ValueError(
                    f"cannot join {_label(part)} (seq_len {part.seq_len}, vocab {part.vocab_size}) "
                    f"to {_label(first)} (seq_len {first.seq_len}, vocab {first.vocab_size})"
                )
            if part.manifest.get("tokenizer_sha256") != first.manifest.get("tokenizer_sha256"):
                raise ValueError(f"cannot join {_label(part)} to {_label(first)}: built with different tokenizers")
        self.parts = list(parts)
        self.split = split if split is not None else first.split
        self.root, self.manifest = first.root, first.manifest
        self.seq_len, self.vocab_size = first.seq_len, first.vocab_size
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # [len(parts) + 1]

    @property
    def tokenizer_path(self) -> Path | None:
        return self.parts[0].tokenizer_path

    def documents(self) -> DocumentIndex | None:
        """The parts' document indexes end to end (None if one is missing)."""
        if not hasattr(self, "_documents"):
            parts = [p.documents() for p in self.parts]
            self._documents = None if any(p is None for p in parts) else DocumentIndex.concat(parts)
        return self._documents

    def chunk_info(self, i: int) -> dict[str, Any]:
        """As ``ChunkDataset.chunk_info``, over the joined parts."""
        return _chunk_info(self.documents(), i)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(_label(p) for p in self.parts)}, chunks={len(self)})"

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"chunk index out of range for {len(self)} chunks")
        part = np.searchsorted(self.offsets, idx, side="right") - 1  # [B] which part
        ids = torch.zeros(len(idx), self.seq_len, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(idx), self.seq_len, dtype=torch.bool)  # [B, T]
        for p, ds in enumerate(self.parts):
            sel = np.nonzero(part == p)[0]
            if len(sel):
                ids[sel], mask[sel] = ds.get_batch(idx[sel] - self.offsets[p])
        return ids, mask


def join_chunks(parts: list[Any], split: str | None = None) -> Any:
    """One dataset for ``parts``: the dataset itself when there is one, else their
    ``ConcatChunks``."""
    return parts[0] if len(parts) == 1 else ConcatChunks(parts, split)


def _label(ds: Any) -> str:
    return f"{getattr(ds, 'root', ds.manifest.get('name', '?'))}:{ds.split}"


class AllSplits(ConcatChunks):
    """Every chunk of a built dataset, train then val then test, as one dataset (split
    ``"all"``): for scoring a corpus a model never trained on, where every chunk is fair."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__([ChunkDataset(root, s) for s in SPLITS], split="all")


class RandomChunks:
    """Uniform random token ids in ``[2, vocab_size)`` (no pad/eos): the full-OOD set."""

    def __init__(
        self, split: str = "test", seq_len: int = DEFAULT_SEQ_LEN, vocab_size: int = DEFAULT_VOCAB_SIZE,
        n_chunks: int = 1024, seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        if vocab_size < 3 or seq_len < 1 or n_chunks < 0:
            raise ValueError("need vocab_size >= 3, seq_len >= 1, n_chunks >= 0")
        self.split, self.seq_len, self.vocab_size = split, seq_len, vocab_size
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        self.ids = rng.integers(2, vocab_size, size=(n_chunks, seq_len)).astype(ids_dtype(vocab_size))  # [N, T]
        self.lengths = np.full(n_chunks, seq_len, dtype=np.int32)  # [N]
        self.tokenizer_path: Path | None = None
        self.manifest: dict[str, Any] = {
            "name": "random", "source": "random", "seq_len": seq_len, "vocab_size": vocab_size,
            "seed": seed, "splits": {split: {"documents": 0, "tokens": n_chunks * seq_len, "chunks": n_chunks}},
        }

    def __len__(self) -> int:
        return len(self.lengths)

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        ids = torch.from_numpy(self.ids[idx].astype(np.int64))  # [B, T]
        return ids, torch.ones_like(ids, dtype=torch.bool)


def resolve_dataset(name_or_path: str | os.PathLike) -> Path:
    """A dataset directory: a path holding manifest.json, or a name under ``datasets_dir()``."""
    path = Path(name_or_path).expanduser()
    for candidate in (path, datasets_dir() / str(name_or_path)):
        if (candidate / "manifest.json").is_file():
            return candidate
    if str(name_or_path) == "random":
        raise FileNotFoundError("'random' is the uniform random-token evaluation set, generated on "
                                "the fly: it has no files to show")
    known = sorted(p.name for p in datasets_dir().glob("*") if (p / "manifest.json").is_file()) if datasets_dir().is_dir() else []
    raise FileNotFoundError(
        f"no dataset '{name_or_path}' (looked for a directory with manifest.json and under {datasets_dir()}); "
        f"available: {', '.join(known) or 'none'}, or 'random'"
    )


def open_dataset(
    name_or_path: str | os.PathLike, split: str = "train", **random_kwargs: Any
) -> ChunkDataset | AllSplits | RandomChunks:
    """Open one split of a dataset by name or path, or ``"all"`` of them (``AllSplits``);
    ``"random"`` takes seq_len, vocab_size, n_chunks, seed (and has no ``"all"``)."""
    if str(name_or_path) == "random":
        return RandomChunks(split, **random_kwargs)
    if random_kwargs:
        raise TypeError(f"options {sorted(random_kwargs)} apply only to the 'random' dataset")
    if split == "all":
        return AllSplits(resolve_dataset(name_or_path))
    return ChunkDataset(resolve_dataset(name_or_path), split)


def list_datasets() -> list[str]:
    root = datasets_dir()
    return sorted(p.name for p in root.glob("*") if (p / "manifest.json").is_file()) if root.is_dir() else []


def dataset_summary(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The manifest plus derived figures: bytes per token per split and over val+test;
    ``damaged`` lists shard files that do not match the manifest (empty when all do), since
    the figures describe what was built, not what is still on disk."""
    root = resolve_dataset(name_or_path)
    manifest = read_manifest(root)
    manifest["damaged"] = [p for s in SPLITS for p in shard_problems(root, s, manifest)]
    manifest.setdefault("warnings", [])  # manifests from before warnings were recorded
    seq_len = manifest["seq_len"]
    manifest["splits"] = {s: manifest["splits"][s] for s in SPLITS}  # only the checked ones
    for stats in manifest["splits"].values():
        stats["bytes_per_token"] = stats["bytes"] / stats["tokens"] if stats["tokens"] else None
        slots = stats["chunks"] * seq_len
        stats["fill"] = (stats["tokens"] + (stats["documents"] if manifest["pack"] else 0)) / slots if slots else None
    held = [manifest["splits"][s] for s in ("val", "test")]
    held_tokens = sum(s["tokens"] for s in held)
    manifest["heldout_bytes_per_token"] = sum(s["bytes"] for s in held) / held_tokens if held_tokens else None
    # per-document datasets built before the index read fine without it
    manifest["document_index"] = all((root / f"{s}{DOCS_SUFFIX}").is_file() for s in SPLITS)
    manifest["path"] = str(root)
    return manifest


def sample_chunks(name_or_path: str | os.PathLike, split: str = "val", n: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chunks of a split drawn at random, decoded back to text, to see what was built;
    ``document`` is the id of the document a chunk came from (None without an index)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ds = ChunkDataset(resolve_dataset(name_or_path), split)
    tok = load_tokenizer(ds.tokenizer_path)
    picks = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
    out = []
    for i in sorted(int(p) for p in picks):
        length = int(ds.lengths[i])
        text = tok.decode([int(t) for t in ds.ids[i, :length]], skip_special_tokens=False)
        out.append({"index": i, "length": length, "document": ds.chunk_info(i).get("source"),
                    "text": text})
    return out
