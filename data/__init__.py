"""Data layer: document sources, train/val/test split, BPE tokenizer, chunk shards.

``iter_documents(spec)`` streams documents; ``build_dataset(out, spec)`` tokenises them
into fixed-length chunk shards; ``open_dataset(name, split)`` reads a split back as
``(ids [B, T], mask [B, T])`` batches; ``chunk_text`` / ``iter_text_chunks`` chunk
arbitrary text for scoring.
"""

from cir.data.chunking import DEFAULT_SEQ_LEN, chunk_ids, chunk_text, iter_text_chunks
from cir.data.shards import (
    ChunkDataset,
    ConcatChunks,
    DocumentIndex,
    RandomChunks,
    build_dataset,
    list_datasets,
    open_dataset,
    resolve_dataset,
)
from cir.data.sources import SOURCES, BadFileError, Document, SkipStats, iter_documents
from cir.data.split import SPLITS, split_of
from cir.data.tokenizer import (
    EOS_ID,
    PAD_ID,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_SEQ_LEN", "EOS_ID", "PAD_ID", "SOURCES", "SPLITS", "BadFileError", "ChunkDataset",
    "ConcatChunks", "Document", "DocumentIndex", "RandomChunks", "SkipStats", "build_dataset", "chunk_ids", "chunk_text",
    "iter_documents", "iter_text_chunks", "list_datasets", "load_tokenizer", "open_dataset",
    "resolve_dataset", "save_tokenizer", "split_of", "tokenizer_hash", "train_tokenizer",
]
