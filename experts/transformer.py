"""The standard decoder-only Transformer baseline, built from the same layers as TLinFormer.

Two KV caches for decoding, both reported by the benchmark:
- ``static``: one preallocated ``[B, H, max_len, hd]`` buffer per layer, written in place
  (the strong baseline);
- ``concat``: ``torch.cat`` of the new K/V onto the old at every step (seed 004's baseline,
  whose cost grows with the copy of the whole cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from cir.experts.layers import (
    NORMS,
    ConcatKV,
    Layer,
    PresetConfig,
    Rope,
    StaticKV,
    check,
    init_weights,
    make_norm,
    rope_cos_sin,
    tensor_bytes,
)
from torch import nn

CACHE_KINDS = ("static", "concat")


@dataclass
class TransformerConfig(PresetConfig):
    vocab_size: int = 8192
    n_embd: int = 256
    n_head: int = 8
    n_layer: int = 8
    ffn_hidden: int = 704
    seq_len: int = 512
    rope_base: float = 10000.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5

    # Same widths as the TLinFormer presets; n_layer = n_blocks * (n_hidden + 2).
    PRESETS: ClassVar[dict[str, dict]] = {
        "debug": dict(vocab_size=512, n_embd=32, n_head=4, n_layer=6, ffn_hidden=64, seq_len=64),
        "small": dict(vocab_size=8192, n_embd=256, n_head=8, n_layer=8, ffn_hidden=704,
                      seq_len=512),
        "paper-41m": dict(vocab_size=50257, n_embd=432, n_head=12, n_layer=8, ffn_hidden=1280,
                          seq_len=512),
    }

    def __post_init__(self) -> None:
        check(
            [
                (self.vocab_size > 1, "vocab_size must be > 1"),
                (self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"),
                ((self.n_embd // max(self.n_head, 1)) % 2 == 0, "head dim must be even (RoPE)"),
                (self.n_layer >= 1, "n_layer must be >= 1"),
                (self.ffn_hidden >= 1 and self.seq_len >= 2, "ffn_hidden >= 1, seq_len >= 2"),
                (self.norm in NORMS, f"norm must be one of {NORMS}"),
            ],
            type(self).__name__,
        )


class KVCache:
    """One K/V buffer per layer plus the number of tokens seen."""

    def __init__(self, bufs: list[StaticKV | ConcatKV], kind: str) -> None:
        self.bufs, self.kind, self.length = bufs, kind, 0

    def nbytes(self) -> dict[str, int]:
        kv = tensor_bytes([t for b in self.bufs for t in b.tensors()])
        return {"kv": kv, "tokens": 0}


class Transformer(nn.Module):
    """Causal decoder; ``forward(ids) -> logits [B, T, V]``; cached ``prefill``/``step``."""

    kind = "transformer"
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(
            Layer(config.n_embd, config.n_head, config.ffn_hidden, config.norm, config.norm_eps)
            for _ in range(config.n_layer)
        )
        self.norm = make_norm(config.norm, config.n_embd, config.norm_eps)
        init_weights(self, config.n_layer)

    def _rope(self, start: int, length: int) -> Rope:
        c = self.config
        pos = torch.arange(start, start + length, device=self.emb.weight.device)
        return rope_cos_sin(pos, c.n_embd // c.n_head, c.rope_base, self.emb.weight.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self.emb.weight)  # tied embeddings

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        rope = self._rope(start, x.shape[1])
        for i, layer in enumerate(self.layers):
            buf = cache.bufs[i] if cache is not None else None
            x = layer.gen_forward(x, rope, None, buf, start)
        return x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self._run(self.emb(ids), 0, None))  # [B, T, V]

    def new_cache(self, batch: int, max_len: int, kind: str = "static") -> KVCache:
        if kind not in CACHE_KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; valid: {', '.join(CACHE_KINDS)}")
        c, like = self.config, self.emb.weight
        hd = c.n_embd // c.n_head
        if kind == "static":
            bufs: list = [StaticKV(batch, c.n_head, max_len, hd, like) for _ in self.layers]
        else:
            bufs = [ConcatKV() for _ in self.layers]
        return KVCache(bufs, kind)

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Consume a prompt ``[B, N]`` into an empty cache; logits of its last token ``[B, V]``."""
        h = self._run(self.emb(ids), 0, cache)
        cache.length = ids.shape[1]
        return self.head(h[:, -1])

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one token per row (``[B]`` or ``[B, 1]``); logits ``[B, V]``."""
        pos = cache.length
        h = self._run(self.emb(tokens.reshape(-1))[:, None], pos, cache)  # [B, 1, D]
        cache.length = pos + 1
        return self.head(h[:, -1])

    def will_sync(self, cache: KVCache) -> bool:
        return False

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6 x parameters + causal attention at ``seq_len``)."""
        c = self.config
        n_params = sum(p.numel() for p in self.parameters())
        return 6 * n_params + 6 * c.n_layer * c.n_embd * c.seq_len
