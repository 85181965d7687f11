"""Mounting real debug experts end to end, a mount killed halfway, same-name exclusion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import filelock
import pytest
from _router_helpers import make_checkpoints
from cir.cli.main import app
from cir.data import load_tokenizer
from cir.router.mount import MountConfig, mount
from cir.router.registry import ExpertExistsError, Registry, RegistryError
from cir.router.score import score_path
from typer.testing import CliRunner

FAST = dict(preset="debug", max_tokens=None, steps_compressor=40, steps_lm=10)


def _hashes(reg: Registry, name: str) -> dict[str, str]:
    return {r: v["sha256"] for r, v in reg.info(name).meta["files"].items()}


def test_mount_two_experts_then_route(tiny_corpus, tmp_path):
    reg = Registry(tmp_path / "registry")
    first = mount(reg, "code", str(tiny_corpus / "code"), MountConfig(**FAST))
    assert reg.has_tokenizer()  # the first mount trained and installed it
    before = _hashes(reg, "code")
    mount(reg, "prose", str(tiny_corpus / "prose"), MountConfig(**FAST))
    assert _hashes(reg, "code") == before  # existing experts are never modified
    assert reg.names() == ["code", "prose"] and reg.load().errors == []
    cal = first.info.calibration
    assert 0.0 <= cal["threshold"] <= cal["tra_quantiles"]["0.01"] and cal["n_chunks"] > 0
    assert first.info.meta["corpus_fingerprint"] and reg.data_dir("code").is_dir()
    assert not reg.work_dir("code").exists()
    experts = reg.load().experts
    tok = load_tokenizer(reg.tokenizer_path)
    code_file = sorted((tiny_corpus / "code").rglob("*.py"))[0]
    prose_file = sorted((tiny_corpus / "prose").rglob("*.txt"))[0]
    assert score_path(code_file, experts, tok).result.decision()["loss_weighted"] == "code"
    assert score_path(prose_file, experts, tok).result.decision()["loss_weighted"] == "prose"
    with pytest.raises(ExpertExistsError):
        mount(reg, "code", str(tiny_corpus / "code"), MountConfig(**FAST))
    _check_cli(reg, code_file)


def _check_cli(reg: Registry, code_file: Path) -> None:
    runner = CliRunner()
    args = ["--registry", str(reg.root), "--json"]
    out = json.loads(runner.invoke(app, ["perplexity", str(code_file), "--routed", *args]).stdout)
    assert out["oracle"] <= min(out["single"].values()) + 1e-9
    assert set(out["single"]) == {"code", "prose"}
    res = runner.invoke(app, ["bench", "registry", "--eval-chunks", "8", *args])
    assert res.exit_code == 0, res.output
    bench = json.loads(res.stdout)
    assert set(bench["domains"]) == {"code", "prose"}
    assert 0.0 <= bench["ood"]["random"]["auroc_tra"] <= 1.0
    lm_dir = reg.root / "code" / "lm"
    res = runner.invoke(app, ["perplexity", str(lm_dir), "--data", str(reg.data_dir("code")),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ppl"] > 1.0


def test_same_name_mount_in_progress_is_refused(tiny_corpus, tiny_tokenizer, tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    reg.work_dir("code").parent.mkdir(parents=True)
    with filelock.FileLock(str(reg.mount_lock_path("code"))):
        with pytest.raises(RegistryError, match="already running"):
            mount(reg, "code", str(tiny_corpus / "code"), MountConfig(**FAST))
    assert reg.names() == []


def test_mount_refuses_a_language_model_as_its_compressor(tiny_corpus, tiny_tokenizer, tmp_path,
                                                          monkeypatch):
    """Calibration loads the work dir's compressor: an LM there is one clear line, exit 2."""
    import cir.router.mount as mount_mod

    lm = make_checkpoints(tmp_path / "ck", tiny_tokenizer)[1]
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    monkeypatch.setattr(mount_mod, "_train_compressor",
                        lambda work, *a: shutil.copytree(lm, work / "compressor"))
    monkeypatch.setattr(mount_mod, "_train_lm", lambda *a: None)
    res = CliRunner().invoke(app, ["mount", "code", "--source", str(tiny_corpus / "code"),
                                   "--preset", "debug", "--registry", str(reg.root), "--json"])
    where = reg.work_dir("code") / "compressor"
    assert res.exit_code == 2, res.output
    assert f"{where}: a tlinformer checkpoint, not a compressor" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert reg.names() == []


