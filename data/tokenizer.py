"""Byte-level BPE tokenizer shared by every expert of a registry.

All experts score text with the same ``tokenizer.json``, so their per-token losses are
comparable. Ids 0 and 1 are reserved: ``<pad>`` (tail padding of a chunk) and ``<eos>``
(document separator in packed shards). Byte-level BPE maps every string to tokens and
back without loss, including non-ASCII text and whitespace runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_ID = 0
EOS_ID = 1
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus every byte


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline (no normaliser, so decoding is exact)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the same texts in the same order give the same file."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + 2 specials), got {vocab_size}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_non_empty(texts), trainer=trainer)
    _check_specials(tok)
    return tok


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text


def _check_specials(tok: Tokenizer, name: str = "tokenizer") -> None:
    if tok.token_to_id(PAD_TOKEN) != PAD_ID or tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise ValueError(f"{name} must map {PAD_TOKEN}->{PAD_ID} and {EOS_TOKEN}->{EOS_ID}")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` (a directory gets ``<dir>/tokenizer.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.json`` (or a directory holding one) and check the reserved ids."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception ("invalid type: ...")
        raise ValueError(f"{path}: not a tokenizer.json ({exc})") from None
    _check_specials(tok, str(path))
    return tok


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 of the tokenizer file: experts are comparable only under the same hash."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``; padding and EOS are dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)
