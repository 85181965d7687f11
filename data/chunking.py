"""Token ids to fixed-length chunks, and text (or a huge file) to chunks for scoring.

A chunk is ``seq_len`` ids; a document's last chunk is padded with ``PAD_ID`` and its
length (real tokens) says where the padding starts. Per-document chunking never puts two
documents in one chunk, so every chunk belongs to one domain: this is what routing needs.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterator

import numpy as np
from cir.data.tokenizer import PAD_ID, encode
from tokenizers import Tokenizer

DEFAULT_SEQ_LEN = 512
DEFAULT_READ_BYTES = 4 * 2**20
ENCODE_CHARS = 2**16


def chunk_ids(ids: np.ndarray | list[int], seq_len: int, dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Cut one token sequence into ``[N, seq_len]`` chunks (tail padded) and lengths ``[N]``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = np.asarray(ids, dtype=np.int64)
    n = -(-len(ids) // seq_len)  # ceil
    out = np.full((n, seq_len), PAD_ID, dtype=dtype)  # [N, T]
    out.reshape(-1)[: len(ids)] = ids
    lengths = np.full(n, seq_len, dtype=np.int32)  # [N]
    if n and len(ids) % seq_len:
        lengths[-1] = len(ids) % seq_len
    return out, lengths


def encode_long(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids ``int64 [L]`` of a text of any length, encoded piecewise (same ids as one call)."""
    if len(text) <= ENCODE_CHARS:
        return np.asarray(encode(tokenizer, text), dtype=np.int64)
    return encode_many(tokenizer, [text])[0]


def encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """``encode_long`` of every text, all pieces in one parallel ``encode_batch`` call."""
    pieces: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        subs = [text] if len(text) <= ENCODE_CHARS else list(_sub_pieces(text, ENCODE_CHARS))
        pieces.extend(subs)
        owner.extend([i] * len(subs))
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    for i, enc in zip(owner, tokenizer.encode_batch(pieces, add_special_tokens=False), strict=True):
        parts[i].append(np.asarray(enc.ids, dtype=np.int64))
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in parts]  # >= 1 piece each


def chunk_text(text: str, tokenizer: Tokenizer, seq_len: int = DEFAULT_SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Token chunks of ``text``: ids ``int64 [N, T]`` (tail padded with PAD_ID), lengths ``int32 [N]``."""
    return chunk_ids(encode_long(tokenizer, text), seq_len)


# Under the byte-level BPE pre-tokeniser a whitespace run W before a visible character c
# splits as W[:-1] | W[-1]c (or W[-1] | c), so cutting just before W[-1] tokenises both
# pieces exactly as the whole text. Any such run will do, not only one holding a newline:
# a long single-line file (minified code, JSON lines) must still be encoded piecewise.
_SAFE_CUT = re.compile(r"[ \t\r\f\v\n](?=[!-~])")


def _cut_point(text: str, force: bool) -> int:
    """Where to cut: at the last safe whitespace; 0 (wait for more text) when there is none.

    With ``force`` (the carried text grew too long) fall back to the last newline, or to the
    end: tokens may then differ slightly at that one boundary, memory stays bounded.
    """
    last = None
    for m in _SAFE_CUT.finditer(text, max(0, len(text) - 2**20)):
        last = m
    if last is not None:
        return last.end() - 1
    if not force:
        return 0
    nl = text.rfind("\n")
    return nl + 1 if nl >= 0 else len(text)


def _text_pieces(path: str | os.PathLike, max_bytes_per_read: int) -> Iterator[str]:
    """The file as text pieces of about ``max_bytes_per_read`` bytes, cut at safe whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with open(path, "rb") as f:
        while block := f.read(max_bytes_per_read):
            text = carry + decoder.decode(block)
            cut = _cut_point(text, force=len(text) > 4 * max_bytes_per_read)
            piece, carry = text[:cut], text[cut:]
            if piece:
                yield piece
    carry += decoder.decode(b"", final=True)
    if carry:
        yield carry


def _sub_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut only at safe points."""
    start = 0
    while len(text) - start > size:
        cut = _cut_point(text[start : start + size], force=False)
        if cut == 0:  # none in this window: take the first one after it
            m = _SAFE_CUT.search(text, start + size)
            if m is None:
                break
            cut = m.end() - 1 - start
        yield text[start : start + cut]
        start += cut
    if start < len(text):
        yield text[start:]


def iter_text_chunks(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_bytes_per_read: int = DEFAULT_READ_BYTES,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream a file of any size as chunk arrays ``(ids int64 [n, T], lengths int32 [n])``.

    Memory stays within a few ``max_bytes_per_read``. Pieces are cut at whitespace before a
    visible character, so the concatenation of everything yielded equals
    ``chunk_text(whole file)`` (invalid UTF-8 is replaced by U+FFFD) unless no such
    whitespace occurs within 4 reads.
    """
    if max_bytes_per_read < 1:
        raise ValueError("max_bytes_per_read must be >= 1")
    pending = np.zeros(0, dtype=np.int64)
    for piece in _text_pieces(path, max_bytes_per_read):
        # encode in small pieces: one Encoding costs ~100 bytes per token
        for sub in _sub_pieces(piece, ENCODE_CHARS):
            pending = np.concatenate([pending, encode_long(tokenizer, sub)])
            full = len(pending) // seq_len * seq_len
            if full:
                yield chunk_ids(pending[:full], seq_len)
                pending = pending[full:]
    if len(pending):
        yield chunk_ids(pending, seq_len)
