"""The shared trainer: schedule, resume == uninterrupted, crash repair, DDP on gloo."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _toy import ArrayChunks, Toy, ToyConfig, toy_loss
from safetensors.torch import load_file, load_model
from torch import nn

from cir import checkpoint
from cir.train import (
    DECAY_PLAN_FILE,
    STATE_FILE,
    TrainConfig,
    batch_indices,
    lr_at,
    make_optimizer,
    plan_decay,
    train,
)

checkpoint.MODEL_KINDS.setdefault("toy", "_toy:Toy")


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, log_every=2, eval_every=6,
                ckpt_every=4, eval_batches=2, seed=3)
    return TrainConfig(**{**base, **kw})


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_lr_schedule_is_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_wsd_schedule_is_warmup_constant_then_linear_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd",
                      decay_frac=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert [lr_at(s, cfg) for s in (9, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert lr_at(90, cfg) == pytest.approx(0.55)  # half way down the linear decay
    assert lr_at(100, cfg) == pytest.approx(0.1)
    longer = TrainConfig(**{**cfg.to_dict(), "steps": 300})
    assert all(lr_at(s, cfg) == lr_at(s, longer) for s in range(80))  # extendable
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_wsd_run_lengthened_in_its_constant_phase_equals_a_longer_run(tmp_path):
    wsd = dict(schedule="wsd", decay_frac=0.25)
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "a", _cfg(**wsd), stop_at=6)
    resumed = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "a",
                    _cfg(**wsd, steps=16))
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "b", _cfg(**wsd, steps=16))
    assert resumed.resumed_from == 6 and resumed.step == 16
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _wsd_to(out: Path, steps: int, decay_frac: float, stop_at: int | None = None):
    return train(Toy(ToyConfig()), toy_loss, ArrayChunks(), out,
                 _cfg(schedule="wsd", steps=steps, decay_frac=decay_frac), stop_at=stop_at)


def test_decay_spanning_two_calls_equals_one_decay(tmp_path):
    """A wsd run held at the constant rate, then finished by `plan_decay`: interrupted in
    the middle of the decay and re-run with the same numbers, it ends where one call does."""
    for name in ("a", "b"):
        torch.manual_seed(0)
        _wsd_to(tmp_path / name, 1000, 0.2, stop_at=8)  # constant phase, open-ended
    steps, frac = plan_decay(tmp_path / "a", 6)
    assert (steps, frac) == (14, 6 / 14)
    cfg = _cfg(schedule="wsd", steps=steps, decay_frac=frac)
    assert lr_at(8, cfg) == cfg.lr and lr_at(11, cfg) == pytest.approx(cfg.lr * 0.55)
    assert lr_at(14, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert _wsd_to(tmp_path / "a", steps, frac, stop_at=11).step == 11
    assert plan_decay(tmp_path / "a", 6) == (14, 6 / 14)  # the same decay, not 11 + 6
    assert _wsd_to(tmp_path / "a", *plan_decay(tmp_path / "a", 6)).step == 14
    assert _wsd_to(tmp_path / "b", *plan_decay(tmp_path / "b", 6)).step == 14
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plan = json.loads((tmp_path / "a" / DECAY_PLAN_FILE).read_text())
    assert plan == {"from_step": 8, "constant_steps": 0, "decay_steps": 6, "steps": 14}


def test_decay_plan_other_numbers_start_from_the_current_step(tmp_path):
    run = tmp_path / "run"
    _wsd_to(run, 1000, 0.2, stop_at=6)
    assert plan_decay(tmp_path / "fresh", 5, constant_steps=2) == (7, 5 / 7)
    assert plan_decay(tmp_path / "warm", 4, init_from=run) == (10, 0.4)  # its weights' step
    assert plan_decay(run, 4) == (10, 0.4)
    assert plan_decay(run, 8, constant_steps=2) == (16, 0.5)  # other numbers: a new plan
    _wsd_to(run, 16, 0.5)
    assert plan_decay(run, 8, constant_steps=2) == (16, 0.5)  # done: still that one
    assert plan_decay(run, 3) == (19, 3 / 19)  # past it: from the current step
    (run / DECAY_PLAN_FILE).write_text("{not json")
    assert plan_decay(run, 3) == (19, 3 / 19)  # an unreadable plan is replaced
    assert json.loads((run / DECAY_PLAN_FILE).read_text())["steps"] == 19
    with pytest.raises(ValueError, match="decay_steps"):
        plan_decay(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="constant_steps"):
        plan_decay(tmp_path / "x", 5, constant_steps=-1)


def test_resume_of_a_run_saved_before_a_setting_existed(tmp_path):
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=4)
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    old = json.loads(state["train_config"])
    del old["schedule"], old["decay_frac"]  # as written before the schedule choice
    state["train_config"] = json.dumps(old)
    del state["warm_start"]  # and before warm starts
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(checkpoint.CheckpointError, match="schedule"):
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(schedule="wsd"))
    res = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg())  # the default
    assert res.resumed_from == 4 and res.step == 12


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    torch.manual_seed(0)
    eager = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "e", _cfg(steps=6))
    torch.manual_seed(0)
    comp = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "c",
                 _cfg(steps=6, compile=True))
    assert comp.last["loss"] == pytest.approx(eager.last["loss"], rel=1e-4)
    a, b = _weights(tmp_path / "e"), _weights(tmp_path / "c")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_batches_are_a_pure_function_of_step():
    a = batch_indices(1, 7, 16, 100)
    assert (a == batch_indices(1, 7, 16, 100)).all()
    assert not (a == batch_indices(1, 8, 16, 100)).all()


def test_training_reduces_loss_and_writes_checkpoint(tmp_path):
    torch.manual_seed(0)
    records = []
    res = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(steps=40),
                val_data=ArrayChunks(seed=1), on_log=records.append)
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert res.step == 40 and "val_loss" in res.last_eval
    model = checkpoint.load_checkpoint(tmp_path)
    assert isinstance(model, Toy)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == len(records)


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    torch.manual_seed(0)
    full = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "full", _cfg())
    torch.manual_seed(0)
    part = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "part", _cfg(), stop_at=5)
    assert part.step == 5
    torch.manual_seed(123)  # a fresh process would start from other weights: they are restored
    resumed = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "part", _cfg())
    assert resumed.resumed_from == 5 and full.step == resumed.step == 12
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=4)
    with pytest.raises(checkpoint.CheckpointError, match="lr"):
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(lr=5e-3))
    with pytest.raises(checkpoint.CheckpointError, match="model config"):
        train(Toy(ToyConfig(d_model=8)), toy_loss, ArrayChunks(), tmp_path, _cfg())


def test_kill_between_renames_is_repaired(tmp_path):
    """Weights renamed, state still in its temp file: the resume completes the rename."""
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=8)
    state = tmp_path / STATE_FILE
    # fabricate the crash: the step-8 state back into its temp name, an older one in place
    os.replace(state, tmp_path / (STATE_FILE + ".tmp"))
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "old", _cfg(), stop_at=4)
    os.replace(tmp_path / "old" / STATE_FILE, state)
    res = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg())
    assert res.resumed_from == 8


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from _toy import ArrayChunks, Toy, ToyConfig, toy_loss
    from cir import checkpoint
    from cir.train import TrainConfig, train
    checkpoint.MODEL_KINDS["toy"] = "_toy:Toy"
    torch.manual_seed(0)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, ckpt_every=3, seed=1)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(padded=sys.argv[2] == "padded"), sys.argv[1], cfg)
    """
)


