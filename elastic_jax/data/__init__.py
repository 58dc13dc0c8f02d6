"""Training data: sources (synthetic, the reasoning task, jsonl / parquet text with a local
tokenizer.json, in-memory arrays) and grain packing into checkpointable [B, L] batches with
segment ids. See `pipeline.py`."""
from .config import DataConfig
from .pipeline import (BatchStream, DataStats, TokenDataset, check_vocab, load_documents, make_dataset,
                       split_long, synthetic_documents)

__all__ = ["DataConfig", "BatchStream", "DataStats", "TokenDataset", "check_vocab", "load_documents",
           "make_dataset", "split_long", "synthetic_documents"]
