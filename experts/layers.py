"""Parts shared by every expert LM: norms, SwiGLU, RoPE, attention helpers, one decoder layer.

Every architecture in this package (TLinFormer, TConstFormer, the standard decoder) is a
different wiring of the same :class:`Layer` (pre-norm attention + pre-norm SwiGLU FFN), so
parameter counts match layer for layer and only the information flow differs.

Attention helpers work on ``[B, n_head, T, head_dim]`` tensors. ``naive_attention`` is the
plain-softmax reference used by the tests to check the fused path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("rmsnorm", "layernorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in at least fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# --------------------------------------------------------------------------- RoPE


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim // 2]`` for absolute ``positions`` ``[T]``.

    Angles are formed in float64: at positions near 1e6 float32 would be off by ~0.1 rad."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * inv_freq[None, :]  # [T, half]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension: ``x`` is ``[B, H, T, hd]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if x.shape[-1] % 2:  # an odd head dim keeps its last channel unrotated
        rotated = torch.cat([rotated, x[..., -1:]], dim=-1)
    return rotated


def positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)


# --------------------------------------------------------------------------- attention


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """Fused softmax attention, ``[B, H, Tq, hd]``. ``causal`` aligns the mask to the end
    (query i sees keys ``<= i + Tk - Tq``), so it also holds for a query block after a cache."""
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal or tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(tq, tk))


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """Reference: explicit scores, mask and softmax (end-aligned causal mask)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)  # [B, H, T, hd]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)  # [B, T, D]


# --------------------------------------------------------------------------- KV buffers


class StaticKV:
    """A preallocated K/V buffer ``[B, H, capacity, hd]``: writes in place, reads a view."""

    def __init__(self, batch: int, n_head: int, capacity: int, head_dim: int, like: torch.Tensor):
        shape = (batch, n_head, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = offset + k.shape[-2]
        if end > self.k.shape[-2]:
            raise ValueError(f"KV buffer of {self.k.shape[-2]} positions is full")
        self.k[:, :, offset:end] = k
        self.v[:, :, offset:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class ConcatKV:
    """The naive cache: ``torch.cat`` a new K/V onto the old one at every step."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or offset == 0:
            self.k, self.v = k.contiguous(), v.contiguous()
        else:
            self.k = torch.cat([self.k, k], dim=-2)
            self.v = torch.cat([self.v, v], dim=-2)
        return self.k, self.v

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v) if t is not None]


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- the layer

Rope = tuple[torch.Tensor, torch.Tensor]
KV = tuple[torch.Tensor, torch.Tensor]


class Layer(nn.Module):
    """Pre-norm attention + pre-norm SwiGLU. The attention can mix a causal self-attention
    and a cross-attention to a given K/V (two softmaxes, summed, one output projection)."""

    def __init__(
        self, dim: int, n_head: int, ffn_hidden: int, norm: str, eps: float
    ) -> None:
        super().__init__()
        self.n_head = n_head
        self.norm1 = make_norm(norm, dim, eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = make_norm(norm, dim, eps)
        self.ffn = SwiGLU(dim, ffn_hidden)

    # projections of an already normalised input ---------------------------------------
    def q_of(self, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        d = h.shape[-1]
        q = F.linear(h, self.qkv.weight[:d])  # [B, T, D]
        return apply_rope(split_heads(q, self.n_head), *rope)

    def kv_of(self, h: torch.Tensor, rope: Rope) -> KV:
        d = h.shape[-1]
        k, v = F.linear(h, self.qkv.weight[d:]).split(d, dim=-1)  # [B, T, D] each
        # contiguous V: a view would keep the whole [B, T, 2D] projection alive in a cache
        v = split_heads(v, self.n_head).contiguous()  # [B, H, T, hd]
        return apply_rope(split_heads(k, self.n_head), *rope), v

    def finish(self, x: torch.Tensor, attn_heads: torch.Tensor) -> torch.Tensor:
        """Residual add of the projected attention, then the FFN sub-layer."""
        x = x + self.proj(merge_heads(attn_heads))
        return x + self.ffn(self.norm2(x))

    # the generation stream -----------------------------------------------------------
    def gen_forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        cross: KV | None = None,
        buf: StaticKV | ConcatKV | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Causal self-attention over the stream (plus ``buf``'s earlier K/V when given)
        and, when ``cross`` is given, attention to it; ``x`` is ``[B, T, D]``."""
        h = self.norm1(x)
        d = h.shape[-1]
        q, k, v = self.qkv(h).split(d, dim=-1)  # [B, T, D] each
        q = apply_rope(split_heads(q, self.n_head), *rope)
        k = apply_rope(split_heads(k, self.n_head), *rope)
        v = split_heads(v, self.n_head)
        if buf is not None:
            k, v = buf.update(k, v, offset)
        out = attend(q, k, v, causal=True)  # [B, H, T, hd]
        if cross is not None:
            out = out + attend(q, *cross)
        return self.finish(x, out)


# --------------------------------------------------------------------------- shared model plumbing


class PresetConfig:
    """Mixin for config dataclasses: ``from_name`` presets, ``to_dict`` / ``from_dict``.

    A subclass defines ``PRESETS: ClassVar[dict[str, dict]]`` (field overrides per name)."""

    PRESETS: dict[str, dict] = {}

    @classmethod
    def from_name(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown {cls.__name__} preset {name!r}; valid: {', '.join(cls.PRESETS)}"
            )
        from cir.checkpoint import check_field_types

        check_field_types(cls, overrides)  # type: ignore[arg-type]
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict):
        from cir.checkpoint import config_from_dict

        return config_from_dict(cls, data)


def init_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02
        if name.endswith("proj.weight") or name.endswith("ffn.down.weight"):
            std = 0.02 / math.sqrt(2 * n_layers)
        nn.init.normal_(p, mean=0.0, std=std)


def check(conditions: list[tuple[bool, str]], owner: str) -> None:
    """Raise one ValueError naming every failed condition."""
    failed = [msg for ok, msg in conditions if not ok]
    if failed:
        raise ValueError(f"{owner}: " + "; ".join(failed))


def layer_params(dim: int, ffn_hidden: int) -> int:
    """Parameters of one :class:`Layer` (4 D^2 attention, 3 D F SwiGLU, two norm gains)."""
    return 4 * dim * dim + 3 * dim * ffn_hidden + 2 * dim
