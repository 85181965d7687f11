"""Train an expert LM on a chunk dataset with the shared trainer (``cir.train.train``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cir.experts.registry import build_model
from torch import nn

from cir.train import TrainConfig, TrainResult, train


def lm_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy over real (unmasked) target tokens, plus their accuracy."""
    logits = model(ids[:, :-1]).float()  # [B, T-1, V]
    target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # [B, T-1]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    real = mask[:, 1:]
    acc = ((logits.argmax(-1) == ids[:, 1:]) & real).sum() / real.sum()  # no dynamic shapes
    return loss, {"acc": acc, "n_targets": real.sum()}


def _open(data: Any, split: str):
    if not isinstance(data, (str, Path)):
        return data
    from cir.data import open_dataset

    return open_dataset(str(data), split)


def _open_val(data: Any, val: Any):
    if val is not None:
        return _open(val, "val")
    if isinstance(data, (str, Path)):
        try:
            ds = _open(data, "val")
            return ds if len(ds) > 0 else None
        except (FileNotFoundError, ValueError):
            return None
    return None


def _tokenizer_of(data: Any, tokenizer: str | Path | None) -> str | Path | None:
    if tokenizer is not None:
        return tokenizer
    for attr in ("tokenizer_path", "tokenizer"):
        value = getattr(data, attr, None)
        if isinstance(value, (str, Path)) and Path(value).is_file():
            return value
    root = getattr(data, "root", None) or getattr(data, "path", None)
    if root is not None and (Path(root) / "tokenizer.json").is_file():
        return Path(root) / "tokenizer.json"
    return None


def train_expert(
    data: Any,
    out_dir: str | Path,
    *,
    arch: str = "tlinformer",
    preset: str = "small",
    tokenizer: str | Path | None = None,
    train_cfg: TrainConfig | None = None,
    overrides: dict[str, Any] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    val_data: Any = None,
) -> TrainResult:
    """Train ``arch`` (preset + ``overrides``) on ``data`` (a dataset name, a dataset
    directory or an opened ``ChunkDataset``); the model's vocabulary and training length
    follow the dataset unless overridden. Re-running with the same arguments resumes."""
    train_data = _open(data, "train")
    fields: dict[str, Any] = {}
    for name in ("vocab_size", "seq_len"):
        value = getattr(train_data, name, None)
        if isinstance(value, int):
            fields[name] = value
    fields.update(overrides or {})
    cfg = train_cfg or TrainConfig()
    torch.manual_seed(cfg.seed)  # the initialisation is a function of the run's seed
    model = build_model(arch, preset, **fields)
    return train(
        model,
        lm_loss,
        train_data,
        out_dir,
        cfg,
        val_data=_open_val(data, val_data),
        tokenizer=_tokenizer_of(train_data, tokenizer),
        on_log=on_log,
    )
