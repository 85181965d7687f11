"""TConstFormer: TLinFormer with a constant-size decoding cache (seed 003).

Paper: Z. Tang, "From TLinFormer to TConstFormer: The Leap to Constant-Time Transformer
Attention", 2025 (arXiv:2509.00202).

The one change to :mod:`cir.experts.tlinformer`: the compress layer's generation stream
has no cross-attention to the raw context, so history reaches the generation window only
through ``context_zip`` (the hidden and restore layers' cross-attention). Between slides
the cache then holds only ``w_oh``-sized zip K/V and the ``w_og`` window K/V: its size does
not depend on N. Every ``w_og`` tokens the context side is re-synchronised from the whole
sequence (one O(N) step); every other step is O(1).

Choice where the abstract is silent (ours): the compress layer's generation stream keeps
its causal self-attention inside the window; the context stream is unchanged, so the two
models have the same parameters and the same training graph apart from that one edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cir.experts.tlinformer import TLinFormer, TLinFormerConfig


@dataclass
class TConstFormerConfig(TLinFormerConfig):
    """Same fields and presets as :class:`TLinFormerConfig`."""

    PRESETS: ClassVar[dict[str, dict]] = TLinFormerConfig.PRESETS


class TConstFormer(TLinFormer):
    kind = "tconstformer"
    config_class = TConstFormerConfig
    compress_cross: ClassVar[bool] = False
