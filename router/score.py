"""Score files: tokenize with the registry tokenizer, chunk, route every chunk.

What happens to each kind of input (``FileReport.status`` / ``reason``):

============================  ===========================================================
input                         outcome
============================  ===========================================================
missing path                  ``error``, ``not found``
symlink loop                  ``error``, ``unreadable: symlink loop``
unreadable (permissions, ...)  ``error``, ``unreadable: <why>``
directory                     ``skipped``, ``directory`` (pass its files, e.g. ``dir/*``)
empty file (0 bytes)          ``skipped``, ``empty``
whitespace only               ``skipped``, ``whitespace only``
binary (NUL in first 8 KiB)   ``skipped``, ``binary``
not valid UTF-8 (Latin-1, a   scored: decoded with U+FFFD replacement, and a warning
stray byte in the middle)     ``not valid UTF-8 ...`` says where the first bad byte is
shorter than one chunk        scored: one chunk, the tail padded and masked
huge file                     scored: streamed a few MiB at a time (bounded memory);
                              only per-chunk scores (a few numbers per 512 tokens) are kept
``-``, a pipe, a FIFO, a       read once (no size to check), copied to a temp file as it
device (``<(cmd)``,            is sniffed, then as a file: binary stops the read at once
``/dev/stdin``)               (``/dev/zero``, ``/dev/urandom``); more than
                              ``STREAM_MAX_BYTES`` is ``skipped``, ``too large ...``
============================  ===========================================================

One bad file never stops the others; the caller decides the exit status (the CLI fails
only when no file could be scored).
"""

from __future__ import annotations

import codecs
import errno
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from cir.router.routing import Routable, RouteResult, route_chunks, seq_len_of

# A file the registry tokenizer packs into fewer than this share of the bytes per token it
# reaches on every expert's held-out text is unlike all of them (random characters, a
# script the tokenizer never saw): warned about, whatever the compressors say.
DENSITY_WARN_RATIO = 0.5
SNIFF_BYTES = 8192
READ_BYTES = 4 * 2**20
STDIN = "-"
STREAM_MAX_BYTES = 2**30  # what a pipe or device may hold (it is spooled to a temp file)


@dataclass
class FileReport:
    """The outcome of scoring one input: ``ok`` (with ``result``), ``skipped`` or ``error``."""

    path: str
    status: str
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    n_bytes: int | None = None
    result: RouteResult | None = None
    tokenizer_ood: bool = False  # the tokenizer packs it far worse than every domain

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self, per_chunk: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path, "status": self.status, "reason": self.reason,
            "warnings": self.warnings, "bytes": self.n_bytes, "tokenizer_ood": self.tokenizer_ood,
        }
        if self.result is not None:
            res = self.result
            out.update(
                n_chunks=len(res),
                n_tokens=int(res.n_tokens.sum()),
                decision=res.decision(),
                experts=res.expert_means(),
                thresholds=dict(zip(res.names, res.thresholds, strict=True)),
                loss_thresholds=dict(zip(res.names, res.loss_thresholds or [None] * len(res.names),
                                         strict=True)),
                segments=[s.__dict__ for s in res.segments()],
            )
            if per_chunk:
                out["chunks"] = res.chunk_records()
        return out


@dataclass
class _Sniff:
    """What a pass over the bytes found: binary, whitespace only, first invalid UTF-8."""

    n_bytes: int = 0
    binary: bool = False
    blank: bool = True
    bad_utf8_at: int | None = None


def sniff(blocks: Iterable[bytes]) -> _Sniff:
    """Classify a byte stream in one pass, in bounded memory."""
    info = _Sniff()
    strict = codecs.getincrementaldecoder("utf-8")(errors="strict")
    loose = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for block in blocks:
        if info.n_bytes < SNIFF_BYTES and b"\x00" in block[: SNIFF_BYTES - info.n_bytes]:
            info.binary = True
            return info
        if info.bad_utf8_at is None:
            carried = len(strict.getstate()[0])  # a character's first bytes from the last block
            try:
                text = strict.decode(block)
            except UnicodeDecodeError as exc:
                info.bad_utf8_at = info.n_bytes - carried + exc.start
                text = loose.decode(block)
        else:
            text = loose.decode(block)
        info.blank = info.blank and not text.strip()
        info.n_bytes += len(block)
    if info.bad_utf8_at is None:
        try:
            strict.decode(b"", final=True)
        except UnicodeDecodeError:
            info.bad_utf8_at = info.n_bytes - 1
    return info


