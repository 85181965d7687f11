"""Deterministic train / val / test assignment by a stable hash of the document id.

The split of a document depends only on its id (blake2b, not Python's salted ``hash``),
so a document is never in two splits, whatever the iteration order, machine or
``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def stable_unit(key: str) -> float:
    """A number in [0, 1) that is a pure function of ``key``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(doc_id: str, val_frac: float = 0.05, test_frac: float = 0.05) -> Split:
    """``"train"``, ``"val"`` or ``"test"`` for a document id."""
    if not (0.0 <= val_frac and 0.0 <= test_frac and val_frac + test_frac < 1.0):
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    u = stable_unit(doc_id)
    if u < val_frac:
        return "val"
    if u < val_frac + test_frac:
        return "test"
    return "train"
