#!/usr/bin/env bash
# Decode benchmark of the paper-41m presets on one GPU (random weights: latency and memory
# do not depend on the weights): per-token latency on cache hit and miss, cache bytes,
# peak memory, and the largest N before out-of-memory, with all of the GPU's memory and
# with the allocator capped at 24 GiB (the seed's RTX 4090).
# Usage: bash scripts/gpu_bench_decode.sh   (writes under $OUT)
set -euo pipefail
source scripts/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
export COLUMNS=160
route-cli bench decode --preset paper-41m --device cuda --time-budget-s 250 --out "$OUT/full"
route-cli bench decode --preset paper-41m --device cuda --time-budget-s 200 \
  --max-memory-gb 24 --out "$OUT/cap24"
# The memory-bandwidth ceiling, measured: a large device-to-device copy (bytes read + written).
python3 - <<'PY'
import json, os, torch
x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize()
bw = 2 * x.numel() * 10 / (s.elapsed_time(e) / 1e3)
print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s")
json.dump({"copy_bandwidth_bytes_per_s": bw, "device": torch.cuda.get_device_name(0)},
          open(os.path.join(os.environ["OUT"], "bandwidth.json"), "w"))
PY