def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            yield block


def _missing_reason(path: Path) -> str:
    """``exists()`` is False for a missing path and for a symlink loop: tell them apart."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "unreadable: symlink loop"
    return "not found"


def _verdict(info: _Sniff) -> tuple[str | None, list[str]]:
    """``(skip reason or None, warnings)`` for a sniffed input."""
    if info.binary:
        return "binary", []
    if info.n_bytes == 0:
        return "empty", []
    if info.blank:
        return "whitespace only", []
    if info.bad_utf8_at is not None:
        return None, [
            f"not valid UTF-8 (first bad byte at offset {info.bad_utf8_at}): "
            "decoded with U+FFFD replacement"
        ]
    return None, []


ChunkStream = Iterator[tuple[np.ndarray, np.ndarray]]


def _route_stream(
    experts: list[Routable], chunks: ChunkStream, temperature: float, batch_size: int | None
) -> RouteResult:
    parts = []
    for ids_np, lengths in chunks:
        ids = torch.from_numpy(ids_np.astype(np.int64))  # [n, T]
        mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]  # [n, T]
        parts.append(route_chunks(experts, ids, mask, temperature, batch_size))
    return RouteResult.cat(parts)


def _spool(src: BinaryIO, dst: BinaryIO) -> tuple[_Sniff, bool]:
    """Copy a stream into ``dst`` as it is sniffed: ``(what it holds, too large)``.

    Stops at the first binary block, or at ``STREAM_MAX_BYTES``."""
    over = False

    def blocks() -> Iterator[bytes]:
        nonlocal over
        total = 0
        while block := src.read(READ_BYTES):
            if total + len(block) > STREAM_MAX_BYTES:  # sniff the head, then stop
                over, block = True, block[: STREAM_MAX_BYTES - total]
            total += len(block)
            dst.write(block)
            yield block
            if over:
                return

    info = sniff(blocks())
    info.n_bytes = dst.tell()
    dst.flush()
    return info, over


def open_input(
    path: str | os.PathLike, stack: ExitStack, stdin: BinaryIO | None = None
) -> tuple[Path, _Sniff, list[str]] | FileReport:
    """``(file to chunk, what sniffing found, warnings)``, or the report of an input with
    nothing to score (missing, directory, binary, empty, unreadable, ...). ``"-"``, pipes
    and devices are read once into a temp file kept by ``stack``."""
    try:
        return _open_input(str(path), stack, stdin)
    except OSError as exc:
        return _unreadable(str(path), exc)


def read_chunks(
    path: str | os.PathLike,
    tokenizer: Any,
    seq_len: int,
    max_chunks: int | None = None,
    stdin: BinaryIO | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]] | FileReport:
    """The first ``max_chunks`` chunks (default all) of an input as ``ids, mask [N, T]``
    plus its warnings, or the report of an input with nothing to score, exactly as
    ``score`` classifies it. Only what those chunks need is read."""
    from cir.data.chunking import iter_text_chunks

    with ExitStack() as stack:
        opened = open_input(path, stack, stdin)
        if isinstance(opened, FileReport):
            return opened
        source, _, warnings = opened
        ids_parts, len_parts, n = [], [], 0
        try:
            for ids, lengths in iter_text_chunks(source, tokenizer, seq_len, READ_BYTES):
                ids_parts.append(ids)
                len_parts.append(lengths)
                n += len(ids)
                if max_chunks is not None and n >= max_chunks:
                    break
        except OSError as exc:
            return _unreadable(str(path), exc)
    ids = torch.from_numpy(np.concatenate(ids_parts)[:max_chunks])  # [N, T]
    lengths = torch.from_numpy(np.concatenate(len_parts)[:max_chunks].astype(np.int64))  # [N]
    return ids, torch.arange(ids.shape[1])[None] < lengths[:, None], warnings


def _unreadable(name: str, exc: OSError) -> FileReport:
    return FileReport(name, "error", f"unreadable: {exc.strerror or exc}")


def _open_input(
    name: str, stack: ExitStack, stdin: BinaryIO | None
) -> tuple[Path, _Sniff, list[str]] | FileReport:
    if name == STDIN:
        src = stdin or sys.stdin.buffer
    else:
        p = Path(name)
        if not p.exists():
            return FileReport(name, "error", _missing_reason(p))
        if p.is_dir():
            return FileReport(name, "skipped", "directory")
        if p.is_file():
            info = sniff(_file_blocks(p))
            if info.binary:  # the sniff stopped early: the size is the file's
                info.n_bytes = p.stat().st_size
            return _checked(name, p, info)
        src = stack.enter_context(open(p, "rb"))  # a pipe or device: st_size says nothing
    tmp = stack.enter_context(tempfile.NamedTemporaryFile(prefix="cir-score-"))
    info, over = _spool(src, tmp)
    if over and not info.binary:
        return FileReport(name, "skipped", f"too large: more than {STREAM_MAX_BYTES:,} bytes "
                          "from a pipe or device (save it to a file)", n_bytes=info.n_bytes)
    return _checked(name, Path(tmp.name), info)


def _checked(name: str, source: Path, info: _Sniff) -> tuple[Path, _Sniff, list[str]] | FileReport:
    skip, warnings = _verdict(info)
    if skip is not None:
        return FileReport(name, "skipped", skip, n_bytes=info.n_bytes)
    return source, info, warnings


def score_path(
    path: str | os.PathLike,
    experts: list[Routable],
    tokenizer: Any,
    temperature: float = 1.0,
    batch_size: int | None = None,
    stdin: BinaryIO | None = None,
) -> FileReport:
    """Score one file (``"-"`` = ``stdin``, default ``sys.stdin``); never raises for bad input."""
    from cir.data.chunking import iter_text_chunks

    name = str(path)
    seq_len = seq_len_of(experts)
    with ExitStack() as stack:
        opened = open_input(path, stack, stdin)
        if isinstance(opened, FileReport):
            return opened
        source, info, warnings = opened
        chunks = iter_text_chunks(source, tokenizer, seq_len, READ_BYTES)
        try:
            result = _route_stream(experts, chunks, temperature, batch_size)
        except OSError as exc:
            return _unreadable(name, exc)
    density = _density_warning(experts, info.n_bytes, int(result.n_tokens.sum()))
    return FileReport(name, "ok", None, warnings + density, info.n_bytes, result,
                      tokenizer_ood=bool(density))


def _density_warning(experts: list[Routable], n_bytes: int, n_tokens: int) -> list[str]:
    """A warning when the tokenizer packs this input far worse than every expert's text.

    A compressor trained for minutes reconstructs no better than a bag of tokens, and
    random printable characters (one common token each) can then look in-domain to it;
    the tokenizer's own compression still tells them apart."""
    ref = [bpt for e in experts if (bpt := getattr(e, "bytes_per_token", None))]
    if not ref or n_tokens == 0:
        return []
    here = n_bytes / n_tokens
    if here >= DENSITY_WARN_RATIO * min(ref):
        return []
    return [
        f"the tokenizer packs {here:.2f} bytes/token here, {min(ref):.2f}-{max(ref):.2f} on "
        "the experts' held-out text: unlike every domain (random characters, or a script "
        "the tokenizer never saw)"
    ]


def score_paths(
    paths: Iterable[str | os.PathLike],
    experts: list[Routable],
    tokenizer: Any,
    temperature: float = 1.0,
    batch_size: int | None = None,
    stdin: BinaryIO | None = None,
    on_file: Callable[[FileReport], None] | None = None,
) -> list[FileReport]:
    """Score many inputs; each gets a report, whatever happens to the others."""
    reports = []
    for path in paths:
        report = score_path(path, experts, tokenizer, temperature, batch_size, stdin)
        reports.append(report)
        if on_file is not None:
            on_file(report)
    return reports


def score_text(
    text: str,
    experts: list[Routable],
    tokenizer: Any,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> RouteResult:
    """Route an in-memory text (chunked like a file)."""
    from cir.data.chunking import chunk_text

    chunks = iter([chunk_text(text, tokenizer, seq_len_of(experts))])
    return _route_stream(experts, chunks, temperature, batch_size)
