"""Training batches streamed from token shards (store.py) with grain, in memory that does not grow
with the corpus (METHOD §7: the 70/30 reasoning / pretraining mixture).

    ds = make_dataset(DataConfig(kind="shards", path=("tok/reasoning", "tok/pretraining"),
                                 weights=(0.7, 0.3), tokenizer_path="/ckpt/parent"), vocab_size)
    stream = ds.batches(seq_len=8192, batch_size=1536, min_doc_len=None)   # this host's rows
    next(stream); stream.get_state(); stream.set_state(state)             # exact resume

The pipeline per stage: each shard folder is a grain `MapDataset` over its documents (only those of
>= `min_doc_len` tokens: a prefix of the folder's length order, found by binary search), shuffled and
repeated; the folders are mixed by `weights` (token shares: each folder's document weight is its
share over its mean selected document length); host p of P takes records p, p+P, ... of the mix
(so the hosts' records are disjoint and together are the one-process stream); `read_threads`
threads read ahead; documents longer than a row are split into row-sized pieces; first-fit packing
into rows; `prefetch_workers` processes (grain `mp_prefetch`) optionally run all of it ahead. The
iterator state is grain's (indices only), so a checkpoint resumes at the exact next batch.
"""
from __future__ import annotations

import grain
import numpy as np

from .config import DataConfig, local_batch_size
from .store import ShardReader, check_manifest


class _Documents:
    """grain data source: record r -> the tokens of document r of a shard folder, or of its r-th
    longest document when `by_length` (the documents of >= min_doc_len tokens are a prefix)."""

    def __init__(self, reader: ShardReader, count: int, by_length: bool, with_mask: bool):
        self.reader, self.count, self.by_length, self.with_mask = reader, count, by_length, with_mask

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, r: int):
        doc = self.reader.longest_first(r)[0] if self.by_length else int(r)
        if self.with_mask:
            tokens, mask = self.reader.document(doc, with_mask=True)
            return {"tokens": tokens, "loss_mask": mask}
        return {"tokens": self.reader.document(doc)}


class _SplitLong(grain.experimental.FlatMapTransform):
    """A document longer than a row -> consecutive row-sized pieces (no token dropped)."""

    def __init__(self, seq_len: int, max_fan_out: int):
        self.seq_len, self.max_fan_out = seq_len, max_fan_out

    def flat_map(self, doc):
        n = doc["tokens"].size
        return [{k: v[s:s + self.seq_len] for k, v in doc.items()} for s in range(0, n, self.seq_len)]


def _pad_row(seq_len: int):
    def f(d):
        out = {}
        n = d["tokens"].size
        for k, v in d.items():
            row = np.zeros((seq_len,), np.int32)
            row[:n] = v
            out[k] = row
        seg = np.zeros((seq_len,), np.int32)
        seg[:n] = 1
        out["segment_ids"] = seg
        return out
    return f


def _packed(b):
    out = {"tokens": b["tokens"], "segment_ids": b["tokens_segment_ids"]}
    if "loss_mask" in b:
        out["loss_mask"] = b["loss_mask"]
    return out


class ShardStream:
    """Infinite iterator of this host's rows ({"tokens", "segment_ids"[, "loss_mask"]}: int32
    [batch_size // process_count, seq_len]); `get_state()` / `set_state()` are JSON-able."""

    def __init__(self, readers, weights, cfg: DataConfig, seq_len: int, batch_size: int, *, epoch_seed: int = 0,
                 process_index: int = 0, process_count: int = 1, min_doc_len: int | None = None):
        self.seq_len, self.local_batch = seq_len, local_batch_size(seq_len, batch_size, process_count)
        comps, doc_weights, longest = [], [], 1
        for k, (reader, w) in enumerate(zip(readers, weights)):
            count = reader.num_docs if min_doc_len is None else reader.count_at_least(min_doc_len)
            if count == 0:
                raise ValueError(f"{reader.root}: no document has >= {min_doc_len} tokens (min_doc_len); the "
                                 f"longest of {reader.num_docs} has {reader.longest_first(0)[1]}")
            tokens = reader.num_tokens if min_doc_len is None else reader.tokens_of_longest(count)
            longest = max(longest, reader.longest_first(0)[1])
            src = _Documents(reader, count, min_doc_len is not None, cfg.loss_mask)
            ds = grain.MapDataset.source(src)
            if cfg.shuffle:
                ds = ds.seed(cfg.seed * 1_000_003 + epoch_seed * 1009 + k).shuffle()
            comps.append(ds.repeat(None))
            doc_weights.append(w * count / tokens)     # token share / mean document length
        ds = comps[0] if len(comps) == 1 else grain.MapDataset.mix(comps, doc_weights)
        if process_count > 1:
            ds = ds[process_index::process_count]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer))
        fan_out = -(-longest // seq_len)
        it = grain.experimental.FlatMapIterDataset(it, _SplitLong(seq_len, fan_out))
        if cfg.packing:
            length = {"tokens": seq_len, **({"loss_mask": seq_len} if cfg.loss_mask else {})}
            it = grain.experimental.FirstFitPackIterDataset(
                it, length_struct=length, num_packing_bins=cfg.packing_bins or self.local_batch, shuffle_bins=False)
            it = it.batch(self.local_batch, drop_remainder=True).map(_packed)
        else:
            it = it.map(_pad_row(seq_len)).batch(self.local_batch, drop_remainder=True)
        if cfg.prefetch_workers:
            from absl import flags          # grain's worker processes read its absl flags (defaults
            if not flags.FLAGS.is_parsed():  # here: this is not an absl app)
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.prefetch_workers))
        self._iter = iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: np.asarray(v, np.int32) for k, v in next(self._iter).items()}

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


def open_shards(cfg: DataConfig, vocab_size: int, check_tokenizer: str | None = None):
    """The readers of `cfg.paths` and their token weights, each checked against the model's
    vocabulary and (when given: `check_tokenizer` or `cfg.tokenizer_path`) the tokenizer folder."""
    readers = [ShardReader(p, cache_mb=cfg.cache_mb) for p in cfg.paths]
    tok = check_tokenizer or cfg.tokenizer_path
    for r in readers:
        check_manifest(r.root, r.manifest, vocab_size, tok)
        eos = r.manifest["tokenizer"].get("eos_id")
        if cfg.eos_id is not None and (eos != cfg.eos_id or r.manifest["options"].get("eos") is False):
            raise ValueError(f"{r.root}: DataConfig.eos_id={cfg.eos_id} but the shards' text documents end with "
                             + ("no EOS (tokenized with --no-eos)" if eos == cfg.eos_id else f"EOS id {eos}"))
        if cfg.loss_mask and not r.has_mask:
            raise ValueError(f"{r.root}: DataConfig.loss_mask=True but these shards have no loss mask "
                             "(tokenize with --loss-mask)")
    if cfg.weights is None:
        weights = [r.num_tokens for r in readers]
    else:
        weights = list(cfg.weights)
    total = float(sum(weights))
    return readers, [w / total for w in weights]
