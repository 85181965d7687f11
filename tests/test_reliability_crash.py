"""Crash safety: SIGKILL during `mount` and training, concurrent mounts, full or read-only disk.

Invariants after any kill: the registry loads with no error, every expert mounted before is
byte-identical, the killed expert is fully absent or fully present, and re-running the
command completes (training ends bit-identical to an uninterrupted run).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _reliability import ROUTE_CLI, assert_same_weights, cli_env, kill_after, run_cli, tree_hashes
from _router_helpers import add_untrained, registry_with
from cir.cli.main import app
from cir.router import registry as registry_mod
from cir.router.mount import MountConfig, mount
from cir.router.registry import ExpertExistsError, Registry
from typer.testing import CliRunner

STEPS_COMPRESSOR, STEPS_LM = 40, 10
MOUNT_CFG = MountConfig(preset="debug", steps_compressor=STEPS_COMPRESSOR, steps_lm=STEPS_LM)


def _mount_args(reg: Registry, name: str, source: Path) -> list[str]:
    return ["mount", name, "--source", str(source), "--preset", "debug", "--registry",
            str(reg.root), "--steps-compressor", str(STEPS_COMPRESSOR), "--steps-lm",
            str(STEPS_LM), "--json"]


def _check_invariants(reg: Registry, before: dict[str, str], name: str) -> None:
    loaded = reg.load()
    assert loaded.errors == []
    assert tree_hashes(reg.root / "base") == before  # the expert mounted before: intact
    if (reg.root / name).exists():  # fully present: registered and verified
        assert name in reg.names()
        reg.verify(name)
    else:  # fully absent
        assert name not in reg.names()
        assert {e.name for e in loaded.experts} == {"base"}


def _kill_mount_trials(n: int, seed: int, tiny_corpus: Path, tiny_tokenizer: Path,
                       tmp_path: Path) -> list[tuple[float, bool, bool]]:
    """``n`` seeded kills of `route-cli mount`; returns ``(delay, killed, present)`` each."""
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        reg = registry_with(["base"], tiny_tokenizer, tmp_path / f"trial{i}")
        before = tree_hashes(reg.root / "base")
        delay = rng.uniform(0.3, 3.5)
        out = kill_after(_mount_args(reg, "prose", tiny_corpus / "prose"), delay)
        present = (reg.root / "prose").exists()
        _check_invariants(reg, before, "prose")
        if present:  # the kill came after the rename: a rerun is refused as mounted
            with pytest.raises(ExpertExistsError):
                mount(reg, "prose", str(tiny_corpus / "prose"), MOUNT_CFG)
        else:
            mount(reg, "prose", str(tiny_corpus / "prose"), MOUNT_CFG)
        _check_invariants(reg, before, "prose")
        assert reg.names() == ["base", "prose"]
        assert not reg.work_dir("prose").exists()
        assert not [p for p in reg.root.iterdir() if p.name.startswith(registry_mod.TMP_PREFIX)]
        trials.append((delay, out.killed, present))
    return trials


def test_kill9_mount_three_trials(tiny_corpus, tiny_tokenizer, tmp_path):
    trials = _kill_mount_trials(3, 0, tiny_corpus, tiny_tokenizer, tmp_path)
    assert any(killed for _, killed, _ in trials)


@pytest.mark.slow
def test_kill9_mount_twenty_trials(tiny_corpus, tiny_tokenizer, tmp_path):
    trials = _kill_mount_trials(20, 1, tiny_corpus, tiny_tokenizer, tmp_path)
    print(f"kill -9 mount: {sum(k for _, k, _ in trials)}/20 killed mid-run, "
          f"{sum(p for _, _, p in trials)} already registered when killed; all invariants held")
    assert sum(killed for _, killed, _ in trials) >= 10


def _train_args(data: Path, out: Path) -> list[str]:
    return ["compressor", "train", "--data", str(data), "--out", str(out), "--preset", "debug",
            "--steps", "400", "--device", "cpu", "--json"]


def _logged_step(out: Path, step: int) -> Callable[[], bool]:
    """Whether the run in ``out`` has logged ``step`` (or later) in its metrics."""
    def reached() -> bool:
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()[-3:]
        except OSError:
            return False
        for line in lines:
            try:
                if json.loads(line).get("step", 0) >= step:
                    return True
            except ValueError:  # a line being written
                continue
        return False
    return reached


def _kill_train_trials(n: int, seed: int, data: Path, tmp_path: Path) -> list[bool]:
    ref = tmp_path / "reference"
    done = run_cli(_train_args(data, ref))
    assert done.returncode == 0, done.stderr
    rng = random.Random(seed)
    killed = []
    for i in range(n):
        out = tmp_path / f"killed{i}"
        # killed twice, as soon as a random step of each half of the 400 is logged (between
        # checkpoints or on one), then run to the end; the second kill's step lies past the
        # first's, so only the resumed run reaches it
        for lo, hi in ((40, 180), (220, 360)):
            at = _logged_step(out, rng.randrange(lo, hi))
            killed.append(kill_after(_train_args(data, out), 300.0, until=at).killed)
        res = run_cli(_train_args(data, out))
        assert res.returncode == 0, res.stderr
        assert_same_weights(ref / "model.safetensors", out / "model.safetensors")
    return killed


def test_kill9_training_resumes_bit_identical(tiny_dataset, tmp_path):
    assert all(_kill_train_trials(1, 0, tiny_dataset, tmp_path))  # both kills mid-run


@pytest.mark.slow
def test_kill9_training_ten_trials(tiny_dataset, tmp_path):
    killed = _kill_train_trials(10, 1, tiny_dataset, tmp_path)
    print(f"kill -9 training: {sum(killed)}/{len(killed)} kills mid-run, 10/10 bit-identical")
    assert all(killed)


def test_score_during_mount_sees_old_or_new_registry(tiny_corpus, tiny_tokenizer, tmp_path):
    reg = registry_with(["base"], tiny_tokenizer, tmp_path)
    seen: list[tuple[str, ...]] = []

    def poll() -> None:
        loaded = Registry(reg.root).load()
        assert loaded.errors == []
        seen.append(tuple(e.name for e in loaded.experts))

    out = kill_after(_mount_args(reg, "prose", tiny_corpus / "prose"), 120.0, poll)
    assert not out.killed and out.returncode == 0
    poll()
    assert set(seen) <= {("base",), ("base", "prose")}
    assert seen[0] == ("base",) and seen[-1] == ("base", "prose")


def test_two_cli_mounts_of_one_name(tiny_corpus, tiny_tokenizer, tmp_path):
    """Processes, not threads: one wins, the other fails with one clear line."""
    reg = registry_with(["base"], tiny_tokenizer, tmp_path)
    procs = [subprocess.Popen([*ROUTE_CLI, *_mount_args(reg, "prose", tiny_corpus / "prose")],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "already running" in err or "already mounted" in err
    assert len(err.strip().splitlines()) == 1
    assert reg.names() == ["base", "prose"] and reg.load().errors == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("where", ["copyfile", "replace", "mkdtemp"])
def test_disk_full_or_read_only_during_register(tiny_tokenizer, tmp_path, monkeypatch, code, where):
    reg = registry_with(["base"], tiny_tokenizer, tmp_path)
    before = tree_hashes(reg.root / "base")

    def boom(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    target = {"copyfile": (registry_mod.shutil, "copyfile"),
              "replace": (registry_mod.os, "replace"),
              "mkdtemp": (registry_mod.tempfile, "mkdtemp")}[where]
    with monkeypatch.context() as m:
        m.setattr(*target, boom)
        with pytest.raises(OSError) as exc:
            add_untrained(reg, "new", tiny_tokenizer, tmp_path / "work", seed=1)
    assert exc.value.errno == code
    assert reg.names() == ["base"] and reg.load().errors == []
    assert tree_hashes(reg.root / "base") == before
    assert not [p for p in reg.root.iterdir() if p.name.startswith(registry_mod.TMP_PREFIX)]
    add_untrained(reg, "new", tiny_tokenizer, tmp_path / "work", seed=1)  # space is back
    assert reg.names() == ["base", "new"]


def test_disk_full_mount_cli_is_one_line(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    reg = registry_with(["base"], tiny_tokenizer, tmp_path)
    before = tree_hashes(reg.root / "base")
    real = shutil.copyfile

    def full(src, dst, *a, **kw):
        if Path(dst).name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(registry_mod.shutil, "copyfile", full)
    res = CliRunner().invoke(app, _mount_args(reg, "prose", tiny_corpus / "prose"))
    assert res.exit_code == 2
    assert "No space left on device" in res.output and len(res.output.strip().splitlines()) == 1
    assert reg.names() == ["base"] and tree_hashes(reg.root / "base") == before
    monkeypatch.setattr(registry_mod.shutil, "copyfile", real)
    t = time.monotonic()
    assert mount(reg, "prose", str(tiny_corpus / "prose"), MOUNT_CFG).resumed  # from .work
    assert time.monotonic() - t < 120 and reg.load().errors == []


def test_real_tmpfs_full_if_mountable(tiny_tokenizer, tmp_path):
    """A 2 MiB tmpfs registry: the second expert does not fit (skipped where not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        reg = registry_with([], tiny_tokenizer, mnt)
        add_untrained(reg, "base", tiny_tokenizer, tmp_path / "work")
        before = tree_hashes(reg.root / "base")
        for i in range(50):
            try:
                add_untrained(reg, f"x{i}", tiny_tokenizer, tmp_path / "work", seed=i)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            pytest.fail("the 2 MiB tmpfs never filled up")
        assert reg.load().errors == [] and tree_hashes(reg.root / "base") == before
        assert not [p for p in reg.root.iterdir() if p.name.startswith(registry_mod.TMP_PREFIX)]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