@pytest.mark.parametrize("data", ["full", "padded"])
def test_ddp_gloo_two_processes_matches_single(tmp_path, data):
    """Padded chunks leave the ranks different numbers of real tokens: the gradient is
    still that of the mean over all of them, as on one process."""
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), data], check=True,
                   env=env)
    # --standalone: the rendezvous store binds a port the OS picks and keeps it (a port
    # found free beforehand could be taken by another process before the launcher binds it)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path / "two"), data],
        env=env, capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_wall_time_budget_stops_with_a_checkpoint(tmp_path):
    res = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(steps=10_000, max_wall_s=1e-9))
    assert res.stopped_early and res.step == 2  # checked at the first log step
    again = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(steps=10_000, max_wall_s=1e-9))
    assert again.resumed_from == 2 and again.step == 4


def test_lr_rewarms_after_a_warm_start():
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd")
    assert lr_at(40, wsd, warm_start=40) == pytest.approx(0.1)  # 1/10 of the constant 1.0
    assert lr_at(45, wsd, warm_start=40) == pytest.approx(0.6)  # (45 - 40 + 1) / 10
    assert lr_at(49, wsd, warm_start=40) == pytest.approx(1.0)
    assert all(lr_at(s, wsd, warm_start=40) == lr_at(s, wsd) for s in range(49, 101))
    cosine = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(55, cosine, warm_start=50) == pytest.approx(0.6 * 0.55)  # on the cosine
    assert lr_at(55, cosine, warm_start=None) == pytest.approx(0.55)
    no_warmup = TrainConfig(steps=100, lr=1.0, warmup_steps=0)
    assert lr_at(40, no_warmup, warm_start=40) == lr_at(40, no_warmup) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.4)))


