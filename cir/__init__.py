"""compression-routing: route text to domain experts by reconstruction error.

Sub-packages (installed from the repository's top-level folders):
``cir.data`` (sources, tokenizer, chunk shards), ``cir.compressor`` (the Transformer
autoencoder), ``cir.experts`` (TLinFormer / TConstFormer / Transformer LMs),
``cir.router`` (registry, routing, mounting), ``cir.cli`` (``route-cli``).
"""

__version__ = "0.1.0"
