#!/usr/bin/env bash
# Decode benchmark of the paper-41m presets on one GPU (random weights: latency and memory
# do not depend on the weights): per-token latency on cache hit (CUDA graph and eager) and
# miss, the memory-bandwidth bound and efficiency, cache bytes, peak memory, and the largest
# N before out-of-memory, with all of the GPU's memory and with the allocator capped at
# 24 GiB (the seed's RTX 4090). About 7 minutes on an H100 (each run has a time budget, and
# a hard timeout on top); results are described in docs/results/gpu-decode.md.
# Usage: bash scripts/gpu_bench_decode.sh   (writes under $OUT)
# $OUT afterwards (6 files): log.txt, bandwidth.json, full/bench.json, full/bench.png,
# cap24/bench.json, cap24/bench.png.
set -euo pipefail
source scripts/gpu_setup.sh
export COLUMNS=160
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

# The memory-bandwidth ceiling, measured apart: a large device-to-device copy (bytes read +
# written). The bench measures the same copy itself (bench.json: bandwidth_bytes_per_s).
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import json, os, torch
from cir.experts.bench import measure_bandwidth
bw = measure_bandwidth(torch.device("cuda"), nbytes=2 * 2**30)  # mean of 10 copies of 2 GiB
print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s")
json.dump({"copy_bandwidth_bytes_per_s": bw, "device": torch.cuda.get_device_name(0)},
          open(os.path.join(os.environ["OUT"], "bandwidth.json"), "w"))
PY

# name, hard timeout (s), then the bench's own options. Each run writes bench.json after
# every model, so a run cut by the timeout still leaves the models it finished.
bench() {
  local name=$1 limit=$2
  shift 2
  echo "== bench decode: $name" | tee -a "$LOG"
  timeout "$limit" route-cli bench decode --preset paper-41m --device cuda \
    --out "$OUT/$name" "$@" 2>&1 | tee -a "$LOG" || echo "== $name: exit status $?" | tee -a "$LOG"
  if [ -f "$OUT/$name/bench.json" ] && [ ! -f "$OUT/$name/bench.png" ]; then
    python3 -c "import json, sys; from cir.experts.bench import BenchResult, plot_decode; \
plot_decode(BenchResult.from_dict(json.load(open(sys.argv[1]))), sys.argv[2])" \
      "$OUT/$name/bench.json" "$OUT/$name/bench.png" 2>&1 | tee -a "$LOG" || true
  fi
}
bench full 270 --time-budget-s 220
bench cap24 210 --time-budget-s 160 --max-memory-gb 24
ls -la "$OUT" "$OUT"/full "$OUT"/cap24 2>&1 | tee -a "$LOG"
