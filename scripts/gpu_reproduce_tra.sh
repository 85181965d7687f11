#!/usr/bin/env bash
# Reproduce the seed's TRA table with the 87M `paper` compressor on one GPU.
#
#   stage 1 (`train`): build a Python-code corpus from the GPU machine's own site-packages,
#     a Python-docs corpus and the same docs without code (python-prose), all with the
#     carried 32768-token tokenizer, then train
#     the `paper` preset (bf16 autocast, torch.compile, fused AdamW) under a wall budget.
#   stage 2 (`eval`): TRA on held-out documents of code (in-domain), docs and prose
#     (semi-OOD) and random tokens (full-OOD); latent UMAP / t-SNE plots.
#
# Usage: bash scripts/gpu_reproduce_tra.sh data|train|eval|all|parts
#   env: TOKENIZER (tokenizer.json, vocab 32768), STEPS, BATCH, LR, MAX_TOKENS,
#   SCHEDULE (wsd: warmup, constant lr, linear decay at the end; or cosine), and the
#   training time: WALL_S seconds of training, or DEADLINE_S (seconds from the start of
#   the script, corpus building included) minus EVAL_RESERVE_S (the quick TRA table after
#   `train`, or the whole `eval` stage after `all`; with EVAL_RESERVE_S=0 `train` skips
#   the quick table, so the call ends within DEADLINE_S). Re-running `train` resumes from the
#   last checkpoint (the GPU machine keeps /tmp between back-to-back calls), so a long run
#   can span calls. With SCHEDULE=wsd the constant phase does not depend on STEPS: run
#   with a large STEPS, then finish with DECAY_STEPS=n (the run ends n steps after the
#   step it stands at, decaying linearly over those n steps; CONSTANT_STEPS=m first adds
#   m steps at the constant rate). The decay too can span calls: re-run with the same
#   DECAY_STEPS (and CONSTANT_STEPS) and it goes on with the decay it started.
#   A run continues on another machine from its weights alone: `python3
#   scripts/weight_parts.py split` packs a checkpoint into compressed bf16 parts (<= 16 MB
#   each) that travel in pieces; INIT_FROM=<parts or checkpoint dir> starts `train` from
#   them with a fresh optimizer, the learning rate re-warmed over the warmup steps.
#   NPROC=n trains on n GPUs of the machine (torchrun, DDP; scripts/tra_train.py is the
#   training stage): BATCH stays the global batch, split between them, so raise it to keep
#   each GPU as busy as one is with 64 chunks.
#   OPTIMIZER=muon trains the Linear layers' weights with Muon (AdamW on the rest, the same
#   LR; keep it for every call of one run: a resumed run must have its settings).
#   DROPOUT=p trains with dropout p (a warm start may turn it on; keep it for every call
#   of one run: a resumed run must have its model config).
#   EXTRA_CODE=<dir> adds code carried in (scripts/extra_code.py: `.py` files of PyPI wheels,
#   one directory per top-level package): packages this machine already has are dropped
#   (their other versions would be near-copies of its test documents), the rest is built as
#   the dataset gpu-extra, `train` samples gpu-code and gpu-extra together, `overlap.json`
#   counts the test 16-grams found in either training split, and `eval` scores gpu-extra's
#   unseen documents on their own (tra_extra.json; gpu-code's row in tra.json stays
#   comparable with runs without).
#   PLOTS=0 leaves the latent plots out of `eval` (about 130 s of it). The output is also
#   written to $OUT/log.txt. DEADLINE_S counts from the start of this script, the call's
#   limit from the start of the call: leave room for what the call does before (unpacking
#   carried files) and for what follows the deadline (the last checkpoint and the
#   interpreter's exit: about 35 s on an H100), or the call is cut first; with a 600 s
#   call limit, DEADLINE_S=540 is the most that fits.
#   Stage `parts` brings the checkpoint back in such parts: PARTS=0-3 copies parts 0 to 3
#   and manifest.json to $OUT (split once per checkpoint step into $PARTS_DIR), PARTS=4-7
#   in a second call (files back from a call: 64 MiB in all).
set -euo pipefail
SECONDS=0
stage=${1:-all}
source scripts/gpu_setup.sh
# the log comes back with $OUT even when the call is cut at its time limit
exec > >(tee -a "$OUT/log.txt") 2>&1
TOKENIZER=${TOKENIZER:-.gpu/tokenizer-32k.json}
CK=$CIR_HOME/runs/paper-compressor
STEPS=${STEPS:-5000}
WALL_S=${WALL_S:-390}
BATCH=${BATCH:-64}
LR=${LR:-5e-4}
SCHEDULE=${SCHEDULE:-wsd}
DECAY_STEPS=${DECAY_STEPS:-0}
EVAL_RESERVE_S=${EVAL_RESERVE_S:-40}
MAX_TOKENS=${MAX_TOKENS:-80000000}
EXTRA_CODE=${EXTRA_CODE:-}
NPROC=${NPROC:-1}
TRAIN_DATA=gpu-code
also=()  # data overlap: the other training corpus whose n-grams count as seen
if [[ -n $EXTRA_CODE ]]; then TRAIN_DATA=gpu-code,gpu-extra; also=(--also gpu-extra); fi
export COLUMNS=140

