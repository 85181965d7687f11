"""scripts/weight_parts.py: bf16 weights in compressed parts, joined back into a checkpoint
that loads and warm-starts a run."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cir.compressor.model import Compressor
from cir.compressor.train import default_train_config, train_compressor
from safetensors.torch import load_file, save_file

from cir.checkpoint import load_checkpoint, weights_metadata

SCRIPT = Path(__file__).parents[1] / "scripts" / "weight_parts.py"
_spec = importlib.util.spec_from_file_location("weight_parts", SCRIPT)
weight_parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weight_parts)


def _cfg(steps: int):
    return default_train_config("debug", steps=steps, device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wp") / "ckpt"
    train_compressor(str(tiny_dataset), out, preset="debug", train_cfg=_cfg(10))
    return out


@pytest.fixture
def parts(trained, tmp_path, capsys) -> Path:
    weight_parts.main(["split", str(trained), str(tmp_path / "parts"), "--part-bytes", "10000"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "split" and summary["parts"] > 2
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    sizes = [(tmp_path / "parts" / p["name"]).stat().st_size for p in manifest["parts"]]
    assert max(sizes) <= 10_000 and sum(sizes) == summary["compressed_bytes"]
    assert summary["compressed_bytes"] < summary["bf16_bytes"] < summary["source_bytes"]
    return tmp_path / "parts"


def test_split_join_round_trip_is_exact(trained, parts, tmp_path, tiny_dataset, capsys):
    weight_parts.main(["join", str(parts), str(tmp_path / "joined")])
    assert json.loads(capsys.readouterr().out)["command"] == "join"
    joined = tmp_path / "joined"
    manifest = json.loads((parts / "manifest.json").read_text())
    blob = (joined / "model.safetensors").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == manifest["bf16_sha256"]
    original, got = load_file(trained / "model.safetensors"), load_file(joined / "model.safetensors")
    assert got.keys() == original.keys()
    assert all(torch.equal(got[k], original[k].to(torch.bfloat16)) for k in original)
    assert weights_metadata(joined / "model.safetensors")["step"] == "10"
    assert (joined / "config.json").read_text() == (trained / "config.json").read_text()
    model = load_checkpoint(joined)  # bf16 weights into the fp32 model, exactly
    assert isinstance(model, Compressor)
    assert all(torch.equal(model.state_dict()[k], got[k].float()) for k in got)
    # the joined directory warm-starts the run at its step
    res = train_compressor(str(tiny_dataset), tmp_path / "cont", preset="debug",
                           train_cfg=_cfg(12), init_from=joined)
    assert res.resumed_from == 10 and res.step == 12


def test_join_names_a_corrupt_or_missing_part(parts, tmp_path):
    part = parts / "weights.part-001"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, str(SCRIPT), "join", str(parts), str(tmp_path / "j")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and f"{part}: part corrupt" in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "j").exists()
    (parts / "weights.part-002").unlink()
    part.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the size differs too
    with pytest.raises(SystemExit, match="weights.part-001: part corrupt"):
        weight_parts.main(["join", str(parts), str(tmp_path / "j")])
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="weights.part-002: part missing"):
        weight_parts.main(["join", str(parts), str(tmp_path / "j")])


def test_odd_sized_integer_tensors_round_trip(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tensors = {"w": torch.randn(5, 3), "mask": torch.tensor([True, False, True]),
               "ids": torch.arange(4, dtype=torch.int8)}  # 37 bytes in all
    save_file(tensors, ckpt / "model.safetensors", metadata={"step": "7"})
    (ckpt / "config.json").write_text("{}")
    weight_parts.split(ckpt, tmp_path / "parts", 64)
    weight_parts.join(tmp_path / "parts", tmp_path / "joined")
    got = load_file(tmp_path / "joined" / "model.safetensors")
    assert torch.equal(got["mask"], tensors["mask"]) and torch.equal(got["ids"], tensors["ids"])
    assert torch.equal(got["w"], tensors["w"].to(torch.bfloat16))


def test_join_names_an_unreadable_manifest(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"parts": [{"name": "weights.par')  # cut short
    res = subprocess.run([sys.executable, str(SCRIPT), "join", str(parts), str(tmp_path / "j")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "manifest.json: not a weight-parts manifest" in res.stderr
    assert res.stderr.count("\n") == 1
