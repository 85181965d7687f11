"""Router inputs that must be refused or skipped: chunk lengths, pipes, non-finite numbers,
resuming with other inputs, `perplexity --routed` on bad files, failed-mount leftovers."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from _router_helpers import registry_with
from cir.cli.main import app
from cir.compressor.model import Compressor, CompressorConfig
from cir.data import load_tokenizer
from cir.experts.registry import build_model
from cir.router import mount as mount_mod
from cir.router import score as score_mod
from cir.router.mount import MountConfig, mount
from cir.router.registry import Registry, RegistryError
from cir.router.score import score_path
from typer.testing import CliRunner

from cir.checkpoint import save_checkpoint

FAST = dict(preset="debug", max_tokens=None, steps_compressor=40, steps_lm=10)
TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n"


def _one_line_error(res, *words: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for word in words:
        assert word in lines[0], lines[0]


# ----------------------------------------------------------------- chunk length (seq_len)


def test_mount_refuses_another_chunk_length_before_training(tiny_corpus, tiny_tokenizer, tmp_path):
    reg = registry_with(["code"], tiny_tokenizer, tmp_path)  # debug: 32-token chunks
    before = sorted(p.name for p in reg.root.iterdir())
    res = CliRunner().invoke(app, ["mount", "prose", "--source", str(tiny_corpus / "prose"),
                                   "--preset", "small", "--max-tokens", "20000",
                                   "--steps-compressor", "1", "--steps-lm", "1",
                                   "--registry", str(reg.root)])
    assert res.exit_code == 2
    assert "chunk length" in res.output and "512" in res.output and "32" in res.output
    assert reg.names() == ["code"] and sorted(p.name for p in reg.root.iterdir()) == before
    assert not reg.work_dir("prose").exists() and not reg.data_dir("prose").exists()


def _add_with_seq_len(reg: Registry, name: str, tokenizer, work, seq_len: int) -> None:
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    comp = Compressor(CompressorConfig.from_name("debug", vocab_size=vocab, seq_len=seq_len))
    lm = build_model("tlinformer", "debug", vocab_size=vocab, seq_len=seq_len)
    reg.add_expert(name, save_checkpoint(work / name / "compressor", comp, tokenizer=tokenizer),
                   save_checkpoint(work / name / "lm", lm, tokenizer=tokenizer),
                   {"threshold": 0.0}, {"domain": name})


def test_registry_with_mixed_chunk_lengths_names_the_odd_expert(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    _add_with_seq_len(reg, "odd", tiny_tokenizer, tmp_path / "work", 64)
    good = tmp_path / "a.py"
    good.write_text(TEXT)
    runner = CliRunner()
    res = runner.invoke(app, ["score", str(good), "--registry", str(reg.root)])
    _one_line_error(res, "chunk length", "(odd)", "unmount")
    rows = json.loads(runner.invoke(app, ["experts", "--registry", str(reg.root), "--json"]).stdout)
    assert {r["name"]: r["seq_len"] for r in rows["experts"]} == {"code": 32, "odd": 64, "prose": 32}
    assert "chunk lengths differ" in runner.invoke(app, ["experts", "--registry", str(reg.root)]).stdout


# ----------------------------------------------------------------- pipes and devices


@pytest.fixture
def loaded(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    return reg.load().experts, load_tokenizer(reg.tokenizer_path)


def _fifo(tmp_path, data: bytes):
    path = tmp_path / "fifo"
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:  # the reader stopped early (too large, binary)
                pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return path, thread


def test_pipe_is_read_once_and_scored_like_the_file(loaded, tmp_path):
    experts, tok = loaded
    data = (TEXT * 30).encode()
    regular = tmp_path / "a.py"
    regular.write_bytes(data)
    fifo, thread = _fifo(tmp_path, data)
    rep = score_path(fifo, experts, tok)
    thread.join(5)
    ref = score_path(regular, experts, tok)
    assert rep.ok and rep.n_bytes == len(data), (rep.status, rep.reason)
    assert rep.result.labels() == ref.result.labels()
    torch.testing.assert_close(rep.result.loss, ref.result.loss)


def test_pipe_over_the_size_bound(loaded, tmp_path, monkeypatch):
    experts, tok = loaded
    monkeypatch.setattr(score_mod, "STREAM_MAX_BYTES", 100)
    monkeypatch.setattr(score_mod, "READ_BYTES", 64)
    fifo, thread = _fifo(tmp_path, (TEXT * 10).encode())
    rep = score_path(fifo, experts, tok)
    thread.join(5)
    assert (rep.status, rep.reason.split(":")[0]) == ("skipped", "too large")


def test_devices_keep_their_status(loaded):
    experts, tok = loaded
    for device, reason in (("/dev/zero", "binary"), ("/dev/urandom", "binary"),
                           ("/dev/null", "empty")):
        rep = score_path(device, experts, tok)
        assert (rep.status, rep.reason) == ("skipped", reason)


# ----------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_score_rejects_non_finite_temperature(tiny_tokenizer, tmp_path, value):
    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    good, blank = tmp_path / "a.py", tmp_path / "blank.txt"
    good.write_text(TEXT)
    blank.write_text("  \n")
    for path in (good, blank):  # also when no file reaches the routing
        res = CliRunner().invoke(app, ["score", str(path), "--registry", str(reg.root),
                                       "--temperature", value, "--json", "--per-chunk"])
        _one_line_error(res, "--temperature must be > 0 and finite")


def test_score_rejects_a_batch_size_below_one_before_reading_files(tiny_tokenizer, tmp_path):
    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")  # no file reaches the routing, where the size was checked
    res = CliRunner().invoke(app, ["score", str(blank), "--registry", str(reg.root),
                                   "--batch-size", "0"])
    _one_line_error(res, "--batch-size must be >= 1, got 0")


# ----------------------------------------------------------------- resume, failed mounts


class _Stop(Exception):
    pass


def _interrupted(*args, **kwargs):
    raise _Stop()


def test_resume_with_other_inputs_is_refused(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    monkeypatch.setattr(mount_mod, "_train_compressor", _interrupted)
    code, prose = str(tiny_corpus / "code"), str(tiny_corpus / "prose")
    with pytest.raises(_Stop):  # interrupted once the corpus is built
        mount(reg, "x", code, MountConfig(**FAST))
    work = reg.work_dir("x")
    assert (work / "data" / "manifest.json").is_file()  # worth resuming: kept
    for source, changes, flag in ((prose, {}, "--source"), (code, {"max_tokens": 5000}, "--max-tokens"),
                                  (code, {"preset": "small"}, "--preset")):
        cfg = MountConfig(**{**FAST, **changes})
        with pytest.raises(RegistryError, match=f"cannot resume .*{flag}") as err:
            mount(reg, "x", source, cfg)
        assert str(work) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(_Stop):  # the same inputs (more steps) resume
        mount(reg, "x", code, MountConfig(**{**FAST, "steps_compressor": 80}))
    assert reg.names() == []


def test_resume_with_other_source_cli(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    monkeypatch.setattr(mount_mod, "_train_compressor", _interrupted)
    with pytest.raises(_Stop):
        mount(reg, "x", str(tiny_corpus / "code"), MountConfig(**FAST))
    res = CliRunner().invoke(app, ["mount", "x", "--source", str(tiny_corpus / "prose"),
                                   "--preset", "debug", "--registry", str(reg.root)])
    assert res.exit_code == 2 and "cannot resume" in res.output and "--source" in res.output
    assert reg.names() == [] and reg.work_dir("x").is_dir()


def test_failed_mount_leaves_no_work_dir(tiny_tokenizer, tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    res = CliRunner().invoke(app, ["mount", "x", "--source", str(tmp_path / "missing"),
                                   "--preset", "debug", "--registry", str(reg.root)])
    assert res.exit_code == 2 and "missing" in res.output
    assert not reg.work_dir("x").exists() and reg.names() == []


# ----------------------------------------------------------------- perplexity --routed


def test_routed_perplexity_skips_like_score_and_honours_max_chunks(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    runner = CliRunner()
    args = ["--routed", "--registry", str(reg.root)]
    binary, blank, empty, text = (tmp_path / n for n in ("b.bin", "w.txt", "e.txt", "t.py"))
    binary.write_bytes(b"abc\x00def" * 10)
    blank.write_text(" \n\t\n")
    empty.write_bytes(b"")
    text.write_text(TEXT * 40)
    for path, reason in ((binary, "binary"), (blank, "whitespace only"), (empty, "empty")):
        res = runner.invoke(app, ["perplexity", str(path), *args, "--json"])
        assert res.exit_code == 1, res.output
        assert json.loads(res.stdout) == {"file": str(path), "status": "skipped", "reason": reason}
        res = runner.invoke(app, ["perplexity", str(path), *args])
        assert res.exit_code == 1 and f"skipped: {reason}" in " ".join(res.stdout.split())
    full = json.loads(runner.invoke(app, ["perplexity", str(text), *args, "--json"]).stdout)
    assert full["n_chunks"] > 2
    res = runner.invoke(app, ["perplexity", str(text), *args, "--json", "--max-chunks", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_chunks"] == 2
    _one_line_error(runner.invoke(app, ["perplexity", str(text), *args, "--max-chunks", "0"]),
                    "--max-chunks must be >= 1")


def test_chunk_length_of_no_experts_is_a_value_error():
    from cir.router.routing import seq_len_of

    with pytest.raises(ValueError, match="no experts"):
        seq_len_of([])
