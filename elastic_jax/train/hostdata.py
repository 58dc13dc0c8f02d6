"""Per-host batches: how the training loop gets this process's rows of each step's global batch.

The data-source interface of the loop (one source per curriculum stage), what a streaming
per-host reader plugs in as:

    src = open_stage_rows(dataset, stage, stage_index, rows)   # rows: this host's micro-batch rows
    local = next(src)        # {"tokens", "segment_ids"}: int32 [microbatches, rows.stop - rows.start, seq_len]
    src.get_state()          # JSON-able; saved in every checkpoint ("data_states" of its meta)
    src.set_state(state)     # restores the exact next batch
    src.state_scope          # "global": the same state on every host, restorable on any process count
                             # "host":   one state per process, restorable only on the same count

`rows` is the slice of the micro-batch dimension that this process's devices hold under the batch
sharding (`host_rows`); the loop turns the local rows into the global array with
`jax.make_array_from_process_local_data` (`to_global`). A dataset with a method
`host_batches(seq_len, batch_size, *, rows, microbatches, epoch_seed, min_doc_len)` returning
such a source is read per host (each host reads only its own rows; state_scope "host"). Any other
`TokenDataset` (documents in memory on every host) is read through `GlobalRows`: every host
produces the same global batch and keeps its rows, so the batches — and hence the loss curve —
are the same on every process count and mesh, and the data state resumes on any of them.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding


def host_rows(sharding: NamedSharding, global_shape: tuple) -> slice:
    """The rows of axis 1 (the micro-batch rows of a [M, rows, L] batch) that this process's
    devices hold; ValueError if they are not one contiguous block (a mesh whose batch axes
    interleave hosts)."""
    spans = sorted({(s[1].start or 0, global_shape[1] if s[1].stop is None else s[1].stop)
                    for s in sharding.addressable_devices_indices_map(tuple(global_shape)).values()})
    lo, hi = spans[0][0], max(b for _, b in spans)
    end = lo
    for a, b in spans:
        if a > end:
            raise ValueError(f"this process's devices hold batch rows {spans}: not one contiguous block; order the "
                             "mesh so that each host's devices are adjacent on the batch axes")
        end = max(end, b)
    return slice(lo, hi)


def to_global(local: np.ndarray, sharding: NamedSharding, global_shape: tuple) -> jax.Array:
    """The global batch array from this process's rows (`host_rows` of it); one process: a
    sharded `device_put`."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


class GlobalRows:
    """The global batch stream of an in-memory dataset, cut to this host's rows (see module
    docstring). `stream`: yields {"tokens", "segment_ids"} [batch_size, L] global batches."""

    state_scope = "global"

    def __init__(self, stream, microbatches: int, rows: slice):
        self.stream, self.M, self.rows = stream, microbatches, rows

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self.stream)
        out = {}
        for k in ("tokens", "segment_ids"):
            g = np.asarray(b[k], np.int32)
            out[k] = g.reshape(self.M, g.shape[0] // self.M, g.shape[1])[:, self.rows]
        return out

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state) -> None:
        self.stream.set_state(state)


def open_stage_rows(dataset, stage, stage_index: int, microbatches: int, rows: slice):
    """This host's source of rows for one curriculum stage (module docstring)."""
    if hasattr(dataset, "host_batches"):
        return dataset.host_batches(stage.seq_len, stage.batch_size, rows=rows, microbatches=microbatches,
                                    epoch_seed=stage_index, min_doc_len=stage.min_doc_len)
    stream = dataset.batches(stage.seq_len, stage.batch_size, epoch_seed=stage_index, process_index=0,
                             process_count=1, min_doc_len=stage.min_doc_len)
    return GlobalRows(stream, microbatches, rows)


def restore_data_state(src, saved: dict | None, stage_index: int) -> None:
    """Put `src` (the stage's source) at the position a checkpoint's `data_states` recorded:
    nothing when `saved` is None, of another stage, or a stage-end checkpoint (the next stage
    starts afresh: `hosts` is None). A per-host state needs the same process count."""
    if saved is None or saved.get("stage") != stage_index or saved.get("hosts") is None:
        return
    hosts = saved["hosts"]
    if getattr(src, "state_scope", "host") == "global" and saved.get("scope") == "global":
        src.set_state(hosts[0])
        return
    if len(hosts) != jax.process_count():
        raise ValueError(f"the checkpoint holds the data position of {len(hosts)} host(s) but this job has "
                         f"{jax.process_count()}; a per-host data source resumes only on the same process count")
    src.set_state(hosts[jax.process_index()])
