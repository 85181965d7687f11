"""Bad input matrix: files given to `score`, damaged checkpoints and registries, CLI numbers.

Cases already covered elsewhere (not repeated here): empty, whitespace-only, NUL-binary,
Latin-1, invalid UTF-8 in the middle, missing, directory, stdin, shorter than one chunk
(tests/test_router_score.py); flipped weight byte, other tokenizer, invalid names
(tests/test_router_registry.py); config.json unknown / missing fields for the compressor
(tests/test_compressor_model.py). docs/troubleshooting.md lists them all.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from _reliability import STREAM_RSS_CHILD, peak_rss_kib, write_text_file
from _router_helpers import make_checkpoints, registry_with
from cir.cli.main import app
from cir.data import chunk_text, load_tokenizer
from cir.router.registry import Registry, sha256_file
from typer.testing import CliRunner

from cir.checkpoint import MODEL_KINDS, ROLES, CheckpointError, load_checkpoint

BLOCK = ("def add(a, b):\n    return a + b\n\n"
         "The river ran through the quiet city in the morning light.\n") * 20


@pytest.fixture
def reg(tiny_tokenizer, tmp_path) -> Registry:
    return registry_with(["code", "prose"], tiny_tokenizer, tmp_path)


def _score_json(reg: Registry, *args: str, stdin: str | None = None) -> tuple[int, dict]:
    res = CliRunner().invoke(app, ["score", "--registry", str(reg.root), "--json", *args],
                             input=stdin)
    return res.exit_code, json.loads(res.stdout)


def _png() -> bytes:
    """A valid 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def test_score_elf_and_png_are_skipped_as_binary(reg, tmp_path):
    elf = tmp_path / "prog"
    elf.write_bytes(Path(sys.executable).resolve().read_bytes()[: 1 << 16])
    assert elf.read_bytes()[:4] == b"\x7fELF"
    png = tmp_path / "img.png"
    png.write_bytes(_png())
    good = tmp_path / "a.py"
    good.write_text(BLOCK)
    code, out = _score_json(reg, str(elf), str(png), str(good))
    assert code == 0
    assert [(f["status"], f["reason"]) for f in out["files"]] == [
        ("skipped", "binary"), ("skipped", "binary"), ("ok", None)]
    code, out = _score_json(reg, str(elf), str(png))
    assert code == 1  # nothing could be scored


