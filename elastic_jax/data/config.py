"""`DataConfig`: where training documents come from and how they become packed batches."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase

# the values of `DataConfig.kind`: where documents come from
SOURCE_KINDS = ("synthetic", "task", "jsonl", "parquet", "arrays", "shards")


@dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Training data (METHOD §7).

    kind:
      "synthetic" — `num_documents` deterministic arithmetic-progression documents (learnable
                    structure, no files; ids in [3, synthetic_vocab)); for tests and smoke runs;
      "task"      — the embedded synthetic reasoning task (`elastic_jax.tasks.dataset.make_documents`,
                    `num_documents` problems of `task_split` at `task_levels`, seeded by `seed`);
      "jsonl"     — one JSON object per line, text in `text_field`, tokenized with the local
                    `tokenizer_path` (a `tokenizers` tokenizer.json);
      "parquet"   — a string column `text_field`, tokenized the same way;
      "arrays"    — in-memory token-id documents passed as `make_dataset(..., documents=[...])`;
      "shards"    — token shard folders written by `elastic-jax tokenize` (local or gs://), streamed
                    (elastic_jax/data/stream.py: host memory independent of the corpus size);
                    `path` one folder or several, mixed by `weights` (token shares, normalised;
                    None: in proportion to each folder's tokens); `tokenizer_path` (optional) the
                    parent's HF folder or tokenizer.json the shards' manifest must match;
                    `read_threads` / `read_buffer` grain read-ahead, `prefetch_workers` grain
                    worker processes (0: in-process), `cache_mb` TensorStore's cache per folder,
                    `loss_mask` adds the stored prompt mask to each batch ("loss_mask").
    `path` is a file or a tuple of files (jsonl / parquet). Malformed lines or rows (bad JSON, a
    missing or non-string text field, empty text) are skipped and counted (`on_bad_line="skip"`)
    or raise a ValueError naming file and line (`"error"`).
    `packing=True` packs documents into rows with first-fit (segment ids 1, 2, ... per row, 0 =
    padding); `False` gives one document (piece) per row, padded. Documents longer than the row
    are split into row-sized pieces in both modes (no token is dropped).
    `eos_id`: appended to every tokenized text document when set (jsonl / parquet); with shards
    (EOS appended at tokenization) the id the shards' manifest must record.
    """

    kind: str = "synthetic"
    path: str | tuple[str, ...] | None = None
    tokenizer_path: str | None = None
    text_field: str = "text"
    packing: bool = True
    packing_bins: int | None = None          # first-fit bins held open (None: the batch size)
    on_bad_line: str = "skip"
    shuffle: bool = True
    seed: int = 0
    eos_id: int | None = None
    num_documents: int = 512                  # synthetic / task
    task_split: str = "train"
    task_levels: tuple[int, ...] | None = None  # task: difficulty levels (None = the sum levels 1-4; 5-8 = query)
    synthetic_vocab: int = 256
    synthetic_len: tuple[int, int] = (8, 48)  # min, max document length (synthetic)
    weights: tuple[float, ...] | None = None  # shards: token share of each path
    read_threads: int = 8                     # shards: grain read threads
    read_buffer: int = 64                     # shards: documents read ahead
    prefetch_workers: int = 0                 # shards: grain mp_prefetch processes
    cache_mb: int = 32                        # shards: TensorStore cache per folder
    loss_mask: bool = False                   # shards: batches carry the stored loss mask

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"DataConfig.{name}={getattr(self, name)!r}: {rule}")
        if self.kind not in SOURCE_KINDS:
            bad("kind", f"must be one of {SOURCE_KINDS}")
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))
        if isinstance(self.weights, list):
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if isinstance(self.task_levels, list):
            object.__setattr__(self, "task_levels", tuple(self.task_levels))
        if self.task_levels is not None:
            from ..tasks.reasoning import check_levels
            try:
                check_levels(self.task_levels)
            except ValueError as e:
                bad("task_levels", str(e))
        if isinstance(self.synthetic_len, list):
            object.__setattr__(self, "synthetic_len", tuple(self.synthetic_len))
        if self.kind in ("jsonl", "parquet"):
            if not self.path:
                bad("path", f"kind={self.kind!r} needs a file path (or a tuple of paths)")
            if not self.tokenizer_path:
                bad("tokenizer_path", f"kind={self.kind!r} needs a local tokenizer.json")
        if self.kind == "shards":
            if not self.path:
                bad("path", "kind='shards' needs a shard folder (or a tuple of folders) from `elastic-jax tokenize`")
            if self.weights is not None and (len(self.weights) != len(self.paths)
                                             or any(not w >= 0 for w in self.weights) or not sum(self.weights) > 0):
                bad("weights", f"must be one non-negative weight per path ({len(self.paths)}), not all zero")
            for name in ("read_threads", "read_buffer", "cache_mb"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                    bad(name, "must be a positive int")
            if not isinstance(self.prefetch_workers, int) or self.prefetch_workers < 0:
                bad("prefetch_workers", "must be an int >= 0")
        elif self.weights is not None or self.loss_mask:
            bad("weights" if self.weights is not None else "loss_mask", "only applies to kind='shards'")
        if self.on_bad_line not in ("skip", "error"):
            bad("on_bad_line", "must be 'skip' or 'error'")
        if self.num_documents <= 0:
            bad("num_documents", "must be > 0")
        if self.packing_bins is not None and self.packing_bins <= 0:
            bad("packing_bins", "must be > 0 or None")
        lo, hi = self.synthetic_len
        if not (1 <= lo <= hi):
            bad("synthetic_len", "must be (min, max) with 1 <= min <= max")
        if self.synthetic_vocab < 8:
            bad("synthetic_vocab", "must be >= 8")

    @property
    def paths(self) -> tuple[str, ...]:
        if self.path is None:
            return ()
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)


def local_batch_size(seq_len: int, batch_size: int, process_count: int) -> int:
    """This host's rows of a `batch_size`-row global batch split over `process_count` hosts."""
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be > 0")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of hosts "
                         f"({process_count}) for per-host data sharding")
    return batch_size // process_count
