"""Name -> (model class, config class) for every expert architecture."""

from __future__ import annotations

from cir.experts.tconstformer import TConstFormer, TConstFormerConfig
from cir.experts.tlinformer import TLinFormer, TLinFormerConfig
from cir.experts.transformer import Transformer, TransformerConfig

ARCHS: dict[str, tuple[type, type]] = {
    "tlinformer": (TLinFormer, TLinFormerConfig),
    "tconstformer": (TConstFormer, TConstFormerConfig),
    "transformer": (Transformer, TransformerConfig),
}


def build_model(arch: str, preset: str = "small", **overrides):
    """A freshly initialised model of ``arch`` from a named preset plus field overrides."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    cls, cfg_cls = ARCHS[arch]
    return cls(cfg_cls.from_name(preset, **overrides))