def _reference_warm_start(src: Path, cfg: TrainConfig, s0: int) -> dict[str, torch.Tensor]:
    """A warm-started run written out by hand: the saved weights, a fresh AdamW, the
    schedule scaled by (step - s0 + 1) / warmup_steps, the batches of steps s0, s0 + 1, ..."""
    model = Toy(ToyConfig())
    load_model(model, str(src / "model.safetensors"))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    data = ArrayChunks()
    for step in range(s0, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * min(1.0, (step - s0 + 1) / cfg.warmup_steps)
        ids, mask = data.get_batch(batch_indices(cfg.seed, step, cfg.batch_size, len(data)))
        toy_loss(model, ids, mask)[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict()


@pytest.fixture
def source_run(tmp_path) -> Path:
    """A run at step 6, its optimizer state beside it (a warm start must not use it)."""
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "src", _cfg(steps=6))
    return tmp_path / "src"


@pytest.mark.parametrize("weights_only", [False, True])
def test_warm_start_equals_a_hand_written_reference(source_run, tmp_path, weights_only):
    init_from = source_run / "model.safetensors" if weights_only else source_run
    records: list[dict] = []
    torch.manual_seed(123)  # other initial weights: the saved ones must replace them
    res = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "w", _cfg(),
                init_from=init_from, on_log=records.append)
    assert res.resumed_from == 6 and res.step == 12
    assert records[0] == {**records[0], "event": "warm_start", "step": 6,
                          "init_from": str(init_from)}
    first = next(r for r in records if r["event"] == "train")
    assert first["step"] == 8 and first["lr"] == lr_at(7, _cfg()) * 2 / 3  # step 7 of 6..8
    ref = _reference_warm_start(source_run, _cfg(), 6)
    got = _weights(tmp_path / "w")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_warm_started_run_resumes_bit_identically(source_run, tmp_path):
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "full", _cfg(),
          init_from=source_run)
    part = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "part", _cfg(),
                 init_from=source_run, stop_at=7)  # killed inside the re-warm (steps 6..8)
    assert part.step == 7
    torch.manual_seed(123)
    again = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "part", _cfg(),
                  init_from=source_run)  # out_dir's checkpoint wins over init_from
    assert again.resumed_from == 7 and again.step == 12
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(line)["event"] for line in
              (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("warm_start") == 1


def test_warm_start_refuses_what_it_cannot_load(source_run, tmp_path):
    def run(init_from: Path, **kw) -> None:
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "w", _cfg(**kw),
              init_from=init_from)

    other = checkpoint.save_checkpoint(tmp_path / "other", Toy(ToyConfig(d_model=8)))
    with pytest.raises(checkpoint.CheckpointError, match="different model config"):
        run(other)
    with pytest.raises(checkpoint.CheckpointError, match="size mismatch") as err:
        run(other / "model.safetensors")  # a bare file: no config, the shapes differ
    assert "\n" not in str(err.value) and str(other) in str(err.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for path in (bad, tmp_path / "missing.safetensors"):
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(path))):
            run(path)
    with pytest.raises(ValueError, match="at step 6: nothing to train"):
        run(source_run, steps=6)
    assert not (tmp_path / "w" / "model.safetensors").exists()


