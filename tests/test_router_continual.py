"""Continual-learning check and LM comparison on debug experts from the tiny corpus."""

from __future__ import annotations

import random
import re
import shutil

import pytest
from _router_helpers import make_checkpoints
from cir.router.continual import (
    ContinualConfig,
    _sequential_ppl,
    _sequential_stage,
    lm_comparison,
    run_continual,
)
from cir.router.mount import held_out
from cir.router.registry import Registry

from cir.checkpoint import CheckpointError

DEBUG = dict(preset="debug", max_tokens=None, steps_compressor=30, steps_lm=8)


def _config_corpus(root):
    root.mkdir(parents=True)
    rng = random.Random(1)
    for k in range(30):
        lines = [f"[section_{rng.randrange(99)}]"]
        lines += [f"key_{rng.randrange(50)} = {rng.randrange(10_000)}" for _ in range(40)]
        (root / f"conf_{k:02d}.ini").write_text("\n".join(lines) + "\n")
    return root


def test_continual_mount_c_keeps_a_and_b(tiny_corpus, tmp_path):
    third = _config_corpus(tmp_path / "ini")
    cfg = ContinualConfig(
        domains=(str(tiny_corpus / "code"), str(tiny_corpus / "prose"), str(third)),
        workdir=tmp_path / "bench", mount=DEBUG, eval_chunks=8,
    )
    out = run_continual(cfg)
    assert out["domains"] == ["code", "prose", "ini"]
    assert set(out["before"]) == {"code", "prose"} and set(out["after"]) == {"code", "prose", "ini"}
    for name in ("code", "prose"):
        b, a = out["before"][name], out["after"][name]
        # the old experts' LMs are untouched: their own perplexity is bit-identical
        assert a["single"][name] == b["single"][name]
        assert 0.0 <= a["routing_accuracy"] <= 1.0
    for row in out["after"].values():
        assert row["oracle"] <= min(row["single"].values()) + 1e-9
        assert row["oracle"] <= row["routed"] + 1e-9
    assert [s["after"] for s in out["sequential"]] == ["code", "prose", "ini"]
    assert list(out["sequential"][-1]["ppl"]) == ["code", "prose", "ini"]
    from cir.cli.common import console
    from cir.cli.router import _render_continual

    with console.capture() as cap:
        _render_continual(out)
    assert "C=ini" in cap.get() and "prose" in cap.get()
    reg = Registry(out["registry"])
    experts = reg.load().experts
    ids, mask = held_out(reg.data_dir("code"), 4, split="test")
    cmp = lm_comparison(experts, ids, mask)
    assert set(cmp["single"]) == {"code", "prose", "ini"} and cmp["n_chunks"] == ids.shape[0]


def test_sequential_baseline_refuses_a_compressor_checkpoint(tiny_tokenizer, tiny_dataset,
                                                             tmp_path):
    comp = make_checkpoints(tmp_path / "ck", tiny_tokenizer)[0]
    reg = Registry(tmp_path / "registry")
    reg.set_tokenizer(tiny_tokenizer)
    shutil.copytree(tiny_dataset, reg.data_dir("code"))
    cfg = ContinualConfig(domains=("code", "prose", "ini"), workdir=tmp_path / "bench",
                          mount=DEBUG)
    message = re.escape(f"{comp}: a compressor checkpoint, not a language model")
    with pytest.raises(CheckpointError, match=message):
        _sequential_stage(reg, cfg, 0, comp)  # fine-tuning goes on from the previous stage
    with pytest.raises(CheckpointError, match=message):
        _sequential_ppl(reg, comp, ["code"], cfg)
