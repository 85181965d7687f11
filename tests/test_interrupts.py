"""Ctrl-C and SIGTERM during training and mounting: the command says how to go on, exits
with 130 (Ctrl-C) or 143 (SIGTERM), and leaves the SIGTERM handler as it found it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import typer
from _reliability import cli_env
from cir.cli.common import handle_errors, term_as_interrupt
from cir.cli.main import app
from cir.compressor.train import default_train_config, train_compressor
from typer.testing import CliRunner

# a child that sends itself SIGTERM where training would start
SIGTERM_CHILD = """
import os, signal, time
import cir.compressor.train as ctrain

def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler raises before this ends; without one the child dies here

ctrain.train_compressor = terminated
from cir.cli.main import app
app()
"""


def test_sigterm_during_training_says_where_it_stands(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = default_train_config("debug", steps=2, device="cpu", eval_every=1000)
    train_compressor(tiny_dataset, out, preset="debug", train_cfg=cfg)
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_CHILD, "compressor", "train", "--data", str(tiny_dataset),
         "--out", str(out), "--preset", "debug", "--steps", "4"],
        env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "interrupted: re-run the same command to resume from step 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_interrupted_mount_says_how_to_resume(tmp_path, monkeypatch):
    import cir.router.mount as rmount

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rmount, "mount", interrupted)
    res = CliRunner().invoke(app, ["mount", "c-code", "--source", str(tmp_path),
                                   "--registry", str(tmp_path / "reg")])
    assert res.exit_code == 130, res.output
    assert "re-run the same command to resume the mount of 'c-code'" in res.output


def test_term_as_interrupt_restores_the_handler_and_exits_143():
    before = signal.getsignal(signal.SIGTERM)

    @handle_errors
    def work() -> None:
        with term_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is not before  # or the signal kills pytest
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(typer.Exit) as exc:
        work()
    assert exc.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
