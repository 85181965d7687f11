"""The training stage of scripts/gpu_reproduce_tra.sh: one call's share of a `paper` run.

Settings come from the environment the shell script sets (TRAIN_DATA, CK, STEPS, BATCH,
LR, SCHEDULE, DECAY_STEPS, CONSTANT_STEPS, INIT_FROM, WALL_S, OPTIMIZER, DROPOUT; PRESET,
DEVICE and COMPILE default to paper, cuda and 1). Run it as one process, or under
`torchrun --standalone --nproc_per_node=N` to train on N GPUs with DDP (BATCH is the global
batch, split between them). Rank 0 prints the curve (every 500 steps and every evaluation)
and a last line of JSON with the result.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from cir.compressor.train import default_train_config, train_compressor

from cir.train import plan_decay, resolve_device


def _steps(env: Mapping[str, str], init: str | None) -> tuple[int, float]:
    """``(steps, decay_frac)``: with DECAY_STEPS, the wsd run finished from where it stands
    (the same numbers resume the decay). Under torchrun rank 0 writes the plan first and the
    other ranks then read it, so no two processes write its file at once."""
    decay = int(env.get("DECAY_STEPS", "0"))
    if decay <= 0:
        return int(env["STEPS"]), 0.2

    def plan() -> tuple[int, float]:
        return plan_decay(env["CK"], decay, int(env.get("CONSTANT_STEPS", "0")), init)

    if int(env.get("WORLD_SIZE", "1")) == 1:
        return plan()
    import torch
    import torch.distributed as dist

    device = resolve_device(env.get("DEVICE", "cuda"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")  # train's too
    first = plan() if dist.get_rank() == 0 else None
    dist.barrier()
    return first or plan()


def main() -> None:
    env = os.environ
    main_rank = int(env.get("RANK", "0")) == 0
    init = env.get("INIT_FROM") or None
    steps, decay_frac = _steps(env, init)
    preset = env.get("PRESET", "paper")
    cfg = default_train_config(
        preset, steps=steps, batch_size=int(env["BATCH"]), lr=float(env["LR"]),
        schedule=env["SCHEDULE"], decay_frac=decay_frac,
        optimizer=env.get("OPTIMIZER", "adamw"), warmup_steps=300, log_every=50,
        eval_every=1000, eval_batches=8, ckpt_every=1000,
        compile=env.get("COMPILE", "1") == "1", device=env.get("DEVICE", "cuda"),
        max_wall_s=float(env["WALL_S"]),
    )
    t0 = time.time()

    def show(r: dict) -> None:
        if main_rank and (r["event"] == "train" and r["step"] % 500 == 0 or r["event"] == "eval"):
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in r.items()}), flush=True)

    drop = {"dropout": float(env["DROPOUT"])} if env.get("DROPOUT") else None
    res = train_compressor(env["TRAIN_DATA"].split(","), env["CK"], preset=preset,
                           train_cfg=cfg, on_log=show, init_from=init, overrides=drop)
    if main_rank:
        print(json.dumps({"steps": res.step, "stopped_early": res.stopped_early,
                          "wall_s": time.time() - t0, "last": res.last,
                          "last_eval": res.last_eval}))


if __name__ == "__main__":
    main()
