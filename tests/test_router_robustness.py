"""Corrupted experts, names that collide with registry files, the kept corpus, NaN scores."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _router_helpers import registry_with
from cir.cli.main import app
from typer.testing import CliRunner


def _corrupt_metadata(reg, name: str) -> None:
    path = reg.root / name / "calibration.json"
    path.write_text(path.read_text()[:5])  # truncated: not JSON any more


def test_load_by_name_reports_unreadable_metadata_and_loads_the_others(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    _corrupt_metadata(reg, "prose")
    res = reg.load(["code", "prose"])
    assert [e.name for e in res.experts] == ["code"]
    assert [n for n, _ in res.errors] == ["prose"] and "unreadable metadata" in res.errors[0][1]


def test_unmount_an_expert_whose_metadata_is_unreadable(tiny_tokenizer, tmp_path):
    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    _corrupt_metadata(reg, "prose")
    (reg.root / "code" / "meta.json").write_text("[]")  # JSON, but not an object
    res = CliRunner().invoke(app, ["unmount", "prose", "--yes", "--registry", str(reg.root)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["unmount", "code", "--yes", "--registry", str(reg.root)])
    assert res.exit_code == 0, res.output
    assert reg.names() == []


def test_a_name_taken_by_a_registry_file_is_refused_before_training(tiny_tokenizer, tmp_path):
    from cir.router.mount import MountConfig, mount
    from cir.router.registry import ExpertExistsError

    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    with pytest.raises(ExpertExistsError, match="not a mounted expert"):
        mount(reg, "tokenizer.json", str(tmp_path), MountConfig(preset="debug"))
    assert not reg.work_dir("tokenizer.json").exists()


def test_a_name_ending_in_lock_does_not_collide_with_a_mount_lock(tiny_tokenizer, tmp_path):
    from cir.data.sources import UnknownSourceError
    from cir.router.mount import MountConfig, mount

    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    for name in ("x", "x.lock"):  # the first leaves its lock file behind
        with pytest.raises(UnknownSourceError):
            mount(reg, name, str(tmp_path / "nowhere"), MountConfig(preset="debug"))


def test_expert_dataset_is_the_kept_corpus_not_a_rebuild_from_the_cwd(
        tiny_tokenizer, tiny_dataset, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cir.router.analysis import expert_dataset

    reg = registry_with(["code"], tiny_tokenizer, tmp_path)
    shutil.copytree(tiny_dataset, reg.data_dir("code"))
    other = tmp_path / "elsewhere"
    (other / "pkg").mkdir(parents=True)
    (other / "pkg" / "notes.txt").write_text("not the expert's corpus\n" * 50)
    monkeypatch.chdir(other)
    info = SimpleNamespace(name="code", meta={"source": "pkg", "corpus_fingerprint": "abc",
                                               "corpus": {"seq_len": 64}})
    assert Path(expert_dataset(reg, info)) == reg.data_dir("code")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_a_file_reporting_size_zero_with_content_is_scored(tiny_tokenizer):
    from cir.data import load_tokenizer
    from cir.router.score import score_path

    @dataclass
    class _Cfg:
        seq_len: int = 16

    @dataclass
    class _Scores:
        loss: torch.Tensor
        tra: torch.Tensor

    class Flat:
        config = _Cfg()

        def score(self, ids, mask, batch_size=None):
            return _Scores(torch.ones(len(ids)), torch.ones(len(ids)))

    @dataclass
    class E:
        name: str = "e"
        compressor: Flat = Flat()
        threshold: float | None = 0.0

    rep = score_path("/proc/self/status", [E()], load_tokenizer(tiny_tokenizer))
    assert rep.ok, rep.reason


def test_a_nan_expert_is_not_the_loss_weighted_route():
    from cir.router.routing import RouteResult

    nan = float("nan")
    r = RouteResult(names=["good", "diverged"], loss=torch.tensor([[2.0, nan], [2.5, nan]]),
                    tra=torch.tensor([[0.5, nan], [0.4, nan]]), n_tokens=torch.tensor([8, 2]),
                    thresholds=[0.0, 0.0])
    d = r.decision()
    assert d["majority"] == "good" and d["loss_weighted"] == "good"
    assert r.expert_means()["diverged"]["loss"] != 0.0


def test_quickstart_reports_an_expert_it_could_not_load(tiny_tokenizer, tmp_path):
    from cir.router.quickstart import quickstart
    from cir.router.registry import RegistryError

    reg = registry_with(["code", "prose"], tiny_tokenizer, tmp_path)
    weights = reg.root / "prose" / "compressor" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    res = quickstart(reg.root, domains={"code": "code", "prose": "prose"},
                     samples_dir=tmp_path / "samples")
    assert [n for n, _ in res.errors] == ["prose"]
    _corrupt_metadata(reg, "code")
    with pytest.raises(RegistryError, match="no usable expert"):
        quickstart(reg.root, domains={"code": "code", "prose": "prose"},
                   samples_dir=tmp_path / "samples")
