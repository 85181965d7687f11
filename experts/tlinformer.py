"""TLinFormer: exact softmax attention with linear cost in the sequence length (seed 004).

Paper: Z. Tang, "Rethinking Transformer Connectivity: TLinFormer, A Path to Exact, Full
Context-Aware Linear Attention", 2025 (arXiv:2508.20407).

The sequence is cut into generation windows of ``w_og`` tokens. Window ``w`` covers
positions ``[w*w_og, (w+1)*w_og)``; its *context* is every earlier token and its *history
window* is the last ``w_oh`` context tokens (all of them when there are fewer). A block is
one compress layer, ``n_hidden`` hidden layers and one restore layer, run as two streams
that share each layer's weights:

- context stream: compress (queries = the last ``w_oh`` context positions, keys/values =
  all context positions, not causal) -> ``context_zip`` ``[B, w_oh, D]``; hidden layers =
  non-causal self-attention over ``context_zip``; restore (queries = every context
  position, keys/values = ``context_zip``) -> a full-length context for the next block.
- generation stream, every layer: causal self-attention inside the window plus
  cross-attention to that layer's context keys/values (compress: the full raw context at
  that layer's input; hidden and restore: ``context_zip`` at that layer's input); two
  softmaxes, summed, one output projection, then the FFN. Context never sees the window.

The first window has no context and runs as a plain causal decoder. Training concatenates
every window's logits and takes one next-token loss.

Choices where the paper is silent (ours):
- the context keys/values a generation layer attends to are exactly the ones the context
  stream uses in that layer (same projection of the same normed input), so one tensor
  serves both streams and is what the inference cache holds;
- residuals: compress adds to the ``w_oh`` query positions of its input, restore adds to
  the full-length block input; every sub-layer is pre-norm;
- RoPE uses absolute positions everywhere; a ``context_zip`` slot keeps the position of the
  context token it was queried from;
- the last block's restore output on the context side feeds nothing, so it is skipped;
- padding sits at the tail of a chunk, so a window holding any real token has an all-real
  context: the mask only enters the loss;
- inference cache: per layer the context K/V (static while the context is unchanged) and
  a preallocated ``w_og`` window K/V buffer. When the window is full the next token slides
  it into the context and the whole context side is recomputed (a cache miss); between
  slides a step costs O(N) only through the compress layer's cross-attention. The token
  ids of the sequence are kept (int64) so the context can be recomputed; they are
  reported apart from the K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from cir.experts.layers import (
    KV,
    NORMS,
    Layer,
    PresetConfig,
    Rope,
    StaticKV,
    attend,
    check,
    init_weights,
    make_norm,
    rope_cos_sin,
    tensor_bytes,
)
from torch import nn


@dataclass
class TLinFormerConfig(PresetConfig):
    vocab_size: int = 8192
    n_embd: int = 256
    n_head: int = 8
    n_blocks: int = 2
    n_hidden: int = 2  # H: hidden layers per block (a block has H + 2 layers)
    w_oh: int = 128  # history (context observation) window
    w_og: int = 128  # generation window
    ffn_hidden: int = 704
    seq_len: int = 512  # training chunk length
    rope_base: float = 10000.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5

    PRESETS: ClassVar[dict[str, dict]] = {
        "debug": dict(vocab_size=512, n_embd=32, n_head=4, n_blocks=2, n_hidden=1,
                      w_oh=8, w_og=8, ffn_hidden=64, seq_len=64),
        "small": dict(vocab_size=8192, n_embd=256, n_head=8, n_blocks=2, n_hidden=2,
                      w_oh=128, w_og=128, ffn_hidden=704, seq_len=512),
        # Seed 004's 41M model: GPT-2 vocab, n_embd 432, 12 heads, 2 blocks x H=2.
        "paper-41m": dict(vocab_size=50257, n_embd=432, n_head=12, n_blocks=2, n_hidden=2,
                          w_oh=256, w_og=256, ffn_hidden=1280, seq_len=512),
    }

    def __post_init__(self) -> None:
        check(
            [
                (self.vocab_size > 1, "vocab_size must be > 1"),
                (self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"),
                ((self.n_embd // max(self.n_head, 1)) % 2 == 0, "head dim must be even (RoPE)"),
                (self.n_blocks >= 1 and self.n_hidden >= 0, "need n_blocks >= 1, n_hidden >= 0"),
                (self.w_oh >= 1 and self.w_og >= 1, "w_oh and w_og must be >= 1"),
                (self.ffn_hidden >= 1 and self.seq_len >= 2, "ffn_hidden >= 1, seq_len >= 2"),
                (self.norm in NORMS, f"norm must be one of {NORMS}"),
            ],
            type(self).__name__,
        )

    @property
    def n_layer(self) -> int:
        """Equivalent depth: layers a standard decoder needs for the same parameters."""
        return self.n_blocks * (self.n_hidden + 2)


@dataclass
class WindowCache:
    """Decoding state of a windowed model (see the module docstring)."""

    tokens: torch.Tensor  # [B, max_len] int64, the sequence so far
    bufs: list[list[StaticKV]]  # [block][layer] window K/V, capacity w_og
    ctx_kv: list[list[KV | None]] | None = None  # [block][layer] context K/V
    length: int = 0  # tokens seen
    ctx_len: int = 0  # tokens committed to the context (a multiple of w_og)
    syncs: int = field(default=0)  # context recomputations so far (cache misses)

    def nbytes(self) -> dict[str, int]:
        """Bytes of tensors held, by part: raw-context K/V (compress layers), zip K/V
        (hidden and restore layers), window K/V, and the token ids."""
        raw: list[torch.Tensor] = []
        zipped: list[torch.Tensor] = []
        for block in self.ctx_kv or []:
            for i, kv in enumerate(block):
                if kv is not None:
                    (raw if i == 0 else zipped).extend(kv)
        window = [t for block in self.bufs for b in block for t in b.tensors()]
        parts = {
            "context_kv": tensor_bytes(raw),
            "zip_kv": tensor_bytes(zipped),
            "window_kv": tensor_bytes(window),
        }
        parts["kv"] = sum(parts.values())
        parts["tokens"] = tensor_bytes([self.tokens])
        return parts


class TLinBlock(nn.Module):
    """Compress + ``n_hidden`` hidden + restore layers, applied to both streams."""

    def __init__(self, cfg: TLinFormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Layer(cfg.n_embd, cfg.n_head, cfg.ffn_hidden, cfg.norm, cfg.norm_eps)
            for _ in range(cfg.n_hidden + 2)
        )

    def context(
        self, ctx: torch.Tensor, rope_ctx: Rope, rope_zip: Rope, need_out: bool
    ) -> tuple[list[KV], torch.Tensor | None]:
        """Context stream over ``ctx`` ``[B, L, D]``: returns every layer's K/V (the ones
        the generation stream attends to) and the restored context ``[B, L, D]``."""
        w = rope_zip[0].shape[0]
        compress, hidden, restore = self.layers[0], self.layers[1:-1], self.layers[-1]
        h = compress.norm1(ctx)
        kv = compress.kv_of(h, rope_ctx)  # [B, H, L, hd] x2
        q = compress.q_of(h[:, -w:], rope_zip)  # [B, H, w, hd]
        z = compress.finish(ctx[:, -w:], attend(q, *kv))  # context_zip [B, w, D]
        kvs = [kv]
        for layer in hidden:
            h = layer.norm1(z)
            kv = layer.kv_of(h, rope_zip)
            z = layer.finish(z, attend(layer.q_of(h, rope_zip), *kv))
            kvs.append(kv)
        kv = restore.kv_of(restore.norm1(z), rope_zip)
        kvs.append(kv)
        if not need_out:
            return kvs, None
        q = restore.q_of(restore.norm1(ctx), rope_ctx)  # [B, H, L, hd]
        return kvs, restore.finish(ctx, attend(q, *kv))

    def gen(
        self,
        g: torch.Tensor,
        rope: Rope,
        kvs: list[KV | None] | None,
        bufs: list[StaticKV] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Generation stream over a window segment ``g`` ``[B, T, D]``."""
        for i, layer in enumerate(self.layers):
            cross = kvs[i] if kvs is not None else None
            buf = bufs[i] if bufs is not None else None
            g = layer.gen_forward(g, rope, cross, buf, offset)
        return g


