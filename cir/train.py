"""The one training loop shared by the compressor and the expert LMs.

Reads top to bottom: setup, resume, ``for step``, log every N, eval every M, checkpoint
every K. Everything that decides the result is a pure function of the step: the batch
(``batch_indices(seed, step)``) and the learning rate (``lr_at(step)``), so a run killed
at any point and re-run with the same command resumes from its last checkpoint and ends
bit-identical (on CPU) to an uninterrupted run.

A run can also continue from another run's weights alone (``init_from``: the optimizer
state is 4x the weights and may not travel): it starts at the step saved with the weights,
with a fresh AdamW and the learning rate re-warmed (``lr_at(..., warm_start=)``).

Multi-GPU: launch the same script under ``torchrun``; each rank takes its slice of the
global batch and DDP averages the gradients (gloo on CPU, NCCL on CUDA).

Checkpoint directory (``out_dir``): ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``train_state.pt`` (optimizer + step + RNG, loaded with
``weights_only=True``), ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cir.checkpoint import (
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write_text,
    load_weights,
    read_config,
    save_weights,
    saved_step,
    unwrap,
    weights_file,
    weights_metadata,
    write_config,
)
from cir.optim import BatchedMuon, MuonAdamW, muon_parameters

STATE_FILE = "train_state.pt"
# a loss function's metric: how many targets its mean is over (popped, not logged)
N_TARGETS = "n_targets"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".train.lock"  # held by the run writing the directory
# Fields that may change when a run is resumed: bookkeeping, and where the schedule ends
# (`steps`, `decay_frac`; a wsd run lengthened in its constant phase equals a longer run).
_RESUMABLE_CHANGES = {
    "steps",
    "decay_frac",
    "eval_every",
    "eval_batches",
    "ckpt_every",
    "log_every",
    "compile",
    "max_wall_s",
}

LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


class ChunkData(Protocol):
    def __len__(self) -> int: ...
    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 elsewhere
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in chunks
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    # cosine: warmup, cosine decay over the rest. wsd: warmup, constant, then a linear
    # decay over the last `decay_frac` of the steps (the constant phase does not depend on
    # `steps`, so a run can be lengthened while it is still there).
    schedule: str = "cosine"
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    # adamw: AdamW everywhere. muon: Muon (orthogonalised momentum, its update scaled to
    # AdamW's RMS so `lr` and `weight_decay` keep their meaning) on the 2-D weights of the
    # Linear layers, AdamW on embeddings, position tables, norms and biases.
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    ckpt_every: int = 200
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    peak_tflops: float = 989.0  # for MFU on CUDA; H100 SXM dense bf16
    max_wall_s: float = 0.0  # > 0: stop (with a checkpoint) once a run has lasted this long

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, "steps must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (
                self.log_every > 0 and self.eval_every > 0 and self.ckpt_every > 0,
                "log_every, eval_every and ckpt_every must be > 0",
            ),
            (self.precision in PRECISIONS, "precision must be auto, fp32 or bf16"),
            (self.schedule in ("cosine", "wsd"), "schedule must be cosine or wsd"),
            (self.optimizer in OPTIMIZERS, "optimizer must be adamw or muon"),
            (0 < self.decay_frac <= 1, "decay_frac must be in (0, 1]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0: no clipping)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    resumed_from: int
    stopped_early: bool = False  # ended by max_wall_s or stop_at before cfg.steps
    last: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def lr_at(step: int, cfg: TrainConfig, warm_start: int | None = None) -> float:
    """Linear warmup to ``lr``, then down to ``lr * min_lr_ratio`` at ``steps``: a cosine
    over all remaining steps (``cosine``), or constant and then linear over the last
    ``decay_frac`` of the steps (``wsd``, warmup-stable-decay).

    ``warm_start``: the step a run restarted at with a fresh optimizer; from there the
    schedule is scaled by a second linear warmup over ``warmup_steps`` (a fresh AdamW's
    first updates are about +-lr in every weight, its second moment being one gradient's:
    too big a kick for trained weights at a post-warmup lr)."""
    lr = _schedule(step, cfg)
    if warm_start is not None and cfg.warmup_steps > 0 and step >= warm_start:
        lr *= min(1.0, (step - warm_start + 1) / cfg.warmup_steps)
    return lr


def _schedule(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.steps - round(cfg.decay_frac * cfg.steps))
        span = max(1, cfg.steps - decay_start)
        progress = min(1.0, max(0, step - decay_start) / span)
        return cfg.lr - (cfg.lr - floor) * progress
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


DECAY_PLAN_FILE = "decay_plan.json"


def plan_decay(
    out_dir: str | Path,
    decay_steps: int,
    constant_steps: int = 0,
    init_from: str | Path | None = None,
) -> tuple[int, float]:
    """``(steps, decay_frac)`` of a wsd run finished from where it stands: ``constant_steps``
    more at the constant rate, then a linear decay over ``decay_steps``.

    The run stands at its checkpoint in ``out_dir``, else at the step of ``init_from``'s
    weights, else at 0. The plan is kept in ``out_dir`` (``decay_plan.json``), so re-running
    with the same numbers part-way through resumes that decay (worked out again from the
    resumed step, the decay would start over at the full rate). Other numbers, or a run
    that has moved past the plan, make a new plan from the current step.
    """
    if decay_steps <= 0 or constant_steps < 0:
        raise ValueError("decay_steps must be > 0 and constant_steps >= 0")
    out_dir = Path(out_dir)
    at = _consistent_step(out_dir)
    if at is None:
        at = saved_step(init_from) if init_from is not None else 0
    path = out_dir / DECAY_PLAN_FILE
    try:
        plan = json.loads(path.read_text())
        same = (plan["decay_steps"], plan["constant_steps"]) == (decay_steps, constant_steps)
        if same and plan["from_step"] <= at <= plan["steps"]:
            return plan["steps"], decay_steps / plan["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no plan, or not one this writes: a new plan replaces it
    steps = at + constant_steps + decay_steps
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {"from_step": at, "constant_steps": constant_steps, "decay_steps": decay_steps,
            "steps": steps}
    atomic_write_text(path, json.dumps(plan, indent=1) + "\n")
    return steps, decay_steps / steps


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """The global batch of step ``step``: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.integers(0, n, size=batch_size))


