"""The Transformer autoencoder that compresses 512 tokens into 8 latents (seed 001).

- ``model``: ``CompressorConfig`` (presets ``debug``, ``small``, ``base``, ``paper``) and
  ``Compressor`` (``encode``, ``decode``, ``score`` -> per-chunk loss and TRA);
- ``train``: ``train_compressor`` on the shared trainer; ``evaluate``: the ID / semi-OOD /
  full-OOD TRA table and AUROC by reconstruction loss; ``bench``: scoring throughput.
"""

from cir.compressor.model import ChunkScores, Compressor, CompressorConfig

__all__ = ["ChunkScores", "Compressor", "CompressorConfig"]
