"""Scoring throughput of a compressor preset on this machine (random weights and tokens).

Throughput does not depend on the weights' values, so a freshly initialised model is
measured: warm-up passes first, then the median of timed repeats of ``model.score``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from cir.compressor.model import Compressor, CompressorConfig


@dataclass
class BenchResult:
    preset: str
    params: int
    batch_size: int
    seq_len: int
    vocab_size: int
    device: str
    threads: int
    repeats: int
    median_s: float  # one scoring pass of batch_size chunks
    tokens_per_s: float
    chunks_per_s: float
    random_weights: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