# --------------------------------------------------------------------------- setup


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def autocast_for(device: torch.device, precision: str):
    """The autocast context of ``precision``: auto is bf16 on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _adamw(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and other vectors."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW | MuonAdamW:
    """The optimizer ``cfg.optimizer`` names over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return _adamw(params, cfg, device)
    matrices = muon_parameters(model)
    ids = {id(p) for p in matrices}
    muon = BatchedMuon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return MuonAdamW(muon, _adamw([p for p in params if id(p) not in ids], cfg, device))


# --------------------------------------------------------------------------- checkpoints


def _save(
    out_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer | MuonAdamW,
    step: int,
    cfg: TrainConfig,
    warm_start: int | None,
) -> None:
    """Write weights then state, each atomically; both carry the step so a kill between
    the two renames is detected and repaired by ``_consistent_step``."""
    state = {
        "step": step,
        "warm_start": warm_start,  # the re-warmed schedule must survive a resume
        "optimizer": opt.state_dict(),
        "train_config": json.dumps(cfg.to_dict()),
        "torch_rng": torch.get_rng_state(),
    }
    state_tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save(state, state_tmp)
    with open(state_tmp, "rb") as f:
        os.fsync(f.fileno())
    save_weights(out_dir / WEIGHTS_FILE, model, metadata={"step": str(step)})
    os.replace(state_tmp, out_dir / STATE_FILE)


_STATE_KEYS = ("step", "optimizer", "train_config", "torch_rng")


