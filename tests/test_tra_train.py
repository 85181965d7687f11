"""scripts/tra_train.py, the training stage of the GPU script, on CPU: one process and
two under torchrun (DDP on gloo), a resumed call, a decay finished from where it stands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tra_train.py"


def _run(dataset: Path, ck: Path, nproc: int = 1, **env: str) -> list[dict]:
    full = {**os.environ, "TRAIN_DATA": str(dataset), "CK": str(ck), "STEPS": "8",
            "BATCH": "4", "LR": "3e-3", "SCHEDULE": "wsd", "WALL_S": "0", "PRESET": "debug",
            "DEVICE": "cpu", "COMPILE": "0", "OMP_NUM_THREADS": "1", **env}
    launch = [sys.executable, "-P"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run([*launch, str(SCRIPT)], env=full, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_one_process_trains_resumes_and_finishes_a_decay(tiny_dataset, tmp_path):
    ck = tmp_path / "ck"
    lines = _run(tiny_dataset, ck, STEPS="8", WALL_S="0")
    assert lines[-1]["steps"] == 8 and not lines[-1]["stopped_early"]
    assert "val_tra" in lines[-1]["last_eval"]
    lines = _run(tiny_dataset, ck, STEPS="100", DECAY_STEPS="4")  # a wsd run's decay
    assert lines[-1]["steps"] == 12
    plan = json.loads((ck / "decay_plan.json").read_text())
    assert plan == {"from_step": 8, "constant_steps": 0, "decay_steps": 4, "steps": 12}


def test_two_processes_under_torchrun_match_one(tiny_dataset, tmp_path):
    # a whole run as a decay from step 0: under torchrun rank 0 alone writes the plan
    one = _run(tiny_dataset, tmp_path / "one", OPTIMIZER="muon", STEPS="100", DECAY_STEPS="8")
    two = _run(tiny_dataset, tmp_path / "two", nproc=2, OPTIMIZER="muon", STEPS="100",
               DECAY_STEPS="8")
    assert [r["steps"] for r in two if "steps" in r and "event" not in r] == [8]  # rank 0 only
    assert two[-1]["steps"] == one[-1]["steps"] == 8
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # the same global batches, gradients averaged over the ranks: equal but for how each
    # rank's token mean weighs its padding. The 8 warmup steps move a weight by up to about
    # 1e-3 (1.2e-4 a step); the two runs differ by a fraction of that
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-4