drop_known_packages() {  # $1: extra code, one entry per top-level package
  python3 -P - "$1" <<'PY'
import shutil, sys
from pathlib import Path
from cir.data.sources import python_roots
here = {p.name.removesuffix(".py").lower() for _, root in python_roots() for p in root.iterdir()}
dropped = []
for p in sorted(Path(sys.argv[1]).iterdir()):
    if p.name.removesuffix(".py").lower() in here:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        dropped.append(p.name)
print(f"extra code: dropped {len(dropped)} packages this machine has: {' '.join(dropped)}")
PY
}

if [[ $stage == data || $stage == train || $stage == all ]]; then
  t_data=$SECONDS
  [[ -d $CIR_HOME/datasets/gpu-code ]] || route-cli data build gpu-code --source python-code \
    --tokenizer "$TOKENIZER" --max-tokens "$MAX_TOKENS"
  [[ -d $CIR_HOME/datasets/gpu-docs ]] || route-cli data build gpu-docs --source python-docs \
    --tokenizer "$TOKENIZER" --max-tokens 5000000
  [[ -d $CIR_HOME/datasets/gpu-prose ]] || route-cli data build gpu-prose --source python-prose \
    --tokenizer "$TOKENIZER" --max-tokens 5000000
  if [[ -n $EXTRA_CODE && ! -d $CIR_HOME/datasets/gpu-extra ]]; then
    drop_known_packages "$EXTRA_CODE"
    route-cli data build gpu-extra --source "$EXTRA_CODE" --tokenizer "$TOKENIZER" \
      --max-tokens "$MAX_TOKENS"
  fi
  # how unseen the unseen code documents are: their 16-grams found in training (once per
  # corpus; on a spare core, beside training)
  overlap=$CIR_HOME/overlap-gpu-code${EXTRA_CODE:+-extra}.json
  if [[ ! -f $overlap ]]; then  # back with the call that measures it (files back per call: 8)
    (route-cli data overlap gpu-code --split test -n 16 --top 25 "${also[@]}" --json > "$overlap.tmp" \
      && mv "$overlap.tmp" "$overlap" && cp "$overlap" "$OUT/overlap.json") &
    overlap_pid=$!
  fi
  echo "data built in $((SECONDS - t_data))s"
fi