class TLinFormer(nn.Module):
    """Windowed causal LM; ``forward(ids) -> logits [B, T, V]``; cached ``prefill``/``step``."""

    kind = "tlinformer"
    config_class = TLinFormerConfig
    compress_cross: ClassVar[bool] = True  # generation stream sees the raw context

    def __init__(self, config: TLinFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(TLinBlock(config) for _ in range(config.n_blocks))
        self.norm = make_norm(config.norm, config.n_embd, config.norm_eps)
        init_weights(self, config.n_layer)

    # ------------------------------------------------------------------ helpers
    def _rope(self, start: int, length: int) -> Rope:
        c = self.config
        pos = torch.arange(start, start + length, device=self.emb.weight.device)
        return rope_cos_sin(pos, c.n_embd // c.n_head, c.rope_base, self.emb.weight.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self.emb.weight)  # tied embeddings

    def context_kv(self, x_ctx: torch.Tensor) -> list[list[KV | None]]:
        """Every block's context K/V for a context ``[B, L, D]`` of embeddings."""
        length = x_ctx.shape[1]
        w = min(self.config.w_oh, length)
        rope_ctx, rope_zip = self._rope(0, length), self._rope(length - w, w)
        out: list[list[KV | None]] = []
        ctx: torch.Tensor | None = x_ctx
        for i, block in enumerate(self.blocks):
            kvs, ctx = block.context(ctx, rope_ctx, rope_zip, i < len(self.blocks) - 1)
            out.append([None, *kvs[1:]] if not self.compress_cross else list(kvs))
        return out

    def gen_stream(
        self,
        g: torch.Tensor,
        start: int,
        ctx_kv: list[list[KV | None]] | None,
        bufs: list[list[StaticKV]] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """All blocks' generation stream for tokens at positions ``start..`` ``[B, T, D]``."""
        rope = self._rope(start, g.shape[1])
        for i, block in enumerate(self.blocks):
            kvs = ctx_kv[i] if ctx_kv is not None else None
            g = block.gen(g, rope, kvs, bufs[i] if bufs is not None else None, offset)
        return g

    # ------------------------------------------------------------------ training graph
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]``: every window with its full context, concatenated."""
        x = self.emb(ids)  # [B, T, D]
        w_og, outs = self.config.w_og, []
        for s in range(0, ids.shape[1], w_og):
            ctx_kv = self.context_kv(x[:, :s]) if s > 0 else None
            outs.append(self.gen_stream(x[:, s : s + w_og], s, ctx_kv))
        return self.head(torch.cat(outs, dim=1))

    # ------------------------------------------------------------------ cached decoding
    def new_cache(self, batch: int, max_len: int) -> WindowCache:
        c, like = self.config, self.emb.weight
        hd = c.n_embd // c.n_head
        bufs = [
            [StaticKV(batch, c.n_head, c.w_og, hd, like) for _ in range(c.n_hidden + 2)]
            for _ in range(c.n_blocks)
        ]
        tokens = torch.zeros(batch, max_len, dtype=torch.long, device=like.device)
        return WindowCache(tokens=tokens, bufs=bufs)

    def _sync(self, cache: WindowCache) -> None:
        """Recompute the context side for ``tokens[:, :ctx_len]`` (the cache miss)."""
        cache.ctx_kv = None  # free the old context first: keeps peak memory down
        if cache.ctx_len > 0:
            cache.ctx_kv = self.context_kv(self.emb(cache.tokens[:, : cache.ctx_len]))
            cache.syncs += 1

    def prefill(self, ids: torch.Tensor, cache: WindowCache) -> torch.Tensor:
        """Consume a prompt ``[B, N]`` into an empty cache; logits of its last token ``[B, V]``."""
        n = ids.shape[1]
        if n > cache.tokens.shape[1]:
            raise ValueError(f"prompt of {n} tokens exceeds the cache's {cache.tokens.shape[1]}")
        cache.tokens[:, :n] = ids
        cache.length = n
        cache.ctx_len = ((n - 1) // self.config.w_og) * self.config.w_og
        self._sync(cache)
        g = self.emb(ids[:, cache.ctx_len :])  # [B, n - ctx_len, D]
        g = self.gen_stream(g, cache.ctx_len, cache.ctx_kv, cache.bufs, 0)
        return self.head(g[:, -1])

    def step(self, tokens: torch.Tensor, cache: WindowCache) -> torch.Tensor:
        """Append one token per row (``[B]`` or ``[B, 1]``); logits ``[B, V]``."""
        pos = cache.length
        if pos >= cache.tokens.shape[1]:
            raise ValueError(f"cache is full ({pos} tokens); make it with a larger max_len")
        if pos - cache.ctx_len == self.config.w_og:  # window full: slide it into the context
            cache.ctx_len = pos
            self._sync(cache)
        tokens = tokens.reshape(-1)
        cache.tokens[:, pos] = tokens
        cache.length = pos + 1
        g = self.emb(tokens)[:, None]  # [B, 1, D]
        g = self.gen_stream(g, pos, cache.ctx_kv, cache.bufs, pos - cache.ctx_len)
        return self.head(g[:, -1])

    def will_sync(self, cache: WindowCache) -> bool:
        """Whether the next ``step`` recomputes the context side (a cache miss)."""
        return cache.length - cache.ctx_len == self.config.w_og

    def flops_per_token(self) -> float:
        """Training FLOPs per token of a ``seq_len`` chunk (3 x forward, 2 per multiply-add):
        both streams' matmuls and attention, window by window. Every window after the first
        recomputes the context stream over all earlier tokens (in each block the compress
        layer's K/V and, but in the last block, the restore layer's queries, projection and
        FFN at every context position; the rest at the ``w_oh`` zip positions), which costs
        more than the generation stream's 6 x parameters on the ``small`` preset."""
        c = self.config
        T, D, F, H, B = c.seq_len, c.n_embd, c.ffn_hidden, c.n_hidden, c.n_blocks
        P = 4 * D * D + 3 * D * F  # matmul weights of one Layer
        macs = pairs = 0.0  # multiply-adds of the matmuls; attention (query, key) pairs
        for s in range(0, T, c.w_og):
            g, L = min(c.w_og, T - s), s  # window length, context length
            z = min(c.w_oh, L)  # context_zip length
            macs += g * (B * (H + 2) * P + D * c.vocab_size)  # generation stream + head
            pairs += B * (H + 2) * g * (g + 1) / 2  # causal self-attention in the window
            if L == 0:
                continue
            macs += B * (2 * D * D * L + (H + 1) * P * z) + (B - 1) * (2 * D * D + 3 * D * F) * L
            pairs += B * ((L * g if self.compress_cross else 0) + (H + 1) * g * z)  # cross
            pairs += B * (z * L + H * z * z) + (B - 1) * L * z  # context stream
        return (6 * macs + 12 * D * pairs) / T