# --------------------------------------------------------------------------- muon


def test_muon_takes_the_linear_weights_and_adamw_the_rest():
    from cir.compressor.train import build_compressor

    from cir.optim import MuonAdamW, muon_parameters

    model = build_compressor("debug")
    opt = make_optimizer(model, _cfg(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert on_muon == {names[id(p)] for p in muon_parameters(model)}
    assert on_muon == {n for n in names.values()
                       if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))}
    on_adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert on_adamw.isdisjoint(on_muon) and on_adamw | on_muon == set(names.values())
    assert {"tok_emb.weight", "enc_pos", "pos_queries", "latent_queries"} <= on_adamw
    assert len(opt.param_groups) == 3  # one Muon group, AdamW with and without decay


def test_muon_update_is_the_orthogonalised_gradient_at_adamw_rms():
    """First step from rest: the change of a Linear weight points along U V^T of its
    gradient (the SVD's orthogonal factor, which Newton-Schulz approximates) and has
    AdamW's update RMS, 0.2 * lr (``match_rms_adamw``)."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 64, bias=False)
    model = nn.Sequential(lin)
    lr = 1e-2
    opt = make_optimizer(model, _cfg(optimizer="muon", lr=lr, weight_decay=0.0),
                         torch.device("cpu"))
    before = lin.weight.detach().clone()
    x = torch.randn(256, 32)  # a full-rank gradient
    (lin(x) ** 2).mean().backward()
    u, _, vh = torch.linalg.svd(lin.weight.grad.double(), full_matrices=False)
    opt.step()
    delta = (before - lin.weight.detach()).double()
    cos = (delta * (u @ vh)).sum() / (delta.norm() * (u @ vh).norm())
    assert cos > 0.95  # the quintic iteration leaves singular values in about [0.7, 1.2]
    rms = delta.pow(2).mean().sqrt().item()
    ortho_rms = (u @ vh).pow(2).mean().sqrt().item()  # 1 / sqrt(64) for a 64 x 32 matrix
    assert rms == pytest.approx(0.2 * math.sqrt(64) * lr * ortho_rms, rel=0.2)


def test_muon_training_reduces_loss_and_resumes_bit_identically(tmp_path):
    cfg = _cfg(optimizer="muon", steps=24)
    torch.manual_seed(0)
    records: list[dict] = []
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "full", cfg,
          on_log=records.append)
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    torch.manual_seed(0)
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "part", cfg, stop_at=9)
    torch.manual_seed(123)
    resumed = train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path / "part", cfg)
    assert resumed.resumed_from == 9 and resumed.step == 24
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumes_only_with_its_own_optimizer(tmp_path):
    train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(), stop_at=4)
    with pytest.raises(checkpoint.CheckpointError, match="optimizer"):
        train(Toy(ToyConfig()), toy_loss, ArrayChunks(), tmp_path, _cfg(optimizer="muon"))
    with pytest.raises(ValueError, match="optimizer must be adamw or muon"):
        _cfg(optimizer="sgd")