def test_cli_mounts_a_coded_compressor(tiny_corpus, tiny_tokenizer, tmp_path):
    """`--compressor-set` and `--lr-compressor` reach the mounted compressor (refitted after
    training, as every coded run is) and are recorded; a wrong field or rate is one line,
    exit 2, before anything is built."""
    from cir.compressor.train import REFIT_KEY

    from cir.checkpoint import load_checkpoint, weights_metadata

    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    base = ["mount", "code", "--source", str(tiny_corpus / "code"), "--preset", "debug",
            "--registry", str(reg.root), "--steps-compressor", "12", "--steps-lm", "4", "--json"]
    for extra, message in ((["--compressor-set", "no_such=1"], "no fields ['no_such']"),
                           (["--compressor-set", "n_codes=1"], "n_codes must be 0"),
                           (["--lr-compressor", "0"], "--lr-compressor must be > 0")):
        res = CliRunner().invoke(app, [*base, *extra])
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
        assert reg.names() == [] and not reg.work_dir("code").exists()
    res = CliRunner().invoke(app, [*base, "--compressor-set", "n_codes=2", "--compressor-set",
                                   "code_balance=false", "--lr-compressor", "0.01"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)["meta"]["mount_config"]
    assert meta["compressor_overrides"] == {"n_codes": 2, "code_balance": False}
    assert meta["compressor_train"]["lr"] == 0.01
    comp = reg.root / "code" / "compressor"
    assert load_checkpoint(comp).config.n_codes == 2
    assert REFIT_KEY in weights_metadata(comp / "model.safetensors")
    lr = [json.loads(line)["lr"] for line in (comp / "metrics.jsonl").read_text().splitlines()
          if '"lr"' in line]
    assert max(lr) == pytest.approx(0.01, rel=1e-3)


_CHILD = textwrap.dedent("""
    import sys
    from cir.router.mount import MountConfig, mount
    from cir.router.registry import Registry
    mount(Registry(sys.argv[1]), "code", sys.argv[2],
          MountConfig(preset="debug", max_tokens=None, steps_compressor=100000, steps_lm=10,
                      compressor_train={"ckpt_every": 5, "schedule": "wsd"}))
""")  # wsd: the resume below may shorten the run (a cosine run's length is fixed)


def test_mount_killed_halfway_then_resumed(tiny_corpus, tiny_tokenizer, tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(reg.root),
                             str(tiny_corpus / "code")], env=env)
    state = reg.work_dir("code") / "compressor" / "train_state.pt"
    deadline = time.monotonic() + 60
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the child never reached its first checkpoint"
    assert reg.names() == [] and reg.load().errors == []  # loadable, expert absent
    result = mount(reg, "code", str(tiny_corpus / "code"),
                   MountConfig(preset="debug", max_tokens=None, steps_compressor=10, steps_lm=10,
                               compressor_train={"ckpt_every": 5, "schedule": "wsd"}))
    assert result.resumed and reg.names() == ["code"] and reg.load().errors == []
    assert not any(p.name.startswith(".tmp-") for p in Path(reg.root).iterdir())


def test_concurrent_mounts(tiny_corpus, tiny_tokenizer, tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    jobs = [("code", "code"), ("prose", "prose"), ("prose", "prose")]
    outcomes: dict[int, object] = {}

    def run(i: int, name: str, sub: str) -> None:
        try:
            mount(Registry(reg.root), name, str(tiny_corpus / sub), MountConfig(**FAST))
            outcomes[i] = "ok"
        except RegistryError as exc:  # the same name: refused while running, or mounted
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.names() == ["code", "prose"] and reg.load().errors == []
    assert outcomes[0] == "ok"
    prose = [outcomes[1], outcomes[2]]
    assert prose.count("ok") == 1
    err = next(o for o in prose if o != "ok")
    assert "already running" in str(err) or "already mounted" in str(err)


@pytest.mark.parametrize("damage", ["torn-manifest", "truncated-shard"])
def test_a_damaged_corpus_of_an_interrupted_mount_is_built_again(
        tiny_corpus, tiny_tokenizer, tmp_path, damage):
    from cir.data.shards import read_manifest, shard_problems
    from cir.router.mount import build_corpus

    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    work = reg.work_dir("code")
    cfg = MountConfig(preset="debug", max_tokens=None)
    data = build_corpus(reg, work, str(tiny_corpus / "code"), cfg)
    if damage == "torn-manifest":
        text = (data / "manifest.json").read_text()
        (data / "manifest.json").write_text(text[: len(text) // 2])
    else:
        shard = data / "train.bin"
        shard.write_bytes(shard.read_bytes()[:7])
    build_corpus(reg, work, str(tiny_corpus / "code"), cfg)  # the re-run of the mount
    manifest = read_manifest(data)
    assert all(not shard_problems(data, s, manifest) for s in ("train", "val", "test"))
