"""Decode benchmark: per-token latency on cache hit and cache miss, cache bytes and peak memory
as the context N grows, for TLinFormer, TConstFormer and the standard decoder (static and
``torch.cat`` caches), in the style of seed 004's Figure 9.

All models share one preset (same parameter count) and hold random weights: decode cost
does not depend on what the weights have learned.

- *miss*: producing the next token when no cache can be reused for the N-token history.
  Transformer: the prefill of the N-token prompt. TLinFormer / TConstFormer: the step that
  slides a full window into the context (N is a multiple of ``w_og``), which recomputes the
  whole context side.
- *hit*: the median of the following steps, all inside the window.
- on CUDA: CUDA events around each call, one synchronisation per measurement, greedy
  tokens kept on the device (no host sync per token); the memory budget is enforced with
  ``torch.cuda.set_per_process_memory_fraction`` and the sweep of a model stops at its
  first out-of-memory N (then refines the largest N that fits).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from cir.experts.registry import build_model
from torch import nn

# benchmark name -> (architecture, cache kind for new_cache)
BENCH_MODELS: dict[str, tuple[str, str | None]] = {
    "tlinformer": ("tlinformer", None),
    "tconstformer": ("tconstformer", None),
    "transformer-static": ("transformer", "static"),
    "transformer-concat": ("transformer", "concat"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchPoint:
    model: str
    n: int
    hit_ms: float | None = None
    miss_ms: float | None = None
    cache_bytes: int | None = None  # K/V state held after the steps
    token_bytes: int | None = None  # the sequence's token ids, kept by windowed models
    peak_bytes: int | None = None  # CUDA: peak allocated during the point
    flops_hit: float | None = None
    flops_miss: float | None = None
    error: str | None = None


@dataclass
class BenchResult:
    preset: str
    device: str
    dtype: str
    params: dict[str, int]
    points: list[BenchPoint] = field(default_factory=list)
    max_n: dict[str, dict[str, int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


@torch.no_grad()
def _measure(
    model: nn.Module, kind: str | None, n: int, steps: int, device: torch.device
) -> tuple[float, float, dict[str, int]]:
    """(miss ms, median hit ms, cache nbytes) at context ``n``."""
    prompt = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    cache = _new_cache(model, kind, n + steps + 1)
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
    return ms[0], statistics.median(ms[1:]), cache.nbytes()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc)


def _point(
    name: str, model: nn.Module, kind: str | None, arch: str, n: int, steps: int,
    device: torch.device,
) -> BenchPoint:
    """One measured point; an out-of-memory becomes ``error='oom'``."""
    point = BenchPoint(model=name, n=n)
    flops = analytic_flops(model.config, arch, n)
    point.flops_hit, point.flops_miss = flops["hit"], flops["miss"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        miss, hit, nbytes = _measure(model, kind, n, steps, device)
    except Exception as exc:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
        if not _is_oom(exc):
            raise
        point.error = "oom"
    if point.error:  # outside the handler: the failed frames' tensors are released by now
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return point
    point.miss_ms, point.hit_ms = miss, hit
    point.cache_bytes, point.token_bytes = nbytes["kv"], nbytes["tokens"]
    if device.type == "cuda":
        point.peak_bytes = torch.cuda.max_memory_allocated(device)
    return point


# --------------------------------------------------------------------------- the sweep


def default_ns(device_type: str) -> list[int]:
    """1K .. 32K on CPU; 1K .. 4M on CUDA (each model stops at its first OOM)."""
    top = 15 if device_type == "cpu" else 22
    return [2**k for k in range(10, top + 1)]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _refine_max_n(
    name: str, model: nn.Module, kind: str | None, arch: str, lo: int, hi: int, tries: int,
    step: int, device: torch.device,
) -> tuple[int, int]:
    """Narrow the largest N that fits between ``lo`` (fits) and ``hi`` (OOM)."""
    for _ in range(tries):
        mid = _round_up(int(math.sqrt(lo * hi)), step)
        if not lo < mid < hi:
            break
        ok = _point(name, model, kind, arch, mid, 2, device).error is None
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, hi


def _sweep(
    name: str, model: nn.Module, ns: list[int], steps: int, device: torch.device,
    budget_s: float | None, on_point: Callable[[BenchPoint], None] | None,
) -> tuple[list[BenchPoint], str | None]:
    """Points for one model, largest N last; stops at an OOM or when the next point would
    overrun ``budget_s`` (projected from the growth of the last two)."""
    arch, kind = BENCH_MODELS[name]
    points: list[BenchPoint] = []
    durations: list[float] = []
    t0 = time.perf_counter()
    for n in ns:
        if budget_s is not None and durations:
            growth = max(2.0, durations[-1] / durations[-2]) if len(durations) > 1 else 4.0
            if time.perf_counter() - t0 + durations[-1] * growth > budget_s:
                return points, f"{name}: stopped before N={n} (time budget)"
        start = time.perf_counter()
        point = _point(name, model, kind, arch, n, steps, device)
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
    refine: int = 2,
    seed: int = 0,
    on_point: Callable[[BenchPoint], None] | None = None,
) -> BenchResult:
    """Run the decode benchmark (see the module docstring); ``time_budget_s`` is shared
    equally by the models."""
    unknown = [m for m in models if m not in BENCH_MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; valid: {', '.join(BENCH_MODELS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    w_og = build_model("tlinformer", preset, vocab_size=2).config.w_og
    ns = sorted({_round_up(n, w_og) for n in (ns or default_ns(dev.type))})
    result = BenchResult(preset=preset, device=_device_name(dev), dtype=dtype, params={})
    result.notes.append("random weights: decode cost does not depend on training")
    if dev.type == "cuda":
        dev = torch.device("cuda", cuda_index(dev))
    capped = dev.type == "cuda" and max_memory_gb is not None
    if capped:
        total = torch.cuda.get_device_properties(dev.index).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(max_memory_gb, total),
                                                   dev.index)
        result.notes.append(f"memory budget {max_memory_gb} GiB")
    elif max_memory_gb is not None:
        result.notes.append("--max-memory-gb applies to CUDA only: ignored")
    budget = None if time_budget_s is None else time_budget_s / len(models)
    try:
        for name in models:
            _bench_model(result, name, preset, ns, steps, dev, DTYPES[dtype], budget, refine,
                         seed, w_og, on_point)
    finally:
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0, dev.index)
    return result


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


def _bench_model(
    result: BenchResult, name: str, preset: str, ns: list[int], steps: int,
    dev: torch.device, dtype: torch.dtype, budget: float | None, refine: int, seed: int,
    w_og: int, on_point: Callable[[BenchPoint], None] | None,
) -> None:
    """Sweep one model over ``ns`` and record its points and largest N in ``result``."""
    arch, kind = BENCH_MODELS[name]
    torch.manual_seed(seed)
    model = build_model(arch, preset).to(dev, dtype).eval()
    result.params[name] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    _measure(model, kind, ns[0], 2, dev)  # warm-up: allocator, kernels
    points, note = _sweep(name, model, ns, steps, dev, budget, on_point)
    in_budget = budget is None or time.perf_counter() - t0 < budget
    result.points.extend(points)
    if note:
        result.notes.append(note)
    ok = [p.n for p in points if p.error is None]
    oom = next((p.n for p in points if p.error == "oom"), None)
    if oom is not None and ok and refine > 0 and in_budget:
        lo, hi = _refine_max_n(name, model, kind, arch, ok[-1], oom, refine, w_og, dev)
        ok.append(lo)
        oom = hi
    result.max_n[name] = {"fits": max(ok) if ok else None, "oom_at": oom}
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- reporting


def ratios(result: BenchResult, ours: str = "tlinformer") -> list[dict[str, Any]]:
    """Baseline time / ``ours`` time for hit and miss at every N both measured."""
    mine = {p.n: p for p in result.points if p.model == ours and p.error is None}
    rows = []
    for p in result.points:
        if p.model == ours or p.error or p.n not in mine:
            continue
        m = mine[p.n]
        rows.append({
            "baseline": p.model, "n": p.n,
            "hit": p.hit_ms / m.hit_ms, "miss": p.miss_ms / m.miss_ms,
            "cache": p.cache_bytes / m.cache_bytes if m.cache_bytes else None,
        })
    return rows


def plot_decode(result: BenchResult, path: str | Path) -> Path:
    """Six panels after seed 004's Figure 9: latency (hit, miss), cache speedup, cache
    memory, analytic FLOPs per token, and each baseline's time over TLinFormer's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    names = list(dict.fromkeys(p.model for p in result.points))
    for name in names:
        for a, key in ((ax[0, 0], "hit_ms"), (ax[0, 1], "miss_ms")):
            a.plot(*result.series(name, key), marker="o", label=name)
        pts = [p for p in result.points if p.model == name and p.error is None]
        ax[0, 2].plot([p.n for p in pts], [p.miss_ms / p.hit_ms for p in pts], marker="o",
                      label=name)
        ax[1, 0].plot([p.n for p in pts], [p.cache_bytes / 2**20 for p in pts], marker="o",
                      label=name)
        ax[1, 1].plot(*result.series(name, "flops_hit"), marker=".", label=f"{name} hit")
    for base in [n for n in names if n != "tlinformer"]:
        rows = [r for r in ratios(result) if r["baseline"] == base]
        ax[1, 2].plot([r["n"] for r in rows], [r["hit"] for r in rows], marker="o",
                      label=f"{base} / tlin (hit)")
        ax[1, 2].plot([r["n"] for r in rows], [r["miss"] for r in rows], marker="x",
                      linestyle="--", label=f"{base} / tlin (miss)")
    titles = [
        ("(a) per-token latency, cache hit", "ms"), ("(b) latency, cache miss", "ms"),
        ("(c) cache speedup (miss / hit)", "x"), ("(d) cache memory held", "MiB"),
        ("(e) analytic FLOPs per token, hit", "FLOPs"), ("(f) baseline time / TLinFormer", "x"),
    ]
    for a, (title, unit) in zip(ax.flat, titles, strict=True):
        a.set_title(title)
        a.set_xlabel("context N (tokens)")
        a.set_ylabel(unit)
        a.set_xscale("log", base=2)
        if unit in ("ms", "MiB", "FLOPs") or title.startswith("(c)"):
            a.set_yscale("log")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Decode benchmark: preset {result.preset}, {result.device}, {result.dtype}, "
                 "random weights")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
