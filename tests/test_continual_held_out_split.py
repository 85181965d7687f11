"""The continual bench and `bench registry` evaluate on held-out chunks only: never on the
training split, even when a small corpus has no test documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cir.data.shards import build_dataset, open_dataset
from cir.data.split import split_of
from cir.router.continual import held_out_test


def _files(root: Path, want: set[str], n: int) -> Path:
    """``n`` small text files whose documents fall only in the splits ``want``."""
    root.mkdir(parents=True)
    k = made = 0
    got: set[str] = set()
    while made < n:
        name = f"m{k}.txt"
        k += 1
        split = split_of(f"file:{name}")
        if split not in want or (made == n - 1 and got | {split} != want):
            continue
        got.add(split)
        (root / name).write_text("\n".join(f"line {k} number {i} of text" for i in range(40)))
        made += 1
    return root


def _dataset(tmp_path: Path, tiny_tokenizer: Path, want: set[str]) -> Path:
    src = _files(tmp_path / "src", want, 4)
    build_dataset(tmp_path / "data", str(src), tokenizer=tiny_tokenizer, seq_len=64)
    return tmp_path / "data"


def test_empty_test_split_reads_val_not_train(tmp_path, tiny_tokenizer):
    data = _dataset(tmp_path, tiny_tokenizer, {"train", "val"})
    assert len(open_dataset(data, "test")) == 0 and len(open_dataset(data, "val")) > 0
    ids, _ = held_out_test(data, 4)
    val, _ = open_dataset(data, "val").get_batch(np.arange(len(ids)))
    assert torch.equal(ids, val)


def test_no_held_out_chunks_is_an_error_not_the_train_split(tmp_path, tiny_tokenizer):
    data = _dataset(tmp_path, tiny_tokenizer, {"train"})
    with pytest.raises(ValueError, match="no held-out"):
        held_out_test(data, 4)
