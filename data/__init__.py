"""Data layer: document sources, train/val/test split, BPE tokenizer, chunk shards."""
