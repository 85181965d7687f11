"""Decode benchmark: per-token latency on cache hit and cache miss, cache bytes, peak memory
and the largest context before out-of-memory, as the context N grows, for TLinFormer,
TConstFormer and the standard decoder (static and ``torch.cat`` caches), in the style of
seed 004's Figure 9.

All models share one preset (same parameter count) and hold random weights: decode cost
does not depend on what the weights have learned.

- *miss*: producing the next token when no cache can be reused for the N-token history.
  Transformer: the prefill of the N-token prompt. TLinFormer / TConstFormer: the step that
  slides a full window into the context (N is a multiple of ``w_og``), which recomputes the
  whole context side.
- *hit*: the median of the following single-token steps, all inside the window. Two paths:
  *eager* (the model's own ``step``: SDPA, one kernel launch per op) and, where shapes are
  static, the *static-shape step* (:class:`StaticDecodeStep`: token, position and every
  cache tensor at fixed addresses, attention over the full buffer with a length mask),
  captured in a CUDA graph on CUDA (one launch per token). The headline ``hit_ms`` is the
  graphed one where there is one. ``transformer-concat`` is never graphed: its cache is
  re-allocated by ``torch.cat`` at every step, so shapes and addresses change.
- *bandwidth bound*: bytes a hit step must read (weights + the K/V it attends to) over a
  measured device-copy bandwidth = the ideal time per token; efficiency = ideal / measured.
- *largest N* (CUDA): geometric growth from the largest swept N, then bisection, each probe
  = build a cache holding N tokens + one eager decode step, an out-of-memory meaning "does
  not fit". Windowed models build it for real (prefill + the sliding step, O(N)); the
  transformer's cache is allocated and the step run on it (its O(N^2) prefill is skipped).
- on CUDA: CUDA events around each call, one synchronisation per measurement, greedy
  tokens kept on the device; the memory budget is enforced with
  ``torch.cuda.set_per_process_memory_fraction``; the sweep of a model stops at its first
  out-of-memory N or when its share of the time budget would be overrun.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from cir.experts.layers import apply_rope, rope_cos_sin, split_heads
from cir.experts.registry import build_model
from cir.experts.tlinformer import WindowCache
from torch import nn

# benchmark name -> (architecture, cache kind for new_cache)
BENCH_MODELS: dict[str, tuple[str, str | None]] = {
    "tlinformer": ("tlinformer", None),
    "tconstformer": ("tconstformer", None),
    "transformer-static": ("transformer", "static"),
    "transformer-concat": ("transformer", "concat"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOT_GRAPHABLE = {
    "transformer-concat": "not graphed: its cache grows by torch.cat at every step, so tensor "
                          "shapes and addresses change (no static-shape step)",
}
SEARCH_SHARE = 0.3  # share of a model's time budget kept for the largest-N search


@dataclass
class BenchPoint:
    model: str
    n: int
    hit_ms: float | None = None  # headline: graphed (static-shape step) where there is one
    hit_eager_ms: float | None = None  # the model's own step
    miss_ms: float | None = None
    hit_path: str | None = None  # cuda-graph | static-step | eager
    graph_logit_diff: float | None = None  # max |logit| difference, static step vs eager
    graph_argmax_agree: bool | None = None
    graph_error: str | None = None
    cache_bytes: int | None = None  # K/V state held after the steps
    token_bytes: int | None = None  # the sequence's token ids, kept by windowed models
    peak_bytes: int | None = None  # CUDA: peak allocated during the point
    flops_hit: float | None = None
    flops_miss: float | None = None
    hit_bytes: int | None = None  # bytes a hit step must read (weights + attended K/V)
    ideal_hit_ms: float | None = None  # hit_bytes / measured bandwidth
    efficiency: float | None = None  # ideal_hit_ms / hit_ms
    efficiency_eager: float | None = None  # ideal_hit_ms / hit_eager_ms
    error: str | None = None


@dataclass
class BenchResult:
    preset: str
    device: str
    dtype: str
    params: dict[str, int]
    points: list[BenchPoint] = field(default_factory=list)
    max_n: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bandwidth_bytes_per_s: float | None = None  # device copy: (read + write bytes) / time
    memory_budget_bytes: int | None = None
    cuda_graphs: dict[str, str] = field(default_factory=dict)  # model -> hit path or reason
    wall_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """Inverse of :meth:`to_dict` (extra keys such as ``ratios`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        point_names = {f.name for f in dataclasses.fields(BenchPoint)}
        kwargs = {k: v for k, v in data.items() if k in names and k != "points"}
        points = [BenchPoint(**{k: v for k, v in p.items() if k in point_names})
                  for p in data.get("points", [])]
        return cls(**kwargs, points=points)

    def series(self, model: str, key: str) -> tuple[list[int], list[float]]:
        pts = [p for p in self.points if p.model == model and getattr(p, key) is not None]
        return [p.n for p in pts], [float(getattr(p, key)) for p in pts]


# --------------------------------------------------------------------------- analytic cost


def analytic_flops(cfg: Any, arch: str, n: int) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of one decode step at context ``n``.

    Dense part: 2 x (layer parameters + the tied head) per token processed. Attention part:
    QK^T and AV, 4 D per (query, key) pair. For the windowed models the miss uses seed 004's
    Eq. (4) per block (context + one full generation window), divided by nothing: it is the
    cost of the step that recomputes the context."""
    d, v = cfg.n_embd, cfg.vocab_size
    layer = 4 * d * d + 3 * d * cfg.ffn_hidden
    if arch == "transformer":
        head = 2 * v * d  # the prefill needs logits of its last token only
        dense = 2 * cfg.n_layer * layer
        hit = dense + head + cfg.n_layer * 4 * d * n
        miss = dense * n + head + cfg.n_layer * 4 * d * n * n / 2
        return {"hit": float(hit), "miss": float(miss)}
    h, woh, wog, nb = cfg.n_hidden, cfg.w_oh, cfg.w_og, cfg.n_blocks
    dense_tok = 2 * (nb * (h + 2) * layer + v * d)
    raw = 4 * d * n if arch == "tlinformer" else 0  # compress cross-attention to raw context
    hit = dense_tok + nb * (raw + (h + 1) * 4 * d * woh + (h + 2) * 4 * d * wog / 2)
    eq4 = d * (n * (2 * woh + wog) + h * (woh**2 + wog**2 + wog * woh) + wog**2 - wog * woh)
    # context side dense work: K/V of the raw context, restore Q/out/FFN over it (not in the
    # last block), everything else over w_oh positions
    ctx_dense = 2 * n * (2 * d * d) * nb + 2 * n * (2 * d * d + 3 * d * cfg.ffn_hidden) * (nb - 1)
    miss = dense_tok + 4 * nb * eq4 / 2 + ctx_dense + 2 * nb * (h + 1) * layer * woh
    return {"hit": float(hit), "miss": float(miss)}


def hit_bytes(cfg: Any, arch: str, n: int, elem: int, n_params: int) -> int:
    """Bytes one cache-hit step at context ``n`` must read from memory at least: every
    weight once (the tied embedding is the head's matrix) plus the K/V it attends to.
    Transformer: K and V of ``n`` positions in every layer. TLinFormer per block: the raw
    context K/V of the compress layer (``n`` positions; TConstFormer has none), the
    ``w_oh`` zip K/V of the hidden and restore layers and the ``w_og`` window K/V of all
    ``H + 2`` layers (counted whole: the static-shape step reads the whole window)."""
    kv = 2 * cfg.n_embd * elem  # K and V of one position in one layer
    if arch == "transformer":
        cache = cfg.n_layer * n * kv
    else:
        raw = n if arch == "tlinformer" else 0
        per_block = raw + (cfg.n_hidden + 1) * min(cfg.w_oh, n) + (cfg.n_hidden + 2) * cfg.w_og
        cache = cfg.n_blocks * per_block * kv
    return n_params * elem + cache


# --------------------------------------------------------------------------- devices


def memory_fraction(max_memory_gb: float, total_bytes: int) -> float:
    """The share of a device's ``total_bytes`` that a budget of ``max_memory_gb`` GiB is
    (at most 1: a budget above the card means the whole card)."""
    if not max_memory_gb > 0:
        raise ValueError(f"memory budget must be > 0 GiB, got {max_memory_gb}")
    return min(1.0, max_memory_gb * 2**30 / total_bytes)


def cuda_index(dev: torch.device, current: Callable[[], int] | None = None) -> int:
    """The device index of ``dev`` (``cuda`` alone: the current device), which
    ``torch.cuda.set_per_process_memory_fraction`` needs."""
    if dev.index is not None:
        return dev.index
    return (current or torch.cuda.current_device)()


@torch.no_grad()
def measure_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Memory bandwidth of a device-to-device copy of ``nbytes`` (default 1 GiB on CUDA,
    64 MiB on CPU): (bytes read + bytes written) per second, best of ``reps`` on CPU, the
    mean of ``reps`` copies between two CUDA events on CUDA."""
    cuda = device.type == "cuda"
    nbytes = nbytes or (2**30 if cuda else 2**26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        seconds = min(times)
    return 2 * nbytes / seconds


# --------------------------------------------------------------------------- static-shape step


def decode_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of one query per head ``[B, H, 1, hd]`` over ``k``/``v``
    ``[B, H, L, hd]`` (contiguous), counting only the positions where ``valid`` (bool
    ``[L]``) holds. No shape depends on how many positions are valid, so it can be captured
    in a CUDA graph. Written out so that a long ``L`` spreads over the whole GPU: scores by
    one matrix-vector product per head, a max / exp / sum in at least fp32 (parallel reductions, not a
    softmax kernel of one block per row), and the weighted sum of V as a batched product
    over chunks of ``L`` followed by a sum."""
    b, h, length, hd = k.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    scores = torch.matmul(k, q.transpose(-1, -2)).squeeze(-1).to(acc) * hd**-0.5  # [B, H, L]
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    denom = weights.sum(-1, keepdim=True)  # [B, H, 1]
    chunk = math.gcd(length, 1024)
    parts = length // chunk
    num = torch.matmul(weights.to(v.dtype).view(b, h, parts, 1, chunk),
                       v.view(b, h, parts, chunk, hd))  # [B, H, parts, 1, hd]
    out = num.to(acc).sum(2) / denom[..., None]  # [B, H, 1, hd]
    return out.to(q.dtype)


def _static_layer(
    layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
    cross: tuple[torch.Tensor, torch.Tensor] | None, buf: Any, off: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``Layer.gen_forward`` for one token with the write offset ``off`` a device tensor:
    K/V written in place at ``off``, attention over the whole buffer with the mask
    ``valid`` (positions ``<= off``)."""
    h = layer.norm1(x)
    d = h.shape[-1]
    q, k, v = layer.qkv(h).split(d, dim=-1)
    q = apply_rope(split_heads(q, layer.n_head), *rope)
    buf.k.index_copy_(2, off, apply_rope(split_heads(k, layer.n_head), *rope))
    buf.v.index_copy_(2, off, split_heads(v, layer.n_head))
    out = decode_attend(q, buf.k, buf.v, valid)
    if cross is not None:
        out = out + decode_attend(q, *cross)
    return layer.finish(x, out)


class StaticDecodeStep:
    """One greedy decode step whose every input sits in a fixed buffer: the token ids
    ``[B]`` and the position (device tensors) and the cache's tensors (K/V buffers written
    in place, a windowed model's context K/V fixed until the next slide). Calling it runs
    the step for the current position and returns the logits ``[B, V]``; :meth:`advance`
    feeds the greedy token back and moves the position on, on the device. Nothing reads a
    host value, so ``step(); advance()`` can be captured in a CUDA graph and replayed.

    Valid for a transformer with a static cache, and for TLinFormer / TConstFormer while
    the next steps stay inside the current window (cache hits). It computes what
    ``model.step`` computes (same weights, same cache; attention through
    :func:`decode_attend`), but updates no host-side counter: call :meth:`commit` with the
    number of steps run to bring ``cache.length`` up to date."""

    def __init__(self, model: nn.Module, cache: Any, token: torch.Tensor) -> None:
        self.model, self.cache = model, cache
        self.windowed = isinstance(cache, WindowCache)
        if not self.windowed and getattr(cache, "kind", None) != "static":
            raise ValueError(NOT_GRAPHABLE["transformer-concat"])
        if self.windowed and model.will_sync(cache):
            raise ValueError("the next step slides the window (a cache miss): shapes change")
        dev = token.device
        start = cache.ctx_len if self.windowed else 0
        self.token = token.reshape(-1).clone()
        self.pos = torch.tensor([cache.length], device=dev)
        self.off = torch.tensor([cache.length - start], device=dev)
        first = cache.bufs[0][0] if self.windowed else cache.bufs[0]
        self.capacity = first.k.shape[-2]
        self.room = self.capacity - (cache.length - start)  # steps left in the buffer
        self._slots = torch.arange(self.capacity, device=dev)

    def __call__(self) -> torch.Tensor:
        m, c = self.model, self.cache
        cfg = m.config
        if self.windowed:
            c.tokens.index_copy_(1, self.pos, self.token[:, None])
        x = m.emb(self.token)[:, None]  # [B, 1, D]
        rope = rope_cos_sin(self.pos, cfg.n_embd // cfg.n_head, cfg.rope_base, x.dtype)
        valid = self._slots <= self.off
        if self.windowed:
            for i, block in enumerate(m.blocks):
                kvs = c.ctx_kv[i] if c.ctx_kv is not None else None
                for j, layer in enumerate(block.layers):
                    cross = kvs[j] if kvs is not None else None
                    x = _static_layer(layer, x, rope, cross, c.bufs[i][j], self.off, valid)
        else:
            for layer, buf in zip(m.layers, c.bufs, strict=True):
                x = _static_layer(layer, x, rope, None, buf, self.off, valid)
        return m.head(x[:, -1])

    def advance(self, logits: torch.Tensor) -> None:
        """Greedy feedback on the device: next token = argmax, position + 1."""
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        self.off.add_(1)

    def commit(self, steps: int) -> None:
        self.cache.length += steps


class _Eagerly:
    """Runs a :class:`StaticDecodeStep` without capture (CPU, or graphs turned off)."""

    path = "static-step"

    def __init__(self, step: StaticDecodeStep) -> None:
        self.step = step

    def replay(self) -> torch.Tensor:
        out = self.step()
        self.step.advance(out)
        return out


class _CudaGraph:
    """``step(); advance()`` captured once in a CUDA graph; :meth:`replay` = one token."""

    path = "cuda-graph"

    def __init__(self, step: StaticDecodeStep, warmup: int = 2) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (kernels, cuBLAS handles)
            for _ in range(warmup):
                step()  # the same position and token: rewrites the same K/V
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()
            step.advance(self.out)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


# --------------------------------------------------------------------------- timing


class _Clock:
    """Wall time on CPU, CUDA events on GPU (read after one synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[Any, Any]] = []

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, begin: Any) -> None:
        self.marks.append((begin, self.start()))

    def millis(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


def _new_cache(model: nn.Module, kind: str | None, length: int):
    return model.new_cache(1, length) if kind is None else model.new_cache(1, length, kind=kind)


def _cache_length(kind: str | None, n: int, steps: int) -> int:
    """Positions a point needs: the miss, ``steps`` eager hits, one step compared between
    the two paths and ``steps`` static-shape hits. A static transformer cache is rounded to
    64 positions so that :func:`decode_attend` sums V in chunks of at least 64."""
    length = n + 2 * steps + 2
    return _round_up(length, 64) if kind == "static" else length


@torch.no_grad()
def _measure(
    model: nn.Module, kind: str | None, n: int, steps: int, device: torch.device, graphs: str
) -> dict[str, Any]:
    """Miss ms, median eager hit ms and cache nbytes at context ``n``; with ``graphs``
    (``cuda`` or ``static``) also the static-shape hits and their agreement with eager."""
    prompt = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    cache = _new_cache(model, kind, _cache_length(kind, n, steps))
    clock = _Clock(device)
    windowed = kind is None
    if windowed:
        logits = model.prefill(prompt, cache)
        if not model.will_sync(cache):
            raise ValueError(f"N={n} must be a multiple of w_og={model.config.w_og}")
    else:
        t = clock.start()
        logits = model.prefill(prompt, cache)
        clock.stop(t)
    for _ in range(steps + int(windowed)):  # windowed: the first step is the slide (miss)
        t = clock.start()
        logits = model.step(logits.argmax(-1), cache)
        clock.stop(t)
    ms = clock.millis()
    out: dict[str, Any] = {"miss_ms": ms[0], "hit_eager_ms": statistics.median(ms[1:]),
                           "hit_path": "eager"}
    if graphs != "off" and kind != "concat":
        try:
            out.update(_measure_static(model, cache, logits, steps, device, graphs))
        except Exception as exc:  # noqa: BLE001 - the eager numbers stand; say why
            out["graph_error"] = "oom" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]
    out["nbytes"] = cache.nbytes()
    return out


def _measure_static(
    model: nn.Module, cache: Any, logits: torch.Tensor, steps: int, device: torch.device,
    graphs: str,
) -> dict[str, Any]:
    """Check the static-shape step against ``model.step`` at one position (the same token),
    then time ``steps`` static-shape hits (CUDA graph replays on CUDA)."""
    token = logits.argmax(-1)
    step = StaticDecodeStep(model, cache, token)
    if step.room < steps + 1:
        raise ValueError(f"{steps + 1} static steps do not fit the {step.capacity}-slot buffer")
    runner = _CudaGraph(step) if graphs == "cuda" else _Eagerly(step)
    ref = model.step(token, cache)  # eager, at the position the static step starts from
    got = runner.replay()  # same position, same token: rewrites the same K/V
    diff = (got.float() - ref.float()).abs().max().item()
    agree = bool(torch.equal(got.argmax(-1), ref.argmax(-1)))
    clock = _Clock(device)
    for _ in range(steps):
        t = clock.start()
        runner.replay()
        clock.stop(t)
    ms = clock.millis()
    step.commit(steps)  # model.step already counted the compared position
    return {"hit_static_ms": statistics.median(ms), "hit_path": runner.path,
            "graph_logit_diff": diff, "graph_argmax_agree": agree}


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "ALLOC_FAILED" in text)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_guarded(fn: Callable[[], Any], device: torch.device) -> tuple[bool, Any, int | None]:
    """Run ``fn`` with the device's peak-memory counter reset: ``(ok, its result, peak
    bytes)`` (peak None off CUDA). An out-of-memory is ``ok=False`` with the memory freed;
    any other error is re-raised."""
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ok, out = True, None
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
        if not _is_oom(exc):
            raise
        ok = False
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if not ok:  # outside the handler: the failed frames' tensors are released by now
        _free(device)
    return ok, out, peak


def _point(
    name: str, model: nn.Module, kind: str | None, arch: str, n: int, steps: int,
    device: torch.device, graphs: str, bandwidth: float | None, n_params: int,
) -> BenchPoint:
    """One measured point; an out-of-memory becomes ``error='oom'``."""
    point = BenchPoint(model=name, n=n)
    flops = analytic_flops(model.config, arch, n)
    point.flops_hit, point.flops_miss = flops["hit"], flops["miss"]
    weight = model.emb.weight
    point.hit_bytes = hit_bytes(model.config, arch, n, weight.element_size(), n_params)
    ok, m, peak = _run_guarded(partial(_measure, model, kind, n, steps, device, graphs), device)
    if not ok:
        point.error = "oom"
        return point
    point.miss_ms, point.hit_eager_ms = m["miss_ms"], m["hit_eager_ms"]
    point.hit_ms = m.get("hit_static_ms", m["hit_eager_ms"])
    point.hit_path = m["hit_path"]
    point.graph_logit_diff = m.get("graph_logit_diff")
    point.graph_argmax_agree = m.get("graph_argmax_agree")
    point.graph_error = m.get("graph_error")
    point.cache_bytes, point.token_bytes = m["nbytes"]["kv"], m["nbytes"]["tokens"]
    point.peak_bytes = peak
    if bandwidth:
        point.ideal_hit_ms = point.hit_bytes / bandwidth * 1e3
        point.efficiency = point.ideal_hit_ms / point.hit_ms
        point.efficiency_eager = point.ideal_hit_ms / point.hit_eager_ms
    return point


# --------------------------------------------------------------------------- largest N


def search_max_n(
    probe: Callable[[int], bool | tuple[bool, dict[str, Any]]],
    start: int,
    step: int,
    known_ok: int | None = None,
    limit: int = 2**28,
    rel_tol: float = 0.02,
    deadline: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """The largest multiple of ``step`` for which ``probe`` holds, assuming it holds up to
    some N and fails above: grow geometrically (x2) from ``known_ok`` (or probe ``start``,
    halving while that fails) to the first failure, then bisect until the bracket is within
    ``rel_tol`` (or one ``step``). O(log N) probes. A probe is not started when the time it
    would take (the last probe's duration, scaled by N) would pass ``deadline``.

    ``probe`` returns ``ok`` or ``(ok, extra)``; every probe is recorded with ``extra``.
    Returns ``fits`` (largest N that held; None if none did), ``oom_at`` (smallest N that
    failed; None if none did), ``probes`` and ``stopped`` (why the search ended early)."""
    probes: list[dict[str, Any]] = []

    def run(n: int) -> bool:
        t = clock()
        got = probe(n)
        ok, extra = got if isinstance(got, tuple) else (got, {})
        probes.append({"n": n, "ok": bool(ok), "s": clock() - t, **extra})
        return bool(ok)

    def affordable(n: int) -> bool:
        if deadline is None:
            return True
        need = probes[-1]["s"] * max(1.0, n / probes[-1]["n"]) if probes else 0.0
        return clock() + need <= deadline

    lo, hi, stopped = known_ok, None, None

    def settle(n: int) -> None:  # one probe at n moves a bound, or the budget ends the search
        nonlocal lo, hi, stopped
        if not affordable(n):
            stopped = "time budget"
        elif run(n):
            lo = n
        else:
            hi = n

    n = _round_up(start, step) if lo is None else _round_up(2 * lo, step)
    while hi is None:  # bracket the limit
        if n > limit:
            stopped = f"search limit N={limit}"
            break
        if not affordable(n):
            stopped = "time budget"
            break
        if run(n):
            lo, n = n, _round_up(2 * n, step)
        else:
            hi = n
    while lo is None and hi is not None and stopped is None:  # the first probe failed
        n = (hi // 2) // step * step
        if n < step:
            break
        settle(n)
    while lo is not None and hi is not None and stopped is None:  # bisect
        if hi - lo <= step or hi <= lo * (1 + rel_tol):
            break
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        settle(mid)
    return {"fits": lo, "oom_at": hi, "probes": probes, "stopped": stopped}


@torch.no_grad()
def probe_context(
    model: nn.Module, kind: str | None, n: int, device: torch.device
) -> tuple[bool, dict[str, Any]]:
    """Whether a cache holding ``n`` tokens plus one decode step fit in memory: windowed
    models prefill ``n`` tokens and take the step that slides the window (the O(N)
    recomputation of the context side, their memory peak); the transformer gets its cache
    of ``n`` positions allocated (zeros; its O(N^2) prefill is skipped) and one step.
    ``(ok, {"peak_bytes": ...})``; an out-of-memory is ``ok=False``, tensors freed."""

    def build_and_step() -> None:
        token = torch.zeros(1, dtype=torch.long, device=device)
        if kind is None:
            cache = model.new_cache(1, n + 1)
            model.prefill(torch.randint(0, model.config.vocab_size, (1, n), device=device),
                          cache)
        else:
            cache = model.new_cache(1, n + 1, kind=kind)
            if kind == "concat":
                c = model.config
                like = model.emb.weight
                for buf in cache.bufs:
                    shape = (1, c.n_head, n, c.n_embd // c.n_head)
                    buf.k = torch.zeros(shape, dtype=like.dtype, device=device)
                    buf.v = torch.zeros(shape, dtype=like.dtype, device=device)
            cache.length = n
        model.step(token, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ok, _, peak = _run_guarded(build_and_step, device)
    _free(device)
    return ok, {"peak_bytes": peak}


# --------------------------------------------------------------------------- the sweep


def default_ns(device_type: str) -> list[int]:
    """1K .. 32K on CPU; 1K .. 4M on CUDA (each model stops at its first OOM)."""
    top = 15 if device_type == "cpu" else 22
    return [2**k for k in range(10, top + 1)]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _sweep(
    measure: Callable[[int], BenchPoint], name: str, ns: list[int], budget_s: float | None,
    on_point: Callable[[BenchPoint], None] | None,
) -> tuple[list[BenchPoint], str | None]:
    """Points for one model, largest N last; stops at an OOM or when the next point would
    overrun ``budget_s`` (projected from the growth of the last two)."""
    points: list[BenchPoint] = []
    durations: list[float] = []
    t0 = time.perf_counter()
    for n in ns:
        if budget_s is not None and durations:
            growth = max(2.0, durations[-1] / durations[-2]) if len(durations) > 1 else 4.0
            if time.perf_counter() - t0 + durations[-1] * growth > budget_s:
                return points, f"{name}: sweep stopped before N={n} (time budget)"
        start = time.perf_counter()
        point = measure(n)
        durations.append(time.perf_counter() - start)
        points.append(point)
        if on_point is not None:
            on_point(point)
        if point.error:
            break
    return points, None


def decode_bench(
    preset: str = "small",
    models: list[str] | tuple[str, ...] = tuple(BENCH_MODELS),
    ns: list[int] | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    steps: int = 8,
    max_memory_gb: float | None = None,
    time_budget_s: float | None = None,
    cuda_graphs: bool | None = None,
    max_n_search: bool | None = None,
    search_limit: int = 2**28,
    bandwidth_bytes_per_s: float | None = None,
    seed: int = 0,
    on_point: Callable[[BenchPoint], None] | None = None,
    on_model: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Run the decode benchmark (see the module docstring).

    ``cuda_graphs`` (default: on for CUDA) times the static-shape step, captured in a CUDA
    graph on CUDA and run as is on CPU. ``max_n_search`` (default: on for CUDA) searches
    the largest N before out-of-memory; without it the largest N is the sweep's.
    ``bandwidth_bytes_per_s`` replaces the measured copy bandwidth of the bandwidth bound.
    ``time_budget_s`` is shared equally by the models; within a model's share the search
    keeps ``SEARCH_SHARE`` of it. ``on_model`` gets the partial result after each model."""
    t_start = time.perf_counter()
    unknown = [m for m in models if m not in BENCH_MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; valid: {', '.join(BENCH_MODELS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    graphs = cuda_graphs if cuda_graphs is not None else dev.type == "cuda"
    graph_mode = "off" if not graphs else ("cuda" if dev.type == "cuda" else "static")
    search = max_n_search if max_n_search is not None else dev.type == "cuda"
    w_og = build_model("tlinformer", preset, vocab_size=2).config.w_og
    windowed = any(BENCH_MODELS[m][1] is None for m in models)
    most = (w_og - 2) // 2 if graph_mode != "off" else w_og - 1
    if windowed and not 1 <= steps <= most:
        raise ValueError(f"steps must be in 1..{most} for w_og={w_og} (all hits inside one "
                         "window" + (", eager then static-shape" if graph_mode != "off" else "")
                         + ")")
    ns = sorted({_round_up(n, w_og) for n in (ns or default_ns(dev.type))})
    if dev.type == "cuda":
        dev = torch.device("cuda", cuda_index(dev))
    result = BenchResult(preset=preset, device=_device_name(dev), dtype=dtype, params={})
    result.notes.append("random weights: decode cost does not depend on training")
    if graph_mode == "static":
        result.notes.append("CUDA graphs need a GPU: the static-shape step runs uncaptured")
    capped = dev.type == "cuda" and max_memory_gb is not None
    if capped:
        total = torch.cuda.get_device_properties(dev.index).total_memory
        fraction = memory_fraction(max_memory_gb, total)
        torch.cuda.set_per_process_memory_fraction(fraction, dev.index)
        result.memory_budget_bytes = int(fraction * total)
        result.notes.append(f"memory budget {max_memory_gb} GiB (allocator cap; the CUDA "
                            "context comes on top)")
    elif max_memory_gb is not None:
        result.notes.append("--max-memory-gb applies to CUDA only: ignored")
    budget = None if time_budget_s is None else time_budget_s / len(models)
    try:
        result.bandwidth_bytes_per_s = bandwidth_bytes_per_s or measure_bandwidth(dev)
        for name in models:
            _bench_model(result, name, preset, ns, steps, dev, DTYPES[dtype], budget,
                         graph_mode, search, search_limit, seed, w_og, on_point)
            result.wall_s = time.perf_counter() - t_start
            if on_model is not None:
                on_model(result)
    finally:
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0, dev.index)
    return result


def _bench_model(
    result: BenchResult, name: str, preset: str, ns: list[int], steps: int,
    dev: torch.device, dtype: torch.dtype, budget: float | None, graph_mode: str,
    search: bool, search_limit: int, seed: int, w_og: int,
    on_point: Callable[[BenchPoint], None] | None,
) -> None:
    """Sweep one model over ``ns``, then find its largest N; record both in ``result``."""
    arch, kind = BENCH_MODELS[name]
    torch.manual_seed(seed)
    model = build_model(arch, preset).to(dev, dtype).eval()
    result.params[name] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    mode = "off" if name in NOT_GRAPHABLE else graph_mode
    warm = _measure(model, kind, ns[0], 2, dev, mode)  # warm-up: allocator, kernels, capture
    if name in NOT_GRAPHABLE:
        result.cuda_graphs[name] = NOT_GRAPHABLE[name]
    elif mode == "off":
        result.cuda_graphs[name] = "off"
    elif warm.get("graph_error"):
        result.cuda_graphs[name] = f"failed, eager only: {warm['graph_error']}"
        mode = "off"
    else:
        result.cuda_graphs[name] = warm["hit_path"]
    bandwidth = result.bandwidth_bytes_per_s
    sweep_budget = None if budget is None else budget * (1 - SEARCH_SHARE * search)
    measure = partial(_point, name, model, kind, arch, steps=steps, device=dev, graphs=mode,
                      bandwidth=bandwidth, n_params=result.params[name])
    points, note = _sweep(measure, name, ns, sweep_budget, on_point)
    result.points.extend(points)
    if note:
        result.notes.append(note)
    ok = [p.n for p in points if p.error is None]
    oom = next((p.n for p in points if p.error == "oom"), None)
    if search:
        found = search_max_n(partial(probe_context, model, kind, device=dev), start=ns[0],
                             step=w_og, known_ok=max(ok) if ok else None, limit=search_limit,
                             deadline=None if budget is None else t0 + budget)
        fits = found["fits"]
        peak = next((p.get("peak_bytes") for p in found["probes"] if p["n"] == fits), None)
        result.max_n[name] = {**found, "peak_bytes_at_fits": peak,
                              "method": "cache of N tokens + one eager decode step; x2 growth "
                                        "from the largest swept N, then bisection"}
        if found["stopped"]:
            result.notes.append(f"{name}: largest-N search stopped early ({found['stopped']})")
    else:
        result.max_n[name] = {"fits": max(ok) if ok else None, "oom_at": oom,
                              "method": "sweep only (largest N measured)"}
    del model, measure
    _free(dev)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- reporting


def ratios(result: BenchResult, ours: str = "tlinformer") -> list[dict[str, Any]]:
    """Baseline time / ``ours`` time for hit (headline path and eager) and miss, and
    baseline cache / ours, at every N both measured."""
    mine = {p.n: p for p in result.points if p.model == ours and p.error is None}
    rows = []
    for p in result.points:
        if p.model == ours or p.error or p.n not in mine:
            continue
        m = mine[p.n]
        rows.append({
            "baseline": p.model, "n": p.n,
            "hit": p.hit_ms / m.hit_ms, "miss": p.miss_ms / m.miss_ms,
            "hit_eager": (p.hit_eager_ms / m.hit_eager_ms
                          if p.hit_eager_ms and m.hit_eager_ms else None),
            "cache": p.cache_bytes / m.cache_bytes if m.cache_bytes else None,
        })
    return rows


def headline_ratios(
    result: BenchResult, ours: str = "tlinformer",
    compared: tuple[str, ...] = ("transformer-static", "transformer-concat"),
) -> dict[str, Any] | None:
    """The ratios at the largest N that ``ours`` and every model of ``compared`` present in
    the result all measured (rows for every other model measured there too), plus the
    largest-N ratios. Time and cache ratios are baseline / ``ours`` (above 1: ``ours`` is
    faster or smaller); ``max_n`` is ``ours`` / baseline (above 1: ``ours`` holds a longer
    context). None when there is no such N."""
    measured: dict[str, set[int]] = {}
    for p in result.points:
        if p.error is None:
            measured.setdefault(p.model, set()).add(p.n)
    need = [ours] + [m for m in compared if m in measured]
    if ours not in measured or len(need) < 2:
        return None
    common = set.intersection(*(measured[m] for m in need))
    if not common:
        return None
    n = max(common)
    rows = [r for r in ratios(result, ours) if r["n"] == n]
    mine = (result.max_n.get(ours) or {}).get("fits")
    for r in rows:
        theirs = (result.max_n.get(r["baseline"]) or {}).get("fits")
        r["max_n"] = mine / theirs if mine and theirs else None
    return {"n": n, "ours": ours, "compared": need[1:], "rows": rows}


def _tokens(n: int) -> str:
    """1536 -> '1.5K', 5_767_168 -> '5.50M'."""
    if n >= 2**20:
        return f"{n / 2**20:.2f}M"
    return f"{n / 2**10:.3g}K" if n >= 2**10 else str(n)


MODEL_COLORS = {"tlinformer": "C0", "tconstformer": "C1", "transformer-static": "C2",
                "transformer-concat": "C3"}


def plot_decode(result: BenchResult, path: str | Path) -> Path:
    """Six log-log panels after seed 004's Figure 9: (a) per-token latency on a cache hit
    (headline path, eager, and the bandwidth bound), (b) latency on a miss, (c) memory:
    cache held and peak, (d) bandwidth efficiency, (e) each baseline's time over
    TLinFormer's, (f) the largest N before out-of-memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(17, 9.5))
    names = list(dict.fromkeys(p.model for p in result.points))
    for name in names:
        color = MODEL_COLORS.get(name)
        pts = [p for p in result.points if p.model == name and p.error is None]
        ns = [p.n for p in pts]
        graphed = [p for p in pts if p.hit_path not in (None, "eager")]
        path_name = graphed[-1].hit_path if graphed else "eager"
        ax[0, 0].plot(ns, [p.hit_ms for p in pts], "o-", color=color,
                      label=f"{name} ({path_name})")
        if graphed:
            ax[0, 0].plot(ns, [p.hit_eager_ms for p in pts], "x--", color=color, alpha=0.6,
                          label=f"{name} (eager)")
        ideal = [(p.n, p.ideal_hit_ms) for p in pts if p.ideal_hit_ms]
        if ideal:
            ax[0, 0].plot(*zip(*ideal, strict=True), ":", color=color, alpha=0.8)
        ax[0, 1].plot(ns, [p.miss_ms for p in pts], "o-", color=color, label=name)
        ax[0, 2].plot(ns, [p.cache_bytes / 2**30 for p in pts], "o-", color=color,
                      label=f"{name} cache")
        peaks = [(p.n, p.peak_bytes / 2**30) for p in pts if p.peak_bytes]
        if peaks:
            ax[0, 2].plot(*zip(*peaks, strict=True), "x--", color=color, alpha=0.6,
                          label=f"{name} peak")
        eff = [(p.n, p.efficiency) for p in pts if p.efficiency]
        if eff:
            ax[1, 0].plot(*zip(*eff, strict=True), "o-", color=color, label=name)
        eff_eager = [(p.n, p.efficiency_eager) for p in graphed if p.efficiency_eager]
        if eff_eager:
            ax[1, 0].plot(*zip(*eff_eager, strict=True), "x--", color=color, alpha=0.6)
    rows = ratios(result)
    for base in [n for n in names if n != "tlinformer"]:
        mine = [r for r in rows if r["baseline"] == base]
        if not mine:
            continue
        color = MODEL_COLORS.get(base)
        ax[1, 1].plot([r["n"] for r in mine], [r["hit"] for r in mine], "o-", color=color,
                      label=f"{base} / tlin, hit")
        ax[1, 1].plot([r["n"] for r in mine], [r["miss"] for r in mine], "x--", color=color,
                      label=f"{base} / tlin, miss")
    if ax[1, 1].has_data():
        ax[1, 1].axhline(1.0, color="gray", lw=0.8)
    if result.memory_budget_bytes:
        ax[0, 2].axhline(result.memory_budget_bytes / 2**30, color="gray", ls="-.", lw=0.8,
                         label="memory budget")
    fits = {m: v.get("fits") for m, v in result.max_n.items() if v.get("fits")}
    # linear from 0, in units of 2^20 tokens (the labels' M): the limits are often within
    # a few percent of each other, which a log axis cut at the smallest bar blows up
    bars = ax[1, 2].bar(range(len(fits)), [v / 2**20 for v in fits.values()],
                        color=[MODEL_COLORS.get(m, "C7") for m in fits])
    ax[1, 2].set_xticks(range(len(fits)), [m.replace("-", "-\n") for m in fits], fontsize=8)
    for bar, value in zip(bars, fits.values(), strict=True):
        ax[1, 2].annotate(_tokens(value), (bar.get_x() + bar.get_width() / 2, value / 2**20),
                          ha="center", va="bottom", fontsize=8)
    budget = (f"{result.memory_budget_bytes / 2**30:.0f} GiB budget"
              if result.memory_budget_bytes else "whole device")
    titles = [
        ("(a) per-token latency, cache hit (dotted: bandwidth bound)", "ms"),
        ("(b) latency, cache miss", "ms"),
        ("(c) memory: cache held (o) and peak (x)", "GiB"),
        ("(d) bandwidth efficiency, ideal / measured hit", "fraction"),
        ("(e) baseline time / TLinFormer time", "x"),
        (f"(f) largest N before out-of-memory ({budget})", "tokens (M = 2^20)"),
    ]
    for i, (a, (title, unit)) in enumerate(zip(ax.flat, titles, strict=True)):
        a.set_title(title, fontsize=10)
        a.set_ylabel(unit)
        a.grid(alpha=0.3)
        if not a.has_data():  # e.g. no TLinFormer points to divide by
            a.text(0.5, 0.5, "no data", ha="center", va="center", transform=a.transAxes)
            continue
        if i == 5:  # bars: a linear axis from 0
            a.set_ylim(bottom=0)
            continue
        a.set_yscale("log")
        a.set_xlabel("context N (tokens)")
        a.set_xscale("log", base=2)
        a.legend(fontsize=7)
    fig.suptitle(f"Decode benchmark: preset {result.preset}, {result.device}, {result.dtype}, "
                 "random weights")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
