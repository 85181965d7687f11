#!/usr/bin/env bash
# The seed's Table 1 analogue: TLinFormer (W_oh = W_og = 256) vs the 8-layer Transformer,
# paper-41m presets, the same number of training tokens on the same code corpus
# (built by scripts/gpu_reproduce_tra.sh train), then validation perplexity.
# Usage: bash scripts/gpu_train_experts.sh   env: STEPS, BATCH, LIMIT_S
set -euo pipefail
source scripts/gpu_setup.sh
STEPS=${STEPS:-2000}
BATCH=${BATCH:-32}
LIMIT_S=${LIMIT_S:-230}
failed=0
for arch in tlinformer transformer; do
  SECONDS=0
  status=0
  timeout "$LIMIT_S" route-cli expert train --data gpu-code --out "$CIR_HOME/runs/lm-$arch" \
    --arch "$arch" --preset paper-41m --steps "$STEPS" --batch-size "$BATCH" --lr 1e-3 \
    --warmup-steps 100 --eval-every 500 --ckpt-every 500 --device cuda --json \
    > "$OUT/lm-$arch.json" || status=$?
  if (( status == 124 )); then
    echo "$arch: stopped by the ${LIMIT_S}s limit"
  elif (( status != 0 )); then
    echo "$arch: failed (exit status $status)"
    failed=1
  fi
  echo "$arch trained in ${SECONDS}s"
  tail -n 3 "$CIR_HOME/runs/lm-$arch/metrics.jsonl" || true
done
exit "$failed"
