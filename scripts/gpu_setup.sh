#!/usr/bin/env bash
# Install the project on a GPU machine that has torch but no network: the package itself
# without dependencies (torch, tokenizers, safetensors, typer, rich, matplotlib and
# scikit-learn are expected there), plus any wheels carried in .whl/ (umap-learn, pynndescent).
# Source it: `source scripts/gpu_setup.sh`.
set -euo pipefail
export PYTHONUNBUFFERED=1
SITE=${CIR_GPU_SITE:-/tmp/cir-site}
python3 -m pip install -q --upgrade --no-deps --no-index --no-build-isolation --target "$SITE" . >/dev/null
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --upgrade --no-deps --no-index --no-compile --target "$SITE" .whl/*.whl >/dev/null
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export CIR_HOME=${CIR_HOME:-/tmp/cir-home}
export OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
python3 -c "import torch, cir; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
