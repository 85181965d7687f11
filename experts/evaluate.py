"""Per-chunk next-token likelihood of an expert LM (perplexity), for routing and reports."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Summed next-token NLL ``nll_sum [N]`` (nats) and predicted-token counts
    ``n_tokens [N]`` per chunk of ``ids``/``mask`` ``[N, T]`` (a token is predicted when it
    and the one before it are real)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = [], []
    for s in range(0, ids.shape[0], batch_size):
        x = ids[s : s + batch_size].to(device)
        m = mask[s : s + batch_size].to(device)
        logits = model(x[:, :-1]).float()  # [b, T-1, V]
        target = x[:, 1:]
        real = m[:, 1:] & m[:, :-1]
        tok = F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                              reduction="none").view_as(target)  # [b, T-1]
        nll.append((tok * real).sum(-1).double().cpu())
        count.append(real.sum(-1).cpu())
    model.train(was_training)
    return {"nll_sum": torch.cat(nll), "n_tokens": torch.cat(count)}


def dataset_perplexity(
    ckpt_or_model: str | Path | nn.Module,
    dataset: Any,
    max_chunks: int | None = None,
    batch_size: int = 16,
    split: str = "val",
    device: str | None = None,
) -> dict[str, Any]:
    """Perplexity of a checkpoint directory (or a model) over the first ``max_chunks``
    chunks of ``dataset`` (an opened ``ChunkDataset`` or a name/path opened at ``split``)."""
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    if isinstance(dataset, (str, Path)):
        from cir.data import open_dataset

        dataset = open_dataset(str(dataset), split)
    model = ckpt_or_model
    if not isinstance(model, nn.Module):
        from cir.checkpoint import check_tokenizer, load_checkpoint

        model = load_checkpoint(ckpt_or_model, device=device or "cpu", expect="language model")
        check_tokenizer(ckpt_or_model, dataset)
    elif device is not None:
        model = model.to(device)
    n = len(dataset) if max_chunks is None else min(len(dataset), max_chunks)
    if n == 0:
        where, part = getattr(dataset, "root", "the dataset"), getattr(dataset, "split", split)
        raise ValueError(f"{where} has no {part} chunks to evaluate")
    parts = [
        perplexity(model, *dataset.get_batch(np.arange(s, min(n, s + batch_size))), batch_size)
        for s in range(0, n, batch_size)
    ]
    out = {k: torch.cat([p[k] for p in parts]) for k in ("nll_sum", "n_tokens")}
    total_nll = float(out["nll_sum"].sum())
    total = int(out["n_tokens"].sum())
    mean = total_nll / max(total, 1)
    return {
        "nll_sum": out["nll_sum"],
        "n_tokens": out["n_tokens"],
        "n_chunks": n,
        "total_tokens": total,
        "nll_per_token": mean,
        "ppl": math.exp(mean) if total else float("nan"),
    }
