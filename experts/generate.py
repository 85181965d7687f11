"""Autoregressive sampling for every expert LM (cached or by full recomputation)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids ``[B]`` from logits ``[B, V]``; ``temperature <= 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt_ids`` ``[B, T]`` (or ``[T]``) by ``max_new_tokens``; returns
    ``[B, T + max_new_tokens]``. Without the cache every step reruns ``model(ids)``."""
    ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None: all tokens), got {top_k}")
    if not hasattr(model, "new_cache"):
        raise ValueError(f"a {getattr(model, 'kind', type(model).__name__)} model cannot "
                         "generate: give an expert LM checkpoint")
    device = next(model.parameters()).device
    ids = ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = [ids]
    if use_cache:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = model.prefill(ids, cache)
    for i in range(max_new_tokens):
        if not use_cache:
            logits = model(torch.cat(out, dim=1))[:, -1]
        nxt = sample_next(logits, temperature, top_k, generator)  # [B]
        out.append(nxt[:, None])
        if use_cache and i + 1 < max_new_tokens:
            logits = model.step(nxt, cache)
    model.train(was_training)
    return torch.cat(out, dim=1)
