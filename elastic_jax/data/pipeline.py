"""Documents -> packed, per-host-sharded, checkpointable batches (grain). Token shards written by
`elastic-jax tokenize` stream instead (`DataConfig(kind="shards")`, stream.py).

    ds = make_dataset(DataConfig(kind="jsonl", path="train.jsonl", tokenizer_path="tokenizer.json"),
                      vocab_size=cfg.vocab_size)
    stream = ds.batches(seq_len=256, batch_size=8, epoch_seed=0)   # this host's rows
    batch = next(stream)          # {"tokens": int32 [b, L], "segment_ids": int32 [b, L]}
    state = stream.get_state()    # JSON-able; stream.set_state(state) resumes exactly

`segment_ids` numbers the documents of a row 1, 2, ... (0 = padding); `ej.forward(...,
segment_ids=)` resets attention, the causal conv and the SSD state at every boundary (the SSD
`seq_idx`), so packed documents never see each other.

Per-host sharding: with `process_count` P > 1, host p reads documents p, p+P, p+2P, ... (after
the shuffle) and produces `batch_size // P` rows; `jax.make_array_from_process_local_data`
assembles the global batch (elastic_jax/train/loop.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import grain
import numpy as np

from .config import DataConfig, local_batch_size


@dataclasses.dataclass
class DataStats:
    """What loading found: documents kept, tokens, malformed lines / rows skipped (with examples)."""

    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    bad_examples: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- sources
def synthetic_documents(cfg: DataConfig) -> list[np.ndarray]:
    """Arithmetic progressions mod (V-3), offset past the special ids 0 (pad), 1 (bos), 2 (eos):
    [1, a, a+k, a+2k, ..., 2]. Deterministic in `cfg.seed`; a model can learn to continue them."""
    rng = np.random.default_rng(cfg.seed)
    V = cfg.synthetic_vocab
    lo, hi = cfg.synthetic_len
    docs = []
    for _ in range(cfg.num_documents):
        n = int(rng.integers(lo, hi + 1))
        a, k = int(rng.integers(0, V - 3)), int(rng.integers(1, 8))
        body = (a + k * np.arange(max(n - 2, 1))) % (V - 3) + 3
        docs.append(np.concatenate([[1], body, [2]]).astype(np.int32)[:max(n, 1)])
    return docs


def task_documents(cfg: DataConfig) -> list[np.ndarray]:
    """The embedded reasoning task's documents (prompt, trace, answer, eos) as token ids."""
    from ..tasks.dataset import make_documents
    return [np.asarray(d, np.int32) for d in make_documents(cfg.seed, cfg.num_documents, cfg.task_split,
                                                                    cfg.task_levels)]


