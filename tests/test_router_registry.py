"""Registry: atomic locked writes, hash verification, name validation, cleanup."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from _router_helpers import add_untrained, make_checkpoints, registry_with
from cir.router import registry as registry_mod
from cir.router.registry import (
    ExpertExistsError,
    Registry,
    RegistryError,
    UnknownExpertError,
    sha256_file,
    validate_name,
)


@pytest.mark.parametrize("name", ["python-code", "c.v2_x", "A", "x" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a/b", "..", "a..b", " a", "a b", ".hidden", "-x", "x" * 65, "a\nb", "é"]
)
def test_invalid_names(name, tmp_path):
    with pytest.raises(RegistryError, match="invalid expert name"):
        validate_name(name)
    with pytest.raises(RegistryError):
        Registry(tmp_path).work_dir(name)


def test_add_load_roundtrip_and_meta(tiny_tokenizer, tmp_path):
    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    result = reg.load()
    assert result.errors == [] and [e.name for e in result.experts] == ["code"]
    meta = reg.info("code").meta
    assert meta["format_version"] == 1 and meta["tokenizer_sha256"] == reg.tokenizer_hash()
    for rel, rec in meta["files"].items():
        assert sha256_file(reg.root / "code" / rel) == rec["sha256"]
    assert meta["params"]["compressor"] == result.experts[0].compressor.num_params()
    # the registered weights are the saved ones: same scores as the source checkpoint
    from cir.checkpoint import load_checkpoint

    ref = load_checkpoint(tmp_path / "work" / "code" / "compressor")
    ids = torch.randint(2, 300, (3, ref.config.seq_len))
    mask = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(result.experts[0].compressor.score(ids, mask).loss,
                               ref.score(ids, mask).loss)
    assert result.experts[0].lm().kind == "tlinformer"


def test_flipped_byte_reports_that_expert_and_loads_the_others(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    weights = reg.root / "prose" / "lm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = reg.load()
    assert [e.name for e in result.experts] == ["code"]
    assert len(result.errors) == 1 and result.errors[0][0] == "prose"
    assert "lm/model.safetensors" in result.errors[0][1]
    assert dict(reg.check()) == {"code": None, "prose": result.errors[0][1]}


def test_unknown_expert_lists_mounted(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    with pytest.raises(UnknownExpertError, match="mounted: code, prose"):
        reg.load(["nope"])
    with pytest.raises(UnknownExpertError):
        reg.remove("nope")


def test_other_tokenizer_refused(tiny_tokenizer, tmp_path):
    reg = registry_with([], tiny_tokenizer, tmp_path)
    other = tmp_path / "other.json"
    spec = json.loads(Path(tiny_tokenizer).read_text())
    spec["model"]["vocab"]["zzzz-extra"] = len(spec["model"]["vocab"])
    other.write_text(json.dumps(spec))
    comp, lm = make_checkpoints(tmp_path / "w", other)
    with pytest.raises(RegistryError, match="tokenizer"):
        reg.add_expert("x", comp, lm, {})
    with pytest.raises(RegistryError, match="different tokenizer"):
        reg.set_tokenizer(other)
    assert reg.names() == []


def test_checkpoints_of_the_wrong_kind_refused(tiny_tokenizer, tmp_path):
    reg = registry_with([], tiny_tokenizer, tmp_path)
    comp, lm = make_checkpoints(tmp_path / "w", tiny_tokenizer)
    with pytest.raises(RegistryError, match=f"refusing x: {lm}: a tlinformer checkpoint, not a compressor"):
        reg.add_expert("x", lm, lm, {})
    with pytest.raises(RegistryError, match="compressor checkpoint, not a language model"):
        reg.add_expert("x", comp, comp, {})
    assert reg.names() == [] and sorted(p.name for p in reg.root.iterdir()) == sorted(
        p.name for p in registry_with([], tiny_tokenizer, tmp_path / "fresh").root.iterdir())


def test_concurrent_adds(tiny_tokenizer, tmp_path):
    reg = registry_with([], tiny_tokenizer, tmp_path)
    ckpts = {n: make_checkpoints(tmp_path / "w" / n, tiny_tokenizer) for n in ("a", "b")}
    outcomes: list[object] = []

    def add(name: str, src: str) -> None:
        try:
            Registry(reg.root).add_expert(name, *ckpts[src], {"threshold": 0.0})
            outcomes.append(name)
        except ExpertExistsError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=add, args=a) for a in (("a", "a"), ("b", "b"))]
    threads += [threading.Thread(target=add, args=("same", s)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.names() == ["a", "b", "same"]
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(errors) == 1 and "already mounted" in str(errors[0])
    assert reg.load().errors == []
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".tmp-")]


def test_failure_before_rename_leaves_registry_clean(tiny_tokenizer, tmp_path, monkeypatch):
    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    before = {r: v["sha256"] for r, v in reg.info("code").meta["files"].items()}

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(registry_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        add_untrained(reg, "prose", tiny_tokenizer, tmp_path / "w2")
    monkeypatch.undo()
    assert reg.names() == ["code"] and reg.load().errors == []
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".tmp-")]
    add_untrained(reg, "prose", tiny_tokenizer, tmp_path / "w3")
    assert reg.names() == ["code", "prose"]
    after = {r: v["sha256"] for r, v in reg.info("code").meta["files"].items()}
    assert after == before


def test_stale_temp_dirs_ignored_then_cleaned(tiny_tokenizer, tmp_path):
    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    dead = reg.root / ".tmp-prose-999999999-abcd1234"
    (dead / "compressor").mkdir(parents=True)
    (dead / "meta.json").write_text("{}")
    assert reg.names() == ["code"]
    assert [e.name for e in reg.load().experts] == ["code"]
    assert reg.cleanup() == [dead.name]
    assert not dead.exists()


def test_remove(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    reg.remove("code")
    assert reg.names() == ["prose"]
    assert not (reg.root / "code").exists()