def test_score_symlink_loop_and_dangling_link(reg, tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    code, out = _score_json(reg, str(tmp_path / "loop1"), str(tmp_path / "dangling"))
    assert code == 1
    assert [(f["status"], f["reason"]) for f in out["files"]] == [
        ("error", "unreadable: symlink loop"), ("error", "not found")]


def test_score_one_repeated_token_and_stdin(reg, tmp_path, tiny_tokenizer):
    text = "a" * 20_000
    path = tmp_path / "aaaa.txt"
    path.write_text(text)
    code, out = _score_json(reg, str(path), "--per-chunk")
    assert code == 0 and out["files"][0]["status"] == "ok"
    seq_len = reg.load().experts[0].compressor.config.seq_len
    _, lengths = chunk_text(text, load_tokenizer(tiny_tokenizer), seq_len)
    assert [c["n_tokens"] for c in out["files"][0]["chunks"]] == lengths.tolist()
    code, piped = _score_json(reg, "-", stdin=text)
    assert code == 0 and piped["files"][0]["decision"] == out["files"][0]["decision"]


def test_streaming_memory_does_not_grow_with_file_size(tiny_tokenizer, tmp_path):
    """Peak RSS scoring 5 MB vs 20 MB of text: the 4x larger file adds < 64 MiB."""
    rss = {}
    for mb in (5, 20):
        path = write_text_file(tmp_path / f"f{mb}.txt", mb << 20, BLOCK)
        rc, rss[mb], out = peak_rss_kib([sys.executable, "-c", STREAM_RSS_CHILD, str(path),
                                         str(tiny_tokenizer)])
        assert rc == 0 and int(out.split()[0]) > 0
        path.unlink()
    assert rss[20] < rss[5] + 64 * 1024, rss


@pytest.mark.slow
def test_score_one_gigabyte_in_bounded_memory(tiny_tokenizer, tmp_path):
    """1 GiB of real text through the streaming scorer: peak RSS stays under 1 GiB."""
    path = write_text_file(tmp_path / "huge.txt", 1 << 30, BLOCK)
    rc, rss, out = peak_rss_kib([sys.executable, "-c", STREAM_RSS_CHILD, str(path),
                                 str(tiny_tokenizer)])
    assert rc == 0 and int(out.split()[0]) > (1 << 30) // (4 * 512)
    print(f"peak RSS scoring 1 GiB: {rss / 1024:.0f} MiB")
    assert rss < 1 << 20, f"peak RSS {rss} KiB"


# ------------------------------------------------------------------ checkpoints, registry


@pytest.fixture
def ckpt(tiny_tokenizer, tmp_path) -> Path:
    return make_checkpoints(tmp_path / "ck", tiny_tokenizer)[0]


def test_truncated_weights(ckpt, reg):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)
    target = reg.root / "code" / "compressor" / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    loaded = reg.load()
    assert [e.name for e in loaded.experts] == ["prose"]
    assert loaded.errors[0][0] == "code" and "sha256" in loaded.errors[0][1]
    sample = reg.root.parent / "sample.py"
    sample.write_text(BLOCK)
    res = CliRunner().invoke(app, ["score", str(sample), "--registry", str(reg.root), "--json"])
    assert res.exit_code == 0
    warned = CliRunner().invoke(app, ["score", str(sample), "--registry", str(reg.root)])
    assert "expert code not loaded: compressor/model.safetensors does not match" in " ".join(
        warned.output.split())  # the expert named once


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["config"].update(extra_field=1), "unknown fields"),
    (lambda c: c["config"].pop("n_heads"), "missing fields"),
    (lambda c: c.update(kind="gpt9"), "unknown model kind"),
    (lambda c: c.pop("config"), "malformed config"),
    (lambda c: c.update(config=None), "must be a JSON object"),
    (lambda c: c["config"].update(n_heads="two"), "n_heads must be int, got 'two'"),
    (lambda c: c["config"].update(dropout=True), "dropout must be float, got True"),
])
def test_bad_config_json(ckpt, edit, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_load_checkpoint_expect_refuses_the_other_kind(tiny_tokenizer, tmp_path):
    comp, lm = make_checkpoints(tmp_path / "ck", tiny_tokenizer)
    ours = sorted(k for k, where in MODEL_KINDS.items() if where.startswith("cir."))
    assert sorted(k for kinds in ROLES.values() for k in kinds) == ours  # each has a role
    assert load_checkpoint(comp, expect="compressor").kind == "compressor"
    assert load_checkpoint(lm, expect="language model").kind == "tlinformer"
    (comp / "model.safetensors").unlink()  # refused from config.json, before the weights
    with pytest.raises(CheckpointError,
                       match=re.escape(f"{comp}: a compressor checkpoint, not a language model")):
        load_checkpoint(comp, expect="language model")
    with pytest.raises(CheckpointError,
                       match=re.escape(f"{lm}: a tlinformer checkpoint, not a compressor")):
        load_checkpoint(lm, expect="compressor")
    res = CliRunner().invoke(app, ["compressor", "eval", str(lm), "--data", "random"])
    assert res.exit_code == 2 and "not a compressor" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_in_place_of_safetensors_is_refused_never_unpickled(ckpt, reg, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"weight": _Trap(marker)})
    (ckpt / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    torch.save({"weight": _Trap(marker)}, ckpt / "model.safetensors")  # torch's zip pickle
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    # the same file inside a registry, with meta.json rewritten so the hashes match
    expert = reg.root / "code"
    (expert / "compressor" / "model.safetensors").write_bytes(payload)
    meta = json.loads((expert / "meta.json").read_text())
    rec = meta["files"]["compressor/model.safetensors"]
    rec.update(sha256=sha256_file(expert / "compressor" / "model.safetensors"), bytes=len(payload))
    (expert / "meta.json").write_text(json.dumps(meta))
    loaded = reg.load()
    assert [e.name for e in loaded.experts] == ["prose"] and loaded.errors[0][0] == "code"
    assert not marker.exists()


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "my expert", "ünïcode", ""])
def test_mount_cli_refuses_bad_names_before_writing(name, tiny_corpus, tmp_path):
    root = tmp_path / "registry"
    res = CliRunner().invoke(app, ["mount", name, "--source", str(tiny_corpus / "prose"),
                                   "--preset", "debug", "--registry", str(root)])
    assert res.exit_code == 2 and "invalid expert name" in res.output
    assert not root.exists() and not (tmp_path / "escape").exists()


