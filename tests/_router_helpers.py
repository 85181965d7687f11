"""Untrained debug checkpoints and registries for the router tests (no training)."""

from __future__ import annotations

from pathlib import Path

import torch
from cir.compressor.model import Compressor, CompressorConfig
from cir.data import load_tokenizer
from cir.experts.registry import build_model
from cir.router.registry import Registry

from cir.checkpoint import save_checkpoint


def make_checkpoints(out: Path, tokenizer: Path, seed: int = 0) -> tuple[Path, Path]:
    """A debug compressor and a debug TLinFormer LM sized to ``tokenizer``."""
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    torch.manual_seed(seed)
    comp = Compressor(CompressorConfig.from_name("debug", vocab_size=vocab))
    lm = build_model("tlinformer", "debug", vocab_size=vocab, seq_len=comp.config.seq_len)
    return (
        save_checkpoint(out / "compressor", comp, tokenizer=tokenizer),
        save_checkpoint(out / "lm", lm, tokenizer=tokenizer),
    )


def add_untrained(reg: Registry, name: str, tokenizer: Path, work: Path, seed: int = 0,
                  threshold: float = 0.0) -> None:
    comp, lm = make_checkpoints(work / name, tokenizer, seed)
    reg.add_expert(name, comp, lm, {"threshold": threshold}, {"domain": name})


def registry_with(names: list[str], tokenizer: Path, root: Path) -> Registry:
    reg = Registry(root / "registry")
    reg.set_tokenizer(tokenizer)
    for i, name in enumerate(names):
        add_untrained(reg, name, tokenizer, root / "work", seed=i)
    return reg
