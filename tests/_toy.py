"""A tiny causal LM and in-memory chunk data used by the trainer and checkpoint tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ToyConfig:
    vocab_size: int = 32
    d_model: int = 16


class Toy(nn.Module):
    kind = "toy"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.d_model)
        self.mix = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.mix(self.emb(ids))))  # [B, T, D]
        return h @ self.emb.weight.T  # [B, T, V], tied head


def toy_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    logits = model(ids[:, :-1])
    target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)
    acc = (logits.argmax(-1) == ids[:, 1:])[mask[:, 1:]].float().mean()
    return loss, {"acc": acc, "n_targets": mask[:, 1:].sum()}


class ArrayChunks:
    """``padded``: chunk i keeps its first 2 + i % (seq_len - 1) tokens, the rest is padding."""

    def __init__(self, n: int = 64, seq_len: int = 12, vocab: int = 32, seed: int = 0,
                 padded: bool = False) -> None:
        rng = np.random.default_rng(seed)
        start = rng.integers(0, vocab, size=(n, 1))
        self.ids = (start + np.arange(seq_len)) % vocab  # learnable: next = current + 1
        lengths = 2 + np.arange(n) % (seq_len - 1) if padded else np.full(n, seq_len)
        self.mask = np.arange(seq_len)[None] < lengths[:, None]  # [n, seq_len]
        self.ids[~self.mask] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, idx):
        return torch.as_tensor(self.ids[idx], dtype=torch.long), torch.as_tensor(self.mask[idx])


class PaddedChunks:
    """In-memory chunks ``ids [n, seq_len]`` whose chunk i holds its first ``lengths[i]``
    tokens, the rest padding; subclasses fill ``ids``, ``lengths`` and ``seq_len``."""

    ids: np.ndarray
    lengths: np.ndarray
    seq_len: int

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, idx):
        mask = torch.as_tensor(np.arange(self.seq_len)[None, :] < self.lengths[idx][:, None])
        ids = torch.as_tensor(self.ids[idx], dtype=torch.long).masked_fill(~mask, 0)
        return ids, mask


class Halves(PaddedChunks):
    """Chunks drawn uniformly from one of two disjoint sub-vocabularies (tokens 2..49 or
    50..97): every chunk from ``half`` when given, else alternately from each (``.half``
    says which). Lengths vary, so some chunks end in padding; ``empty`` chunks hold none."""

    def __init__(self, n: int, seq_len: int = 32, vocab: int = 512, seed: int = 0,
                 half: int | None = None, empty: tuple[int, ...] = ()) -> None:
        rng = np.random.default_rng(seed)
        self.seq_len, self.vocab_size = seq_len, vocab
        self.half = np.arange(n) % 2 if half is None else np.full(n, half)
        self.ids = 2 + 48 * self.half[:, None] + rng.integers(0, 48, size=(n, seq_len))
        self.lengths = rng.integers(seq_len // 2, seq_len + 1, size=n)
        self.lengths[list(empty)] = 0
