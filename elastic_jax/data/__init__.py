"""Training data: sources (synthetic, the reasoning task, jsonl / parquet text with a local
tokenizer.json, in-memory arrays) packed by grain into checkpointable [B, L] batches with segment
ids (`pipeline.py`); token shards written by `elastic-jax tokenize` (`tokenize.py`, `store.py`)
and streamed in constant host memory (`stream.py`)."""
from .config import DataConfig
from .pipeline import (BatchStream, DataStats, DocumentDataset, ShardDataset, TokenDataset, check_vocab,
                       load_documents, make_dataset, split_long, synthetic_documents)

__all__ = ["DataConfig", "BatchStream", "DataStats", "DocumentDataset", "ShardDataset", "TokenDataset",
           "check_vocab", "load_documents", "make_dataset", "split_long", "synthetic_documents"]
