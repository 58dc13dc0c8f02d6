"""The token-shard format: TensorStore zarr3 arrays that stream from local disk or `gs://`.

A shard folder written by `elastic-jax tokenize` (elastic_jax/data/tokenize.py):

    OUT/manifest.json          written last: the folder is complete once it exists (tokenizer hash,
                               counts, length histogram, inputs; `read_manifest`)
    OUT/plan.json              the inputs and options (resume checks them)
    OUT/parts/NNNNN/tokens     uint32 [tokens of input NNNNN]   (zarr3, sharded, zstd)
    OUT/parts/NNNNN/loss_mask  uint8  [same] (optional: 1 = a token the loss counts)
    OUT/parts/NNNNN/lengths    int32  [documents of input NNNNN]
    OUT/parts/NNNNN/done.json  this part is complete (resume skips it)
    OUT/index                  int64 [documents, 3]: (part, offset, length) of document i
    OUT/by_length              int64 [documents, 3]: (document, length, cumulative tokens), longest
                               first, so "documents of >= n tokens" is a prefix found by binary search

Every read is a slice of an array (random access, no scan): the document index and the length order
are never loaded whole, so a reader's memory does not grow with the corpus. The layout follows
Megatron's `.bin/.idx` and Levanter's offsets store, on TensorStore so `gs://` paths work natively.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

FORMAT = "elastic_jax.tokens/1"
TOKENS_INNER, TOKENS_OUTER = 1 << 15, 1 << 22        # tokens per inner chunk / per shard file
INDEX_INNER, INDEX_OUTER = 1 << 10, 1 << 20          # index rows per inner chunk / per shard file


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def is_remote(path: str) -> bool:
    return "://" in path


def kvstore(path: str):
    """A TensorStore kvstore for a folder: `gs://bucket/dir` (and other URLs) as given, local paths
    through the file driver."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/") + "/"
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


_CONTEXT = []


def shared_context():
    """One TensorStore context for this process (so `memory://` stores, HTTP / GCS connections and
    credentials are shared by every open); readers add their own capped cache on top."""
    if not _CONTEXT:
        import tensorstore as ts
        _CONTEXT.append(ts.Context())
    return _CONTEXT[0]


def _kv(root: str):
    import tensorstore as ts
    return ts.KvStore.open(kvstore(root), context=shared_context()).result()


def read_json(root: str, name: str):
    """The JSON file `name` under `root`, or None when it does not exist."""
    r = _kv(root).read(name).result()
    if r.state != "value":
        return None
    return json.loads(bytes(r.value).decode("utf-8"))


def write_json(root: str, name: str, obj) -> None:
    """Write `name` under `root` in one put (atomic on local disk: TensorStore writes a temporary
    file and renames it; one object on GCS)."""
    _kv(root).write(name, json.dumps(obj, indent=1).encode("utf-8")).result()


def exists(root: str, name: str) -> bool:
    return _kv(root).read(name).result().state == "value"


