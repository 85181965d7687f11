"""Expert causal LMs: TLinFormer, TConstFormer and the standard Transformer baseline.

- ``tlinformer`` / ``tconstformer`` / ``transformer``: one architecture per module, each
  with its ``Config`` (presets ``debug``, ``small``, ``paper-41m``) and cached decoding
  (``new_cache``, ``prefill``, ``step``);
- ``generate``: sampling for any of them; ``train``: ``train_expert`` on the shared
  trainer; ``evaluate``: per-chunk perplexity; ``bench``: the decode benchmark.
"""

from cir.experts.generate import generate
from cir.experts.registry import ARCHS, build_model

__all__ = ["ARCHS", "build_model", "generate"]