def _load_tokenizer(path: str):
    from tokenizers import Tokenizer
    if not os.path.isfile(path):
        raise ValueError(f"DataConfig.tokenizer_path={path!r}: no such file (a local tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"DataConfig.tokenizer_path={path!r}: not a tokenizers tokenizer.json ({e})") from e


def _bad(cfg: DataConfig, stats: DataStats, where: str, why: str):
    if cfg.on_bad_line == "error":
        raise ValueError(f"{where}: {why} (DataConfig.on_bad_line='error'; set 'skip' to skip and count)")
    stats.bad_lines += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(f"{where}: {why}")


def _check_data_file(path: str, kind: str) -> None:
    """A text source's path is an existing file; a folder or a missing path: ValueError saying which."""
    if os.path.isdir(path):
        raise ValueError(f"DataConfig.path: {path!r} is a folder; kind={kind!r} reads files (a folder of "
                         "token shards made by `elastic-jax tokenize` is kind='shards')")
    if not os.path.isfile(path):
        raise ValueError(f"DataConfig.path: {path!r} does not exist")


def _texts_jsonl(cfg: DataConfig, stats: DataStats):
    for path in cfg.paths:
        _check_data_file(path, cfg.kind)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    _bad(cfg, stats, where, f"malformed JSON ({e.__class__.__name__}: {e})")
                    continue
                if not isinstance(obj, dict) or cfg.text_field not in obj:
                    _bad(cfg, stats, where, f"no {cfg.text_field!r} field (DataConfig.text_field)")
                    continue
                text = obj[cfg.text_field]
                if not isinstance(text, str) or not text:
                    _bad(cfg, stats, where, f"{cfg.text_field!r} must be a non-empty string, got "
                         f"{type(text).__name__}")
                    continue
                yield text


def _texts_parquet(cfg: DataConfig, stats: DataStats):
    import pyarrow
    import pyarrow.parquet as pq
    for path in cfg.paths:
        _check_data_file(path, cfg.kind)
        try:
            pf = pq.ParquetFile(path)
        except (pyarrow.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        if cfg.text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {cfg.text_field!r} (DataConfig.text_field); columns: "
                             f"{pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(columns=[cfg.text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str) or not text:
                    _bad(cfg, stats, f"{path}: row {row}", f"{cfg.text_field!r} must be a non-empty "
                         f"string, got {type(text).__name__}")
                    continue
                yield text


def tokenize_texts(texts, tokenizer, eos_id: int | None, batch: int = 256) -> list[np.ndarray]:
    out, buf = [], []

    def flush():
        for enc in tokenizer.encode_batch(buf, add_special_tokens=True):
            ids = enc.ids + ([eos_id] if eos_id is not None else [])
            if ids:
                out.append(np.asarray(ids, np.int32))
        buf.clear()

    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return out


def load_documents(cfg: DataConfig, documents: Sequence | None = None) -> tuple[list[np.ndarray], DataStats]:
    """All documents of `cfg` as int32 arrays, and what loading found."""
    stats = DataStats()
    if cfg.kind == "arrays":
        if documents is None:
            raise ValueError("DataConfig.kind='arrays' needs documents=[token-id lists] "
                             "(make_dataset(cfg, vocab_size, documents=...))")
        docs = []
        for i, d in enumerate(documents):
            a = np.asarray(d)
            if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
                raise ValueError(f"documents[{i}]: must be a 1-D sequence of integer token ids, got "
                                 f"shape {a.shape} dtype {a.dtype}")
            if a.size:
                docs.append(a.astype(np.int64))
    elif documents is not None:
        raise ValueError(f"documents= is only used with DataConfig.kind='arrays' (kind={cfg.kind!r})")
    elif cfg.kind == "synthetic":
        docs = synthetic_documents(cfg)
    elif cfg.kind == "task":
        docs = task_documents(cfg)
    else:
        for path in cfg.paths:
            _check_data_file(path, cfg.kind)
        tok = _load_tokenizer(cfg.tokenizer_path)
        texts = _texts_jsonl(cfg, stats) if cfg.kind == "jsonl" else _texts_parquet(cfg, stats)
        docs = tokenize_texts(texts, tok, cfg.eos_id)
    if not docs:
        raise ValueError(f"DataConfig(kind={cfg.kind!r}, path={cfg.path!r}): no usable documents "
                         f"({stats.bad_lines} malformed lines skipped)")
    stats.documents = len(docs)
    stats.tokens = int(sum(d.size for d in docs))
    return docs, stats


def check_vocab(docs: Sequence[np.ndarray], vocab_size: int) -> None:
    """ValueError naming the first document holding a token id outside [0, vocab_size)."""
    for i, d in enumerate(docs):
        if d.size and (d.min() < 0 or d.max() >= vocab_size):
            bad = d[(d < 0) | (d >= vocab_size)]
            raise ValueError(f"document {i} holds token id {int(bad[0])} outside the model vocabulary "
                             f"[0, vocab_size={vocab_size}) ({bad.size} such ids in that document); "
                             "is the tokenizer the one the model was built for?")


def split_long(docs: Sequence[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Documents longer than `seq_len` become consecutive `seq_len` pieces (nothing dropped)."""
    out = []
    for d in docs:
        for s in range(0, d.size, seq_len):
            out.append(d[s:s + seq_len].astype(np.int32))
    return out


# --------------------------------------------------------------------------- batches
def _pad_row(seq_len: int):
    def f(d):
        n = d.size
        tokens = np.zeros((seq_len,), np.int32)
        seg = np.zeros((seq_len,), np.int32)
        tokens[:n], seg[:n] = d, 1
        return {"tokens": tokens, "segment_ids": seg}
    return f


def _as_doc(d):
    return {"tokens": d}


def _rename(b):
    return {"tokens": b["tokens"], "segment_ids": b["tokens_segment_ids"]}


class BatchStream:
    """Infinite iterator of this host's rows of packed batches; `get_state()` / `set_state()`
    are JSON-able (grain iterator state), so a checkpoint restores the exact next batch."""

    def __init__(self, docs: Sequence[np.ndarray], cfg: DataConfig, seq_len: int, batch_size: int, *,
                 epoch_seed: int = 0, process_index: int = 0, process_count: int = 1):
        self.seq_len, self.local_batch = seq_len, local_batch_size(seq_len, batch_size, process_count)
        pieces = split_long(docs, seq_len)
        ds = grain.MapDataset.source(pieces)
        if cfg.shuffle:
            ds = ds.seed(cfg.seed * 1_000_003 + epoch_seed).shuffle()
        ds = ds.repeat(None)
        if process_count > 1:
            ds = ds[process_index::process_count]
        if cfg.packing:
            it = grain.experimental.FirstFitPackIterDataset(
                ds.map(_as_doc).to_iter_dataset(), length_struct={"tokens": seq_len},
                num_packing_bins=cfg.packing_bins or self.local_batch, shuffle_bins=False)
            it = it.batch(self.local_batch, drop_remainder=True).map(_rename)
        else:
            it = ds.map(_pad_row(seq_len)).to_iter_dataset().batch(self.local_batch, drop_remainder=True)
        self._iter = iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self._iter)
        return {"tokens": np.asarray(b["tokens"], np.int32), "segment_ids": np.asarray(b["segment_ids"], np.int32)}

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


class TokenDataset:
    """What the training loop reads: `config` (a DataConfig, stored in checkpoints), `stats`
    (DataStats), `vocab_size` (checked), and `batches(seq_len, batch_size, *, epoch_seed,
    process_index, process_count, min_doc_len)` -> an iterator of this host's rows with JSON-able
    `get_state()` / `set_state()`. Two kinds: `DocumentDataset` (documents in memory) and
    `stream.ShardDataset` (token shards streamed from disk / gs://)."""

    config: DataConfig
    stats: DataStats
    vocab_size: int

    def batches(self, seq_len: int, batch_size: int, *, epoch_seed: int = 0, process_index: int | None = None,
                process_count: int | None = None, min_doc_len: int | None = None):
        raise NotImplementedError


def _hosts(process_index, process_count):
    if process_index is None or process_count is None:
        import jax
        return jax.process_index(), jax.process_count()
    return process_index, process_count


@dataclasses.dataclass
class DocumentDataset(TokenDataset):
    """Loaded, vocabulary-checked documents (in memory) plus the config that shapes them into batches.
    `batches(seq_len, batch_size, epoch_seed=...)` opens a `BatchStream` (one per curriculum stage)."""

    config: DataConfig
    documents: list
    stats: DataStats
    vocab_size: int

    def batches(self, seq_len: int, batch_size: int, *, epoch_seed: int = 0, process_index: int | None = None,
                process_count: int | None = None, min_doc_len: int | None = None) -> BatchStream:
        """`min_doc_len`: only documents of at least that many tokens (a long-context stage trains
        on documents longer than the previous stage's rows); ValueError if none is that long."""
        process_index, process_count = _hosts(process_index, process_count)
        docs = self.documents
        if min_doc_len is not None:
            docs = [d for d in docs if d.size >= min_doc_len]
            if not docs:
                longest = max((d.size for d in self.documents), default=0)
                raise ValueError(f"no document has >= {min_doc_len} tokens (min_doc_len); the longest of "
                                 f"{len(self.documents)} has {longest}")
        return BatchStream(docs, self.config, seq_len, batch_size, epoch_seed=epoch_seed,
                           process_index=process_index, process_count=process_count)


class ShardDataset(TokenDataset):
    """Token shard folders (`DataConfig(kind="shards")`), streamed: nothing but the manifests is
    held in memory; `batches` opens a `stream.ShardStream`."""

    def __init__(self, config: DataConfig, vocab_size: int, check_tokenizer: str | None = None):
        from .stream import open_shards
        self.config, self.vocab_size = config, vocab_size
        self.readers, self.weights = open_shards(config, vocab_size, check_tokenizer)
        self.stats = DataStats(documents=sum(r.num_docs for r in self.readers),
                               tokens=sum(r.num_tokens for r in self.readers),
                               bad_lines=sum(int(r.manifest["bad_records"]) for r in self.readers),
                               bad_examples=[e for r in self.readers for e in r.manifest["bad_examples"]][:5])

    def batches(self, seq_len: int, batch_size: int, *, epoch_seed: int = 0, process_index: int | None = None,
                process_count: int | None = None, min_doc_len: int | None = None):
        from .stream import ShardStream
        process_index, process_count = _hosts(process_index, process_count)
        return ShardStream(self.readers, self.weights, self.config, seq_len, batch_size, epoch_seed=epoch_seed,
                           process_index=process_index, process_count=process_count, min_doc_len=min_doc_len)

    def host_batches(self, seq_len: int, batch_size: int, *, rows: slice, microbatches: int, epoch_seed: int = 0,
                     min_doc_len: int | None = None) -> "HostRows":
        """The training loop's per-host source (`train.hostdata`): this host reads only the documents
        of its block of micro-batch rows `rows` (hosts holding the same rows read the same ones),
        [microbatches, len(rows), seq_len] per step."""
        per_microbatch, n = batch_size // microbatches, rows.stop - rows.start
        if n <= 0 or per_microbatch % n or rows.start % n:
            raise ValueError(f"rows {rows.start}:{rows.stop} are not one of equal blocks of the {per_microbatch} "
                             "rows of a micro-batch")
        stream = self.batches(seq_len, batch_size, epoch_seed=epoch_seed, process_index=rows.start // n,
                              process_count=per_microbatch // n, min_doc_len=min_doc_len)
        return HostRows(stream, microbatches)


class HostRows:
    """A per-host stream's [microbatches * rows, L] batches as [microbatches, rows, L]; its state is
    this host's own (`state_scope = "host"`: it resumes on the same process count)."""

    state_scope = "host"

    def __init__(self, stream, microbatches: int):
        self.stream, self.microbatches = stream, microbatches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self.stream)
        return {k: np.asarray(b[k], np.int32).reshape(self.microbatches, -1, b[k].shape[-1])
                for k in ("tokens", "segment_ids")}

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state) -> None:
        self.stream.set_state(state)


def make_dataset(cfg: DataConfig, vocab_size: int, documents: Sequence | None = None) -> TokenDataset:
    """Load and check the documents of `cfg` (token ids beyond `vocab_size` -> ValueError); token
    shards (kind="shards") are opened, checked by their manifests, and streamed."""
    if cfg.kind == "shards":
        if documents is not None:
            raise ValueError("documents= is only used with DataConfig.kind='arrays' (kind='shards')")
        return ShardDataset(cfg, vocab_size)
    docs, stats = load_documents(cfg, documents)
    check_vocab(docs, vocab_size)
    docs = [d.astype(np.int32) for d in docs]
    return DocumentDataset(config=cfg, documents=docs, stats=stats, vocab_size=vocab_size)