# ------------------------------------------------------------------ CLI numbers, presets


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "-1"], "temperature must be > 0"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "-4"], "--batch-size must be >= 1"),
])
def test_score_out_of_range_numbers(reg, tmp_path, args, message):
    good = tmp_path / "a.py"
    good.write_text(BLOCK)
    res = CliRunner().invoke(app, ["score", str(good), "--registry", str(reg.root), *args])
    assert res.exit_code == 2 and message in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["mount", "x", "--source", "SRC", "--preset", "huge"], "valid: debug, small"),
    (["mount", "x", "--source", "SRC", "--preset", "debug", "--max-tokens", "0"],
     "max-tokens must be >= 1"),
    (["mount", "x", "--source", "SRC", "--preset", "debug", "--steps-compressor", "-3"],
     "steps-compressor must be >= 1"),
    (["mount", "x", "--source", "SRC", "--preset", "debug", "--steps-lm", "0"],
     "steps-lm must be >= 1"),
    (["data", "build", "d", "--source", "SRC", "--seq-len", "0"], "seq_len must be >= 2"),
    (["compressor", "train", "--data", "DATA", "--out", "OUT", "--preset", "huge"],
     "valid: debug, small, base, paper"),
    (["expert", "train", "--data", "DATA", "--out", "OUT", "--preset", "huge"],
     "valid: debug, small, paper-41m"),
    (["compressor", "train", "--data", "DATA", "--out", "OUT", "--preset", "debug",
      "--set", "d_model=abc"], "d_model must be int, got 'abc'"),
    (["expert", "train", "--data", "DATA", "--out", "OUT", "--preset", "debug",
      "--set", "n_embd=[1, 2]"], "n_embd must be int, got [1, 2]"),
    (["compressor", "train", "--data", "DATA", "--out", "OUT", "--preset", "debug",
      "--optimizer", "sgd"], "optimizer must be adamw or muon"),
    (["expert", "train", "--data", "DATA", "--out", "OUT", "--preset", "debug",
      "--optimizer", "lion"], "optimizer must be adamw or muon"),
])
def test_cli_bad_numbers_and_presets(args, message, tiny_corpus, tiny_dataset, tmp_path):
    subst = {"SRC": str(tiny_corpus / "prose"), "DATA": str(tiny_dataset),
             "OUT": str(tmp_path / "out")}
    args = [subst.get(a, a) for a in args]
    if args[0] == "mount":
        args += ["--registry", str(tmp_path / "registry")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) <= 2
    assert not (tmp_path / "registry" / "x").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["x[/]", "in/[bold]weird", "a:train:b"])
def test_errors_print_user_text_as_written(name, tmp_path):
    """Markup brackets and emoji codes in a name reach the one-line error unchanged."""
    res = CliRunner().invoke(app, ["data", "info", name])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert name in res.output and len(res.output.strip().splitlines()) <= 2


def test_json_output_is_strict_json(capsys):
    import numpy as np
    from cir.cli.common import print_json

    print_json({"nan": float("nan"), "inf": [1.5, float("-inf")], "np": np.float32("nan"),
                "ints": np.arange(2), "path": Path("a/b")})
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert out == {"nan": None, "inf": [1.5, None], "np": None, "ints": [0, 1], "path": "a/b"}
