#!/usr/bin/env bash
# `small` compressors on one GPU, many at once: code-vs-docs AUROC of the python-code ones
# and routing among four domains (docs/results/cpu-compressor.md, "The vocabulary").
#
# Usage: SUFFIX=-v16k bash scripts/gpu_small_routing.sh
#   datasets under $CIR_HOME/datasets (built here, carried to the GPU machine):
#   python-code$SUFFIX python-docs$SUFFIX python-prose$SUFFIX c-code$SUFFIX man-pages$SUFFIX,
#   the last four with the first one's --tokenizer.
# env: SUFFIX (default: none, the 8,192-token corpora), SEEDS (default "0 1 2 3"),
#   STEPS (default: the preset's), EXTRA (more `compressor train` flags, e.g.
#   "--set n_codes=0 --lr 3e-3" for continuous latents),
#   TAG (names this sweep's runs and logs apart from another's, e.g. "-codes")
# Writes $OUT/small-routing.tgz (every JSON) and prints one line per evaluation.
set -euo pipefail
source scripts/gpu_setup.sh
SUFFIX=${SUFFIX:-}
SEEDS=${SEEDS:-0 1 2 3}
STEPS=${STEPS:+--steps $STEPS}
EXTRA=${EXTRA:-}
TAG=${TAG:-}
DOMAINS="python-code python-docs c-code man-pages"
LOGS=$CIR_HOME/logs/small-routing$SUFFIX$TAG
mkdir -p "$LOGS"

train() {  # domain seed
  # shellcheck disable=SC2086  # STEPS and EXTRA hold flags
  route-cli compressor train --data "$1$SUFFIX" --out "$CIR_HOME/runs/$1$SUFFIX$TAG-s$2" \
    --preset small $STEPS --seed "$2" --device cuda --json $EXTRA \
    > "$LOGS/$1-s$2.train.json" 2> "$LOGS/$1-s$2.train.err"
}
separation() {  # seed: the python-code compressor against all docs and prose chunks
  local run=$CIR_HOME/runs/python-code$SUFFIX$TAG-s$1
  route-cli compressor eval "$run" --data "python-code$SUFFIX" --data "python-docs$SUFFIX" \
    --data "python-prose$SUFFIX" --data random --ood-split all --device cuda \
    --precision fp32 --json > "$LOGS/eval-all-s$1.json"
  route-cli compressor eval "$run" --data "python-code$SUFFIX" --data "python-docs$SUFFIX" \
    --device cuda --precision fp32 --json > "$LOGS/eval-test-s$1.json"
}
routing() {  # seed; knn-latent is left out: the GPU machine has no faiss
  local args=()
  for d in $DOMAINS; do
    args+=(--compressor "$d=$CIR_HOME/runs/$d$SUFFIX$TAG-s$1" --data "$d=$d$SUFFIX")
  done
  route-cli bench routing "${args[@]}" --ood random --max-test 100000 \
    --no-lm --device cuda --method reconstruction --method gate-tfidf \
    --method tfidf-kmeans --method mahalanobis --method unigram-mix --json > "$LOGS/route-s$1.json"
}

SECONDS=0
for s in $SEEDS; do for d in $DOMAINS; do train "$d" "$s" & done; done
wait
echo "trained in ${SECONDS}s"
for s in $SEEDS; do separation "$s" & routing "$s" & done
wait
echo "evaluated in ${SECONDS}s"
(cd "$LOGS" && tar czf "$OUT/small-routing$SUFFIX$TAG.tgz" ./*.json)
python3 - "$LOGS" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "eval-*.json"))):
    r = json.load(open(f))
    print(os.path.basename(f), "AUROC", json.dumps(r["auroc_vs_first"]),
          "unigram", json.dumps(r["unigram_auroc_vs_first"]))
for f in sorted(glob.glob(os.path.join(sys.argv[1], "route-s*.json"))):
    r = json.load(open(f))
    print(os.path.basename(f), r["n_test"], "chunks",
          " ".join(f"{m['method']}={m['accuracy']:.4f}" for m in r["methods"]))
PY
