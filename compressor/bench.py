"""Scoring and training throughput of a compressor preset on this machine (random weights
and tokens).

Throughput does not depend on the weights' values, so a freshly initialised model is
measured: warm-up passes first (compilation included), then the median of timed repeats
of ``model.score`` or of one training step, the trainer's own (``cir.train.train_step``:
autocast, the preset's loss, backward, clipping, the optimizer step).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from cir.compressor.model import Compressor, CompressorConfig, sampled_loss_fn

from cir.train import make_optimizer, resolve_device, train_step


@dataclass
class _Setup:
    """What was measured, and where."""

    preset: str
    params: int
    batch_size: int
    seq_len: int
    vocab_size: int
    device: str
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult(_Setup):
    repeats: int
    median_s: float  # one scoring pass of batch_size chunks
    tokens_per_s: float
    chunks_per_s: float
    random_weights: bool = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_scoring(
    preset: str,
    batch_size: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> BenchResult:
    """Median wall time of scoring ``batch_size`` full chunks with a ``preset`` model."""
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("repeats and batch_size must be >= 1, warmup >= 0")
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = Compressor(CompressorConfig.from_name(preset, **overrides)).to(dev).eval()
    c = model.config
    ids = torch.randint(2, c.vocab_size, (batch_size, c.seq_len), device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)
    times = []
    for i in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        model.score(ids, mask, batch_size=batch_size)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return BenchResult(
        preset=preset, params=model.num_params(), batch_size=batch_size, seq_len=c.seq_len,
        vocab_size=c.vocab_size, device=str(dev), threads=torch.get_num_threads(),
        repeats=repeats, median_s=median, tokens_per_s=batch_size * c.seq_len / median,
        chunks_per_s=batch_size / median,
    )


@dataclass
class TrainBenchResult(_Setup):
    precision: str
    compile: str  # "off" or the torch.compile mode
    optimizer: str
    loss_fraction: float
    repeats: int
    median_s: float  # one training step of batch_size chunks
    tokens_per_s: float
    mfu: float | None  # model FLOPs utilisation against peak_tflops (CUDA only)
    peak_memory_gib: float | None  # CUDA only
    random_weights: bool = True


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")


def bench_training(
    preset: str,
    batch_size: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    compile: str = "off",
    optimizer: str = "adamw",
    loss_fraction: float | None = None,
    precision: str = "auto",
    peak_tflops: float = 989.0,
    seed: int = 0,
    **overrides: Any,
) -> TrainBenchResult:
    """Median wall time of one training step of a ``preset`` compressor on full random
    chunks (batch size, loss fraction and learning rate: the preset's training defaults)."""
    from cir.compressor.train import default_train_config, loss_fraction_for

    if repeats < 1 or warmup < 0 or (batch_size is not None and batch_size < 1):
        raise ValueError("repeats and batch_size must be >= 1, warmup >= 0")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    extra = {} if batch_size is None else {"batch_size": batch_size}
    cfg = default_train_config(preset, optimizer=optimizer, precision=precision, **extra)
    fraction = loss_fraction_for(preset, loss_fraction)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = Compressor(CompressorConfig.from_name(preset, **overrides)).to(dev).train()
    opt = make_optimizer(model, cfg, dev)
    loss_fn = sampled_loss_fn(fraction)

    def forward(ids: torch.Tensor, mask: torch.Tensor):
        return loss_fn(model, ids, mask)

    if compile != "off":
        forward = torch.compile(forward, mode=None if compile == "default" else compile)
    c = model.config
    ids = torch.randint(2, c.vocab_size, (cfg.batch_size, c.seq_len), device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        train_step(forward, model, opt, ids, mask, cfg, dev)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    tokens_per_s = cfg.batch_size * c.seq_len / median
    cuda = dev.type == "cuda"
    return TrainBenchResult(
        preset=preset, params=model.num_params(), batch_size=cfg.batch_size,
        seq_len=c.seq_len, vocab_size=c.vocab_size, device=str(dev),
        threads=torch.get_num_threads(), precision=cfg.precision, compile=compile,
        optimizer=optimizer, loss_fraction=fraction, repeats=repeats, median_s=median,
        tokens_per_s=tokens_per_s,
        mfu=(model.flops_per_token(fraction, cfg.batch_size) * tokens_per_s
             / (peak_tflops * 1e12)) if cuda else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
    )