def _load_state(path: Path) -> dict[str, Any]:
    try:
        # any failure of a torn or foreign file: RuntimeError, EOFError, KeyError and
        # pickle.UnpicklingError from the (weights-only) unpickler, ...
        state = torch.load(path, map_location="cpu", weights_only=True)
        reason = None
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        lines = str(exc).splitlines()
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if reason is None:
        missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else []
        if not isinstance(state, dict) or missing or not isinstance(state["step"], int):
            reason = "not a training state" + (f" (no {', '.join(missing)})" if missing else "")
    if reason is not None:
        raise CheckpointError(
            f"{path}: unreadable training state ({reason}); train into another --out, "
            f"with --init-from {path.parent} to continue from its weights"
        )
    return state


def _consistent_step(out_dir: Path) -> int | None:
    """Step of the last complete checkpoint in ``out_dir`` (None when there is none)."""
    state = _checkpoint_state(out_dir)
    return None if state is None else state["step"]


def _checkpoint_state(out_dir: Path) -> dict[str, Any] | None:
    """The training state of the last complete checkpoint in ``out_dir``, read once and
    checked against the weights' step (None when there is no checkpoint)."""
    weights, state = out_dir / WEIGHTS_FILE, out_dir / STATE_FILE
    if not weights.is_file():
        return None
    w_step = int(weights_metadata(weights).get("step", -1))
    state_tmp = out_dir / (STATE_FILE + ".tmp")
    if state_tmp.is_file():
        try:
            if _load_state(state_tmp)["step"] == w_step:
                os.replace(state_tmp, state)  # killed between the two renames: finish it
        except Exception:  # noqa: BLE001 - a half-written temp file is simply discarded
            state_tmp.unlink(missing_ok=True)
    if not state.is_file():
        raise CheckpointError(
            f"{out_dir} holds weights (step {w_step}) but no {STATE_FILE}: a saved model, not "
            f"a run to resume; train into another --out with --init-from {out_dir}"
        )
    saved = _load_state(state)
    if saved["step"] != w_step:
        raise CheckpointError(
            f"{out_dir}: weights (step {w_step}) and state (step {saved['step']}) disagree"
        )
    return saved


def _check_resumable(
    out_dir: Path, model: nn.Module, saved_cfg: dict[str, Any], cfg: TrainConfig,
    step: int = 0,
) -> None:
    _, saved_model_cfg = read_config(out_dir)
    if saved_model_cfg != unwrap(model).config:
        raise CheckpointError(
            f"{out_dir} holds a run with a different model config; use another --out or delete it"
        )
    now = cfg.to_dict()
    # a setting added after the run was saved counts as its default
    saved = {**TrainConfig().to_dict(), **saved_cfg}
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise CheckpointError(
            f"{out_dir} holds a run with different training settings ({', '.join(changed)}); "
            "use the same settings to resume, or another --out"
        )
    # a cosine's rate at every step after warmup depends on `steps`: changing it mid-run
    # jumps the rate (only a wsd run in its constant phase can be lengthened)
    if cfg.schedule == "cosine" and saved.get("steps") != cfg.steps and step > cfg.warmup_steps:
        raise CheckpointError(
            f"{out_dir} holds a cosine run of {saved.get('steps')} steps, at step {step}: "
            "changing --steps now would jump its learning rate; use the same --steps (or a "
            "wsd schedule to lengthen runs)"
        )