def _spec(path: str, dtype: str, inner: int, outer: int, cols: int | None = None) -> dict:
    extra = [] if cols is None else [cols]
    return {"driver": "zarr3", "kvstore": kvstore(path),
            "metadata": {"shape": [0, *extra], "data_type": dtype,
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [outer, *extra]}},
                         "codecs": [{"name": "sharding_indexed", "configuration": {
                             "chunk_shape": [inner, *extra],
                             "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                        {"name": "zstd", "configuration": {"level": 3}}]}}]}}


def create_array(path: str, dtype: str, *, inner: int, outer: int, cols: int | None = None):
    import tensorstore as ts
    return ts.open(_spec(path, dtype, inner, outer, cols), create=True, delete_existing=True,
                   context=shared_context()).result()


def open_array(path: str, context=None):
    import tensorstore as ts
    return ts.open({"driver": "zarr3", "kvstore": kvstore(path)}, open=True,
                   context=shared_context() if context is None else context).result()


class Appender:
    """Append rows to a 1-D (or [n, cols]) zarr3 array, flushing whole shard files (`outer` rows)
    so each shard file is written once; memory: one shard's rows."""

    def __init__(self, path: str, dtype: str, *, inner: int, outer: int, cols: int | None = None):
        self.array = create_array(path, dtype, inner=inner, outer=outer, cols=cols)
        self.dtype, self.outer, self.cols = np.dtype(dtype), outer, cols
        self.written, self.buf, self.buffered = 0, [], 0

    def append(self, rows) -> None:
        rows = np.asarray(rows, self.dtype)
        self.buf.append(rows)
        self.buffered += rows.shape[0]
        if self.buffered >= self.outer:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buf:
            return
        data = np.concatenate(self.buf)
        n = data.shape[0] if final else (data.shape[0] // self.outer) * self.outer
        if n:
            end = self.written + n
            self.array = self.array.resize(exclusive_max=[end, *([] if self.cols is None else [self.cols])],
                                           resize_metadata_only=True).result()
            self.array[self.written:end].write(data[:n]).result()
            self.written = end
        rest = data[n:]
        self.buf, self.buffered = ([rest] if rest.shape[0] else []), rest.shape[0]

    def close(self) -> int:
        self._flush(final=True)
        return self.written


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(root: str) -> dict:
    """The manifest of a complete shard folder; ValueError naming the folder otherwise."""
    try:
        m = read_json(root, "manifest.json")
    except Exception as e:  # tensorstore: bad URL, no credentials, ...
        raise ValueError(f"{root}: cannot read the token shards ({e})") from e
    if m is None:
        partial = read_json(root, "plan.json") is not None
        raise ValueError(f"{root}: no manifest.json; " + (
            "the tokenization did not finish (rerun the same `elastic-jax tokenize` command to resume)"
            if partial else "not a token shard folder (write one with `elastic-jax tokenize`)"))
    if m.get("format") != FORMAT:
        raise ValueError(f"{root}: manifest format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def check_manifest(root: str, manifest: dict, vocab_size: int, tokenizer_dir: str | None = None) -> None:
    """ValueError when the shards cannot feed this model: a token id beyond `vocab_size`, or a
    tokenizer (tokenizer.json) other than the one in `tokenizer_dir` (the parent's HF folder, or its
    tokenizer.json)."""
    top = int(manifest["max_token_id"])
    if top >= vocab_size:
        raise ValueError(f"{root}: token id {top} is outside the model vocabulary [0, {vocab_size}); the shards "
                         f"were written with another tokenizer (manifest tokenizer vocab_size "
                         f"{manifest['tokenizer'].get('vocab_size')})")
    if tokenizer_dir is None:
        return
    tpath = os.fspath(tokenizer_dir)
    if os.path.isdir(tpath):
        tpath = os.path.join(tpath, "tokenizer.json")
    if not os.path.isfile(tpath):
        raise ValueError(f"{tokenizer_dir}: no tokenizer.json to check the token shards {root} against")
    have, want = manifest["tokenizer"]["sha256"], sha256_file(tpath)
    if have != want:
        raise ValueError(f"{root}: tokenized with another tokenizer.json than {tokenizer_dir}'s (sha256 "
                         f"{have[:12]}... vs {want[:12]}...); re-run `elastic-jax tokenize --tokenizer "
                         f"{tokenizer_dir}`")


class ShardReader:
    """Random access to one shard folder: document `i` (int32 tokens, optional loss mask), the
    number and tokens of documents of at least n tokens (binary search over `by_length`).
    Picklable (reopens its arrays in each process); TensorStore's cache is capped at `cache_mb`."""

    def __init__(self, root: str, cache_mb: int = 32):
        self.root, self.cache_mb = os.fspath(root), cache_mb
        self.manifest = read_manifest(self.root)
        self.num_docs = int(self.manifest["documents"])
        self.num_tokens = int(self.manifest["tokens"])
        self.has_mask = bool(self.manifest.get("loss_mask"))
        self._arrays = None

    def __getstate__(self):
        return {"root": self.root, "cache_mb": self.cache_mb, "manifest": self.manifest}

    def __setstate__(self, s):
        self.root, self.cache_mb, self.manifest = s["root"], s["cache_mb"], s["manifest"]
        self.num_docs, self.num_tokens = int(self.manifest["documents"]), int(self.manifest["tokens"])
        self.has_mask, self._arrays = bool(self.manifest.get("loss_mask")), None

    def _open(self):
        if self._arrays is None:
            import tensorstore as ts
            ctx = ts.Context({"cache_pool": {"total_bytes_limit": int(self.cache_mb) << 20}}, shared_context())
            parts = self.manifest["parts"]
            self._arrays = {
                "ctx": ctx, "index": open_array(join(self.root, "index"), ctx),
                "by_length": open_array(join(self.root, "by_length"), ctx),
                "tokens": [None] * len(parts), "mask": [None] * len(parts)}
        return self._arrays

    def _part(self, kind: str, p: int):
        a = self._open()
        if a[kind][p] is None:
            name = "tokens" if kind == "tokens" else "loss_mask"
            a[kind][p] = open_array(join(self.root, self.manifest["parts"][p], name), a["ctx"])
        return a[kind][p]

    def locate(self, doc: int) -> tuple[int, int, int]:
        p, off, n = (int(v) for v in self._open()["index"][doc].read().result())
        return p, off, n

    def document(self, doc: int, with_mask: bool = False):
        p, off, n = self.locate(doc)
        tokens = self._part("tokens", p)[off:off + n].read().result().astype(np.int32)
        if not with_mask:
            return tokens
        if not self.has_mask:
            return tokens, np.ones_like(tokens)
        return tokens, self._part("mask", p)[off:off + n].read().result().astype(np.int32)

    def longest_first(self, rank: int) -> tuple[int, int, int]:
        """(document, length, cumulative tokens) of the `rank`-th longest document."""
        d, n, c = (int(v) for v in self._open()["by_length"][rank].read().result())
        return d, n, c

    def count_at_least(self, min_len: int) -> int:
        """How many documents have >= `min_len` tokens (binary search over the length order)."""
        lo, hi = 0, self.num_docs                    # lengths[rank] descending; first rank below min_len
        while lo < hi:
            mid = (lo + hi) // 2
            if self.longest_first(mid)[1] >= min_len:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def tokens_of_longest(self, count: int) -> int:
        return 0 if count == 0 else self.longest_first(count - 1)[2]
