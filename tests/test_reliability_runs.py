"""Runs that must not mix: two trainings in one directory, a resume on data from another
tokenizer, a checkpoint scored on such data, and models asked for what they cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import filelock
import pytest
import torch
from _router_helpers import make_checkpoints
from cir.cli.main import app
from cir.compressor.train import default_train_config, train_compressor
from cir.experts.evaluate import dataset_perplexity
from cir.experts.generate import generate
from typer.testing import CliRunner

from cir.checkpoint import CheckpointError, load_checkpoint
from cir.train import LOCK_FILE


def _cfg(steps: int):
    return default_train_config("debug", steps=steps, device="cpu", eval_every=1000)


def _other_tokenizer(tokenizer: Path, out: Path) -> Path:
    """The same vocabulary in another file (another sha256): what a second build makes."""
    out.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    return out


def test_a_second_run_in_the_same_directory_fails_at_once(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with filelock.FileLock(str(out / LOCK_FILE), timeout=0):  # a run in progress
        with pytest.raises(CheckpointError, match="another training run is writing there"):
            train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(2))
    assert not (out / "model.safetensors").exists()
    res = train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(2))  # free again
    assert res.step == 2


def test_resume_refuses_data_from_another_tokenizer(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(2))
    before = (out / "model.safetensors").read_bytes()
    _other_tokenizer(out / "tokenizer.json", out / "tokenizer.json")
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(4))
    assert (out / "model.safetensors").read_bytes() == before  # nothing written


def test_eval_and_perplexity_refuse_data_from_another_tokenizer(tiny_dataset, tiny_tokenizer,
                                                                tmp_path):
    other = _other_tokenizer(tiny_tokenizer, tmp_path / "other.json")
    comp, lm = make_checkpoints(tmp_path / "ck", other)
    res = CliRunner().invoke(app, ["compressor", "eval", str(comp), "--data", str(tiny_dataset)])
    assert res.exit_code == 2 and "another tokenizer" in res.output, res.output
    with pytest.raises(CheckpointError, match="another tokenizer"):
        dataset_perplexity(lm, tiny_dataset, split="train")
    same_comp, same_lm = make_checkpoints(tmp_path / "same", tiny_tokenizer)
    assert dataset_perplexity(same_lm, tiny_dataset, split="train", max_chunks=2)["n_chunks"] == 2


def test_models_asked_for_what_they_cannot_do(tiny_dataset, tiny_tokenizer, tmp_path):
    comp, lm = make_checkpoints(tmp_path / "ck", tiny_tokenizer)
    with pytest.raises(ValueError, match="not a language model"):
        dataset_perplexity(comp, tiny_dataset, split="train")
    with pytest.raises(ValueError, match="max_chunks must be >= 1"):
        dataset_perplexity(lm, tiny_dataset, split="train", max_chunks=-1)
    res = CliRunner().invoke(app, ["generate", str(comp), "--prompt", "def "])
    assert res.exit_code == 2 and "cannot generate" in res.output, res.output
    (lm / "tokenizer.json").write_text("print('not a tokenizer')\n")  # named, not 'invalid type'
    res = CliRunner().invoke(app, ["generate", str(lm), "--prompt", "def "])
    assert res.exit_code == 2 and f"{lm / 'tokenizer.json'}: not a tokenizer.json" in res.output
    model, prompt = load_checkpoint(lm), torch.tensor([5, 6, 7])
    for kw, message in [(dict(max_new_tokens=-3), "max_new_tokens must be >= 0"),
                        (dict(max_new_tokens=2, temperature=-1.0), "temperature must be >= 0"),
                        (dict(max_new_tokens=2, temperature=float("nan")), "temperature"),
                        (dict(max_new_tokens=2, top_k=0), "top_k must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            generate(model, prompt, **kw)
    assert generate(model, prompt, max_new_tokens=0).shape == (1, 3)
    res = CliRunner().invoke(app, ["generate", str(lm), "--top-k", "-1"])
    assert res.exit_code == 2


def test_a_torn_training_state_names_itself_and_the_way_on(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(2))
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="train_state.pt: unreadable training state"):
        train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(4))
    res = train_compressor(tiny_dataset, tmp_path / "again", preset="debug", train_cfg=_cfg(4),
                           init_from=out)  # the way the message names
    assert res.resumed_from == 2 and res.step == 4


@pytest.mark.parametrize("args", [["explain", "FILE", "--k", "0"],
                                  ["explain", "FILE", "--max-chunks", "-1"],
                                  ["compressor", "train", "--data", "D", "--out", "OUT",
                                   "--max-minutes", "-1"],
                                  ["quickstart", "--threads", "-1"],
                                  ["bench", "registry", "--eval-chunks", "0"],
                                  ["bench", "continual", "--eval-chunks", "0"]])
def test_out_of_range_options_are_refused_before_work(args, tmp_path):
    f = tmp_path / "a.py"
    f.write_text("x = 1\n")
    args = [{"FILE": str(f), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Invalid value" in res.output
    assert not (tmp_path / "out").exists()


def test_resume_drops_the_replayed_steps_from_the_metrics(tiny_dataset, tmp_path):
    """Steps logged past the last checkpoint (and a line torn by the kill) are logged once."""
    out = tmp_path / "run"
    cfg = default_train_config("debug", steps=8, device="cpu", log_every=1, ckpt_every=4,
                               eval_every=1000)
    train_compressor(tiny_dataset, out, preset="debug", train_cfg=cfg, stop_at=4)
    metrics = out / "metrics.jsonl"
    replayed = [{"event": "train", "step": s, "loss": 9.0} for s in (5, 6)]
    metrics.write_text(metrics.read_text() + "".join(json.dumps(r) + "\n" for r in replayed)
                       + '{"event": "tra')
    train_compressor(tiny_dataset, out, preset="debug", train_cfg=cfg)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == list(range(1, 9)) and all(r.get("loss") != 9.0 for r in records)


def test_ctrl_c_says_where_training_stands(tiny_dataset, tmp_path, monkeypatch):
    import cir.compressor.train as ctrain

    out = tmp_path / "run"
    train_compressor(tiny_dataset, out, preset="debug", train_cfg=_cfg(2))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ctrain, "train_compressor", interrupted)
    for where, message in [(out, "resume from step 2"), (tmp_path / "new", "from the start")]:
        res = CliRunner().invoke(app, ["compressor", "train", "--data", str(tiny_dataset),
                                       "--out", str(where), "--preset", "debug", "--steps", "4"])
        assert res.exit_code == 130 and message in res.output, res.output