def _resume(
    out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer | MuonAdamW, cfg: TrainConfig
) -> tuple[int, int | None] | None:
    """``(step, warm_start)`` of the checkpoint in ``out_dir``, restored into the model and
    the optimizer; None when there is none."""
    state = _checkpoint_state(out_dir)
    if state is None:
        return None
    step = state["step"]
    try:
        saved_cfg = json.loads(state["train_config"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{out_dir / STATE_FILE}: unreadable training settings") from None
    _check_resumable(out_dir, model, saved_cfg, cfg, step)
    load_weights(model, out_dir / WEIGHTS_FILE)
    try:
        opt.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(
            f"{out_dir / STATE_FILE}: the optimizer state does not fit this model ({reason})"
        ) from None
    torch.set_rng_state(state["torch_rng"])
    return step, state.get("warm_start")  # absent in runs saved before warm starts


# model config fields that change how a model trains, not what its weights mean: a warm
# start may change them (e.g. continue with dropout)
TRAINING_ONLY_FIELDS = ("dropout",)


def same_weights_config(saved: Any, current: Any) -> bool:
    """Whether weights saved under config ``saved`` mean the same in a model of config
    ``current``: equal but for ``TRAINING_ONLY_FIELDS``."""
    if type(saved) is not type(current) or not dataclasses.is_dataclass(saved):
        return saved == current
    keep = {f: getattr(current, f) for f in TRAINING_ONLY_FIELDS if hasattr(saved, f)}
    return dataclasses.replace(saved, **keep) == current


def _init_weights(init_from: str | Path, model: nn.Module, cfg: TrainConfig) -> int:
    """Load the weights of ``init_from`` (a checkpoint directory or a ``.safetensors``
    file) into ``model``; return the step they were saved at (0 when they do not say)."""
    path, weights = Path(init_from), weights_file(init_from)
    if path.is_dir() and not same_weights_config(read_config(path)[1], unwrap(model).config):
        raise CheckpointError(f"{path}: a different model config than this run's")
    step = saved_step(weights)
    if step >= cfg.steps:
        raise ValueError(f"{path} is at step {step}: nothing to train up to steps={cfg.steps}")
    load_weights(model, weights)
    return step


# --------------------------------------------------------------------------- the loop


def _to_float(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach().float().item()) for k, v in metrics.items()}


def train_step(
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    model: nn.Module,
    opt: torch.optim.Optimizer | MuonAdamW,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    ddp: _Dist | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step on a batch: ``forward(ids, mask) -> (loss, metrics)`` under
    autocast, backward, clipping, the update. Returns the loss, the metrics (without
    ``n_targets``) and the gradient norm before clipping."""
    with autocast_for(device, cfg.precision):
        loss, metrics = forward(ids, mask)
    _global_mean(loss, metrics.pop(N_TARGETS, None), ddp or _Dist()).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(  # 0: measure the norm, no clipping
        model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, metrics, grad_norm


def _global_mean(loss: torch.Tensor, n: torch.Tensor | None, ddp: _Dist) -> torch.Tensor:
    """The loss to differentiate: on several ranks, this rank's mean over its ``n`` targets
    reweighted so that DDP's average of the ranks' gradients is the gradient of the mean
    over every rank's targets (padding leaves ranks with different numbers of them)."""
    if ddp.world == 1 or n is None:
        return loss
    total = n.detach().to(torch.float64).clone()
    dist.all_reduce(total)
    return loss * (n.to(torch.float64) * ddp.world / total.clamp_min(1.0)).to(loss.dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, data: ChunkData, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Mean loss and metrics over a fixed set of validation batches."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    n = len(data)
    bs = min(cfg.batch_size, n)
    batches = min(cfg.eval_batches, math.ceil(n / bs))
    weight = 0.0
    for b in range(batches):
        idx = np.arange(b * bs, min(n, (b + 1) * bs))
        ids, mask = (t.to(device) for t in data.get_batch(idx))
        with autocast_for(device, cfg.precision):
            loss, metrics = loss_fn(model, ids, mask)
        # a batch's figures are means over its real tokens: weigh them by those (a short
        # last batch is not worth a full one)
        w = float(metrics.pop(N_TARGETS, mask.sum()))
        weight += w
        for k, v in {"loss": float(loss.detach()), **_to_float(metrics)}.items():
            totals[k] = totals.get(k, 0.0) + v * w
    model.train(was_training)
    return {f"val_{k}": v / max(weight, 1.0) for k, v in totals.items()}


@contextmanager
def _exclusive(out_dir: Path, main: bool) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the run (the main rank), or fail at once naming it."""
    if not main:
        yield
        return
    import filelock

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(out_dir / LOCK_FILE), timeout=0):
            yield
    except filelock.Timeout:
        raise CheckpointError(
            f"{out_dir}: another training run is writing there; wait for it or use another --out"
        ) from None


def _prepare_out_dir(out_dir: Path, model: nn.Module, tokenizer: str | Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # no weights yet (a run stopped before its first checkpoint): nothing to keep, and a
    # stale config.json would describe another model than the weights about to be saved
    fresh = not (out_dir / WEIGHTS_FILE).is_file()
    if fresh or not (out_dir / "config.json").is_file():
        write_config(out_dir, unwrap(model))
    if tokenizer is None:
        return
    from cir.data.tokenizer import tokenizer_hash

    saved = out_dir / TOKENIZER_FILE
    if fresh or not saved.is_file():
        shutil.copyfile(tokenizer, saved)
    elif tokenizer_hash(saved) != tokenizer_hash(tokenizer):
        raise CheckpointError(
            f"{out_dir} holds a run trained on data from another tokenizer than {tokenizer}; "
            "use the same data to resume, or another --out"
        )


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: ChunkData,
    out_dir: str | Path,
    cfg: TrainConfig,
    val_data: ChunkData | None = None,
    tokenizer: str | Path | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    stop_at: int | None = None,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` with ``loss_fn(model, ids, mask) -> (loss, metrics)``.

    ``loss_fn`` must use the model only through ``model(...)`` (it may be DDP-wrapped or
    compiled). Re-running with the same arguments resumes from ``out_dir``. ``stop_at``
    ends the run early after that step (as an interruption would), checkpoint included.

    ``init_from`` (a checkpoint directory or a ``.safetensors`` file): start from those
    weights, at the step saved with them (``resumed_from``), with a fresh optimizer and the
    learning rate re-warmed over ``warmup_steps``. It is ignored once ``out_dir`` holds a
    checkpoint: re-running then resumes that (warm-started) run as usual.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    ddp = _init_distributed(device)
    if len(train_data) == 0:
        raise ValueError("training data is empty")
    if cfg.batch_size % ddp.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {ddp.world} ranks")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    opt = make_optimizer(model, cfg, device)
    with _exclusive(out_dir, ddp.main):  # one run at a time writes a checkpoint directory
        if ddp.main:
            _prepare_out_dir(out_dir, model, tokenizer)
        if ddp.world > 1:
            dist.barrier()
        resumed = _resume(out_dir, model, opt, cfg)
        warm = resumed is None and init_from is not None  # out_dir's own checkpoint wins
        if warm:
            s0 = _init_weights(init_from, model, cfg)
            resumed = (s0, s0)
        start, warm_start = resumed or (0, None)
        if ddp.main:
            _drop_replayed(out_dir / METRICS_FILE, start)
        net: nn.Module = model
        if ddp.world > 1:
            net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        def forward(ids: torch.Tensor, mask: torch.Tensor):
            return loss_fn(net, ids, mask)

        if cfg.compile:
            if ddp.world > 1:
                net = torch.compile(net)  # DDP's bucketed all-reduce wants the module compiled
            else:  # the loss too: its float logits and softmax fuse with the LM head
                forward = torch.compile(forward)
        log = _Logger(out_dir / METRICS_FILE, ddp, on_log, cfg, model, device,
                      getattr(loss_fn, "loss_fraction", 1.0))
        if warm:  # where the optimizer restarted, for whoever reads the curves
            log.event({"event": "warm_start", "step": start, "init_from": str(init_from)})
        result = TrainResult(out_dir=out_dir, step=start, resumed_from=start)
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        per_rank = cfg.batch_size // ddp.world
        for step in range(start, end):
            lr = lr_at(step, cfg, warm_start)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = batch_indices(cfg.seed, step, cfg.batch_size, len(train_data))
            idx = idx[ddp.rank * per_rank : (ddp.rank + 1) * per_rank]
            ids, mask = (t.to(device, non_blocking=True) for t in train_data.get_batch(idx))
            loss, metrics, grad_norm = train_step(forward, model, opt, ids, mask, cfg, device, ddp)
            done = step + 1
            if (
                cfg.max_wall_s > 0
                and done % cfg.log_every == 0
                and _out_of_time(t_start, cfg, ddp, device)
            ):
                end = done  # out of wall time: log, evaluate and checkpoint this step, then stop
            log.tokens = log.tokens + mask.sum() * ddp.world  # stays on device: no sync per step
            if done % cfg.log_every == 0 or done == end:
                result.last = log.train(done, loss, metrics, lr, grad_norm)
            t_pause = time.perf_counter()  # evaluation and checkpoints: not training time
            if val_data is not None and (done % cfg.eval_every == 0 or done == end):
                result.last_eval = log.eval(done, evaluate(model, loss_fn, val_data, cfg, device))
            if done % cfg.ckpt_every == 0 or done == end:
                if ddp.main:
                    _save(out_dir, model, opt, done, cfg, warm_start)
                    log.event({"event": "checkpoint", "step": done})
                if ddp.world > 1:
                    dist.barrier()
            log.t0 += time.perf_counter() - t_pause
            result.step = done
            if done >= end:
                break
        result.stopped_early = result.step < cfg.steps
        result.wall_s = time.perf_counter() - t_start
        return result


def _drop_replayed(path: Path, start: int) -> None:
    """Drop the records after step ``start`` from a metrics file: the steps a run logged
    past its last checkpoint before it was stopped, which the resumed run logs again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _record_step(line) <= start]
    if len(keep) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _record_step(line: str) -> float:
    """A record's step (0 without one); a line torn by a kill counts as after every step."""
    try:
        step = json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf
    return step if isinstance(step, int) else 0


def _out_of_time(t_start: float, cfg: TrainConfig, ddp: _Dist, device: torch.device) -> bool:
    """Whether the wall-time budget is spent; every rank takes rank 0's answer."""
    flag = torch.tensor([time.perf_counter() - t_start > cfg.max_wall_s], device=device)
    if ddp.world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


class _Logger:
    """JSONL metrics (rank 0) plus the caller's ``on_log`` callback."""

    def __init__(
        self, path: Path, ddp: _Dist, on_log, cfg: TrainConfig, model: nn.Module, device,
        loss_fraction: float = 1.0,
    ) -> None:
        self.path, self.ddp, self.on_log, self.cfg = path, ddp, on_log, cfg
        self.tokens = 0
        self.t0 = time.perf_counter()
        fpt = getattr(unwrap(model), "flops_per_token", None)
        self.flops_per_token = None
        if callable(fpt):
            accepts = inspect.signature(fpt).parameters
            kw = {"loss_fraction": loss_fraction} if loss_fraction != 1.0 else {}
            if "batch_size" in accepts:  # a coded compressor decodes per code, not per chunk
                kw["batch_size"] = cfg.batch_size
            self.flops_per_token = fpt(**kw)
        self.device = device

    def event(self, record: dict[str, Any]) -> None:
        if not self.ddp.main:
            return
        record = {"time": time.time(), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def train(self, step: int, loss, metrics, lr: float, grad_norm) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rec: dict[str, Any] = {
            "event": "train",
            "step": step,
            "steps": self.cfg.steps,
            "loss": float(loss.detach()),
            **_to_float(metrics),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": float(self.tokens) / elapsed,
        }
        if self.flops_per_token and self.device.type == "cuda":
            achieved = self.flops_per_token * rec["tokens_per_s"]
            rec["mfu"] = achieved / (self.cfg.peak_tflops * 1e12 * self.ddp.world)
        self.tokens, self.t0 = 0, time.perf_counter()
        self.event(rec)
        return {k: v for k, v in rec.items() if isinstance(v, float)}

    def eval(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        self.event({"event": "eval", "step": step, "steps": self.cfg.steps, **metrics})
        return metrics
