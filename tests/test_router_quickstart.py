"""Quickstart on the tiny corpus with debug settings: build, score the samples, reuse."""

from __future__ import annotations

import torch
from cir.router.quickstart import quickstart

DEBUG = dict(preset="debug", max_tokens=None, steps_compressor=20, steps_lm=5, calib_chunks=16)


def test_quickstart_builds_then_reuses(tiny_corpus, tmp_path):
    domains = {"code": str(tiny_corpus / "code"), "prose": str(tiny_corpus / "prose")}
    reg = tmp_path / "registry"
    first = quickstart(reg, domains=domains, settings=DEBUG)
    assert first.mounted == ["code", "prose"] and first.reused == []
    statuses = {p.name: r.status for p, r in zip(first.samples, first.reports, strict=True)}
    assert statuses == {"sample.py": "ok", "sample.txt": "ok", "sample_mixed.md": "ok",
                        "random.bin": "skipped", "random.txt": "ok"}
    second = quickstart(reg, domains=domains, settings=DEBUG)
    assert second.mounted == [] and second.reused == ["code", "prose"]
    for a, b in zip(first.reports, second.reports, strict=True):
        if a.ok:
            torch.testing.assert_close(a.result.loss, b.result.loss)
    forced = quickstart(reg, force=True, domains=domains, settings=DEBUG)
    assert forced.mounted == ["code", "prose"]