if [[ $stage == train || $stage == all ]]; then
  INIT_FROM=${INIT_FROM:-}
  if [[ -f $INIT_FROM/manifest.json ]]; then  # weight parts: rebuild the checkpoint first
    python3 scripts/weight_parts.py join "$INIT_FROM" /tmp/init-ckpt
    INIT_FROM=/tmp/init-ckpt
  fi
  if [[ -n ${DEADLINE_S:-} ]]; then
    WALL_S=$((DEADLINE_S - SECONDS - EVAL_RESERVE_S))
    if (( WALL_S <= 0 )); then  # tra_train takes WALL_S <= 0 as no limit at all
      echo "error: no training time left: DEADLINE_S=$DEADLINE_S, ${SECONDS}s spent, EVAL_RESERVE_S=$EVAL_RESERVE_S" >&2
      exit 1
    fi
  fi
  echo "training for at most ${WALL_S}s"
  sets=(code docs prose)
  if [[ -n $EXTRA_CODE ]]; then sets+=(extra); fi
  for d in "${sets[@]}"; do route-cli data info gpu-$d --json > /tmp/data_$d.json; done
  python3 -c 'import json, sys; print(json.dumps({n: json.load(open(f"/tmp/data_{n}.json"))
    for n in sys.argv[1:]}, indent=1))' "${sets[@]}" > "$OUT/data.json"
  launch=(python3 -P)  # NPROC=n: n GPUs of this machine, DDP through torchrun
  if [[ $NPROC -gt 1 ]]; then launch=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC"); fi
  TRAIN_DATA=$TRAIN_DATA STEPS=$STEPS WALL_S=$WALL_S BATCH=$BATCH LR=$LR CK=$CK SCHEDULE=$SCHEDULE \
    DECAY_STEPS=$DECAY_STEPS CONSTANT_STEPS=${CONSTANT_STEPS:-0} INIT_FROM=$INIT_FROM \
    OPTIMIZER=${OPTIMIZER:-adamw} DROPOUT=${DROPOUT:-} "${launch[@]}" scripts/tra_train.py
  cp "$CK/metrics.jsonl" "$OUT/metrics.jsonl"
  # the table now, in case the machine is gone before `eval`; EVAL_RESERVE_S=0 leaves no time for it
  if [[ $stage == train && $EVAL_RESERVE_S -gt 0 ]]; then
    route-cli compressor eval "$CK" --data gpu-code --data gpu-docs --data gpu-prose \
      --data random --split test --device cuda --batch-size 128 --max-chunks 2000 --json > "$OUT/tra_quick.json" || true
  fi
fi

if [[ $stage == eval || $stage == all ]]; then
  t_eval=$SECONDS
  # held-out code documents, and again only those less than half seen in training (their
  # 16-grams in gpu-code's train split, about 40 s; gpu-extra's add 0.3 points, run 9);
  # every chunk of docs and prose (never trained on); the 25
  # documents of each with the most wrong tokens and their share of the errors
  route-cli compressor eval "$CK" --data gpu-code --data gpu-docs --data gpu-prose \
    --data random --split test --ood-split all --device cuda --batch-size 128 --worst 25 --worst-by errors \
    --unseen-below 0.5 --json > "$OUT/tra.json"
  if [[ -n $EXTRA_CODE ]]; then  # in-domain too: its unseen documents, on their own
    route-cli compressor eval "$CK" --data gpu-extra --split test --device cuda --batch-size 128 \
      --worst 25 --worst-by errors --json > "$OUT/tra_extra.json"
  fi
  echo "TRA table in $((SECONDS - t_eval))s"
  if [[ ${PLOTS:-1} != 0 ]]; then
    route-cli analyze plot --compressor "$CK" --data gpu-code --data gpu-docs --data gpu-prose --data random \
      --method pca --method umap --method tsne --max-chunks 400 --device cuda --out /tmp/plots --json > "$OUT/latents.json"
    ls /tmp/plots
    cp /tmp/plots/*umap*.png /tmp/plots/*tsne*.png "$OUT/" 2>/dev/null || true
  fi
  echo "eval stage in $((SECONDS - t_eval))s"
fi

if [[ $stage == parts ]]; then
  PARTS_DIR=${PARTS_DIR:-/tmp/out-parts}
  step=$(python3 -c 'import sys; from cir.checkpoint import saved_step; print(saved_step(sys.argv[1]))' "$CK")
  if [[ $(cat "$PARTS_DIR.step" 2>/dev/null) != "$step" ]]; then  # none yet, or an older step's
    rm -rf "$PARTS_DIR"
    python3 scripts/weight_parts.py split "$CK" "$PARTS_DIR"
    echo "$step" > "$PARTS_DIR.step"
  fi
  range=${PARTS:-0-3}
  for i in $(seq "${range%-*}" "${range#*-}"); do
    part=$(printf '%s/weights.part-%03d' "$PARTS_DIR" "$i")
    if [[ -f $part ]]; then cp "$part" "$OUT/"; fi
  done
  cp "$PARTS_DIR/manifest.json" "$OUT/"
  echo "parts $range of step $step in $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
if [[ -n ${overlap_pid:-} ]]; then wait "$overlap_pid"; fi  # the overlap count, beside training
