"""Orbax checkpoints of a training run.

One `ocp.CheckpointManager` under `<out_dir>/checkpoints` with two items per step:
  "state": params, router, optimizer state, the base RNG key and the step (sharded arrays;
           restored onto whatever mesh the resuming run uses);
  "meta":  JSON — model / elastic / train / data configs, the data iterator state of every host,
           curriculum stage, tokens seen, and an opaque caller blob (e.g. the importance ranking
           and permutation the parent was prepared with).
Saves are asynchronous (`wait()` before reading), `keep` most recent are kept, and each save is
atomic: orbax writes into a temporary folder and renames it when complete, so a save interrupted
by a crash is never listed. A step counts only when complete: its commit marker and every item's
metadata are present (`complete_steps()`, so an empty or half-copied step folder is not a step).
`restore_newest` tries the complete steps newest first; one that fails to restore is reported
(a warning naming step and path) and the next older one is tried; if none restores,
`CheckpointCorrupt` lists why. `params_fingerprint` is the teacher's identity resume compares.

Integrity: every save records a checksum of each saved array in the meta item ("checksums": two
exact uint32 sums of the array's bits, computed on device, the same on every mesh), and every
restore recomputes them; a mismatch makes the step a damaged one (`CheckpointCorrupt` naming the
array and the step folder it lives in), so `restore_newest` falls back to the previous step with
a warning.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .. import fileio
from ..errors import CheckpointCorrupt, CheckpointMismatch
from ..finite import check_finite
from ..sharding import host_value
from ..config import MOVED_TO_POLICY
from .config import RESUMABLE_FIELDS

# what a complete step folder holds: orbax's commit marker and each item's metadata file
_STEP_MARKER = "_CHECKPOINT_METADATA"
_ITEM_MARKERS = {"state": "_METADATA", "meta": "metadata"}


def _leaf_digest(x):
    """Two order-independent uint32 sums of the leaf's bits, weighted by a hash of each element's
    index: exact integer arithmetic, so the same on every mesh / device count."""
    x = jnp.asarray(x)
    if x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = x.astype(jnp.float32).view(jnp.uint32) if jnp.issubdtype(x.dtype, jnp.floating) \
            else x.astype(jnp.uint32)
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    w = (idx * jnp.uint32(2654435761)) | jnp.uint32(1)
    return jnp.stack([jnp.sum(bits * w, dtype=jnp.uint32), jnp.sum(bits ^ w, dtype=jnp.uint32)])


_digests = jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves])


def array_checksums(tree) -> dict:
    """{key path: [sum1, sum2]} of every array of `tree` (`_leaf_digest`, on device)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    sums = host_value(jnp.stack(_digests([x for _, x in flat])))
    return {_keystr(p): [int(v) for v in s] for (p, _), s in zip(flat, sums)}


def _keystr(path) -> str:
    """A key path as orbax stores it (lists restore as dicts with string keys: the same string)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def params_fingerprint(tree) -> str | None:
    """A short hex digest of a parameter tree (structure, shapes, dtypes and every value's bits),
    computed on device (no host copy of the weights): the teacher's identity in what resume
    compares. None for None."""
    if tree is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sums = np.asarray(jax.device_get(_digests(leaves)))
    h = hashlib.sha256(str(treedef).encode())
    for x, s in zip(leaves, sums):
        h.update(f"{tuple(x.shape)}{jnp.dtype(x.dtype).name}".encode())
        h.update(np.asarray(s, np.uint32).tobytes())
    return h.hexdigest()[:16]


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if (k not in a and b[k] is None) or (k not in b and a[k] is None):
                continue      # a field added later with a None default: an older run did not set it
            if k not in a or k not in b:
                out.append(f"{p}: {'<absent>' if k not in a else a[k]!r} != {'<absent>' if k not in b else b[k]!r}")
            else:
                out += _diff(a[k], b[k], p)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def comparable(configs: dict) -> dict:
    """The configs with the fields that may change on resume (mesh, logging) removed, and the model
    configs' runtime knobs that runs saved before they moved to `ComputePolicy` still hold."""
    out = dict(configs)
    if "train" in out and isinstance(out["train"], dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in RESUMABLE_FIELDS}
    for name in ("model", "teacher"):
        if isinstance(out.get(name), dict):
            out[name] = {k: v for k, v in out[name].items() if k not in MOVED_TO_POLICY}
    return out


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = fileio.resolve(directory)          # a local folder or a gs:// URL
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._quiet = _DiskFullLogFilter.install()   # background saves report a full disk by log lines
        _quiet_closed_loop_callbacks()               # a failed background write / restore leaves these

    def step_path(self, step: int) -> str:
        return fileio.join(self.directory, str(step))

    def incomplete(self, step: int) -> str | None:
        """Why the folder of `step` is not a complete checkpoint (None when it is)."""
        d = self.step_path(step)
        if not fileio.isfile(fileio.join(d, _STEP_MARKER)):
            return f"no commit marker {_STEP_MARKER}"
        for item, marker in _ITEM_MARKERS.items():
            if not fileio.isfile(fileio.join(d, item, marker)):
                return f"item {item!r} missing or incomplete (no {item}/{marker})"
        return None

    def complete_steps(self) -> list[int]:
        """The steps whose folders are complete, ascending."""
        return sorted(s for s in self.manager.all_steps() if self.incomplete(s) is None)

    def latest_step(self) -> int | None:
        """The newest complete step (None when there is none)."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        return self.complete_steps()

    def restore_newest(self, restore: Callable[[int], Any]) -> tuple[int, Any] | None:
        """(step, restore(step)) for the newest complete step that restores; None when the folder
        holds no step at all. A step that fails is reported by a warning naming it and the next
        older one is tried; `CheckpointMismatch` is not a damaged step and propagates. If every
        step fails: `CheckpointCorrupt` listing each failure."""
        listed = sorted(self.manager.all_steps(), reverse=True)
        if not listed:
            return None
        failures = []
        for step in listed:
            why = self.incomplete(step)
            if why is None:
                try:
                    return step, restore(step)
                except CheckpointMismatch:
                    raise
                except Exception as e:   # orbax / tensorstore / JSON errors of a damaged step
                    _quiet_closed_loop_callbacks()
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            failures.append(f"step {step} ({self.step_path(step)}): {why}")
            warnings.warn(f"checkpoint step {step} at {self.step_path(step)} cannot be restored ({why}); "
                          "trying an older step", stacklevel=2)
        raise CheckpointCorrupt(f"{self.directory}: no checkpoint step can be restored:\n  " + "\n  ".join(failures))

    def set_aside_after(self, step: int) -> list[str]:
        """Rename the step folders newer than `step` (damaged ones a resume skipped) to
        `corrupt.<step>.<time>` so the run can write those steps again; never deletes them."""
        moved = []
        for s in sorted(self.manager.all_steps()):
            if s > step:
                dst = fileio.join(self.directory, f"corrupt.{s}.{int(time.time())}")
                fileio.rename(self.step_path(s), dst)
                moved.append(dst)
                warnings.warn(f"moved the damaged checkpoint step {s} aside to {dst}", stacklevel=2)
        if moved:
            self.manager.reload()
        return moved

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save `state` (arrays) and `meta` (JSON) as `step`, the arrays' checksums in meta; a state
        with a NaN / inf leaf is refused (`NonFiniteError` naming the leaf), so no checkpoint ever
        holds one."""
        check_finite(state, f"checkpoint step {step} ({self.step_path(step)})",
                     hint="not saved (the last good checkpoint is kept)")
        meta = {**meta, "checksums": array_checksums(state)}
        self._need = _state_bytes(state)
        _check_free_space(self.directory, self._need, step)
        with self._disk_errors(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)

    def _disk_errors(self, step=None):
        """A full disk (or quota) inside orbax / tensorstore as one OSError(ENOSPC) naming the
        folder and the bytes one checkpoint needs; orbax's own log lines for it are dropped."""
        return _DiskErrors(self.directory, getattr(self, "_need", 0), step)

    def verify(self, step: int, restored: Any) -> None:
        """Compare the restored arrays with the checksums saved with `step` (none saved: an older
        run, nothing to check); `CheckpointCorrupt` naming the first array that differs."""
        saved = self.read_meta(step).get("checksums")
        if not saved:
            return
        got = array_checksums(restored)
        bad = [k for k in saved if k in got and got[k] != saved[k]]
        if bad:
            raise CheckpointCorrupt(f"{self.step_path(step)}/state: array {bad[0]!r}"
                                    + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                                    + " does not match the checksum recorded when it was saved (damaged file)")

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, configs: dict) -> dict:
        """Meta of `step`, after checking its configs equal `configs` (except resumable fields)."""
        meta = self.read_meta(step)
        diffs = _diff(comparable(meta.get("configs", {})), comparable(configs))
        if diffs:
            raise CheckpointMismatch(
                f"{self.directory} holds a checkpoint (step {step}) of a different config; refusing to resume "
                f"from it. Differences (checkpoint != this run):\n  " + "\n  ".join(diffs[:20])
                + ("\n  ..." if len(diffs) > 20 else "")
                + "\nUse another output folder, or restore the original config.")
        return meta

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The "state" item restored onto the shardings of `abstract_state` (ShapeDtypeStructs),
        checked against its saved checksums (`verify`)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        if all(a.dtype == b.dtype for a, b in
               zip(jax.tree_util.tree_leaves(abstract_state), jax.tree_util.tree_leaves(restored))):
            self.verify(step, restored)        # (a restore that casts dtypes has other bits)
        return restored

    def restore_local(self, step: int | None = None, device=None) -> Any:
        """The "state" item of `step` (default: latest) on one local device, whatever mesh (device
        count, process count, topology) wrote it (for inspection, slicing and export)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointCorrupt(f"{self.directory}: no complete checkpoint")
        md = self.manager.item_metadata(step)["state"]
        sh = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), md)
        return self.restore_state(step, abstract)

    def wait(self) -> None:
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last save and close orbax's threads; a full disk found by either (orbax's
        `close` re-raises what its metadata / commit threads hit, as bare "[Errno 28]") is the
        one named OSError."""
        try:
            with self._disk_errors():
                self.manager.wait_until_finished()
        finally:
            try:
                with self._disk_errors():
                    self.manager.close()
            finally:
                if not _DiskErrors.seen:   # after a full disk, orbax's threads may still log it as they wind down
                    _DiskFullLogFilter.remove(self._quiet)


def _state_bytes(state) -> int:
    """Bytes this process writes for `state` (its addressable shards; numpy leaves whole)."""
    total = 0
    for x in jax.tree.leaves(state):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.replica_id == 0)
        elif hasattr(x, "nbytes"):
            total += int(x.nbytes)
    return total


def _check_free_space(directory: str, need: int, step) -> None:
    import errno
    import shutil
    try:
        free = shutil.disk_usage(directory).free
    except OSError:          # not a local path (e.g. gs://): orbax reports its own errors
        return
    if need > free:
        raise OSError(errno.ENOSPC, f"checkpoint step {step}: {directory} has {free:,} bytes free but a checkpoint "
                                    f"needs about {need:,} bytes; nothing saved (free space, or use another "
                                    "output folder)")


_DISK_FULL = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


class _DiskFullLogFilter:
    """Drops orbax's ERROR log records (with their tracebacks) about a full disk while a
    Checkpointer is open: the one OSError its next save / wait / close raises says it."""

    NAMES = ("absl", "orbax", "asyncio")   # asyncio: "Task exception was never retrieved" of a failed write

    @classmethod
    def install(cls) -> "_DiskFullLogFilter":
        import logging
        f = cls()
        for name in cls.NAMES:
            logging.getLogger(name).addFilter(f)
        return f

    @classmethod
    def remove(cls, f) -> None:
        import logging
        for name in cls.NAMES:
            logging.getLogger(name).removeFilter(f)

    def filter(self, record) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:   # the whole chain: orbax re-raises wrapped
            import traceback
            text += "".join(traceback.format_exception(record.exc_info[1]))
        return not any(k in text for k in _DISK_FULL)


class _DiskErrors:
    seen = False   # a full disk was reported in this process

    def __init__(self, directory, need, step):
        self.directory, self.need, self.step = directory, need, step

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        import errno
        if e is None or isinstance(e, OSError) and e.errno == errno.ENOSPC and "checkpoint" in str(e):
            return False
        if isinstance(e, Exception) and any(k in str(e) for k in _DISK_FULL):
            _quiet_closed_loop_callbacks()      # the failed writes' leftovers, as after a failed restore
            _DiskErrors.seen = True
            raise OSError(errno.ENOSPC, f"writing a checkpoint into {self.directory} failed: no space left "
                                        f"(a checkpoint needs about {self.need:,} bytes); the previous checkpoints "
                                        "are kept (free space, or use another output folder)") from None
        return False


def _is_closed_loop_callback(unraisable) -> bool:
    """The leftover of a failed orbax restore: tensorstore finishing a read after orbax's event
    loop was closed, `call_soon_threadsafe` -> RuntimeError('Event loop is closed')."""
    e, tb = unraisable.exc_value, unraisable.exc_traceback
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        return False
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in frames


def _quiet_closed_loop_callbacks() -> None:
    """After a failed restore, drop those leftovers (one `sys.unraisablehook` filter per process,
    chained to the previous hook; everything else is still reported): the warning naming the
    step already says what happened, and dozens of asyncio tracebacks read as a broken run."""
    import sys
    hook = sys.unraisablehook
    if getattr(hook, "_elastic_jax_filter", False):
        return

    def filtered(unraisable):
        if not _is_closed_loop_callback(unraisable):
            hook(unraisable)
    filtered._elastic_jax_filter = True
    sys.unraisablehook = filtered


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_run(run_dir: str | os.PathLike, step: int | None = None, *, with_quant: bool = False):
    """(cfg, params, router_params or None, ElasticConfig or None) from an elastic training run
    (`<run_dir>/checkpoints`, orbax, written by `elastic_jax.train`): the model params of `step`
    (default: the latest complete one), restored on the host; the params are the permuted ones
    training used, so every nested model is a prefix (METHOD §8). `with_quant=True` appends the
    QAD quantization state (`TrainConfig.qad` runs) or None."""
    run_dir = os.path.abspath(os.fspath(run_dir))
    ckpt_dir = run_dir if os.path.basename(run_dir) == "checkpoints" else os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{run_dir}: neither an HF directory (config.json) nor an elastic run "
                                f"(no {ckpt_dir})")
    from ..config import NemotronHConfig
    from ..elastic.config import ElasticConfig
    from ..errors import JSONFileError
    from ..model.params import check_params

    def restore(st):
        meta = ck.read_meta(st)
        configs = meta.get("configs") if isinstance(meta, dict) else None
        if not isinstance(configs, dict) or not isinstance(configs.get("model"), dict):
            raise JSONFileError(f"{ck.step_path(st)}/meta: field 'configs.model' (the model config) is missing")
        cfg = NemotronHConfig.from_dict({k: tuple(v) if isinstance(v, list) else v
                                         for k, v in configs["model"].items()})
        ecfg = ElasticConfig.from_dict(configs["elastic"]) if configs.get("elastic") else None
        restored = ck.restore_local(st)   # onto this process's first device, whatever mesh wrote it
        return cfg, ecfg, restored, configs

    ck = Checkpointer(ckpt_dir, async_save=False)
    try:
        if step is None:
            found = ck.restore_newest(restore)
            if found is None:
                raise CheckpointCorrupt(f"{ckpt_dir}: no checkpoint step in the run folder")
            step, (cfg, ecfg, restored, configs) = found
        else:
            if step not in ck.manager.all_steps():
                raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step} (have {ck.all_steps()})")
            why = ck.incomplete(step)
            if why is not None:
                raise CheckpointCorrupt(f"{ckpt_dir}: step {step} is incomplete ({why})")
            try:
                cfg, ecfg, restored, configs = restore(step)
            except (JSONFileError, CheckpointCorrupt):
                raise
            except Exception as e:       # orbax / tensorstore errors of a damaged step
                raise CheckpointCorrupt(f"{ck.step_path(step)}: cannot be restored ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        ck.close()
    state = restored.get("state", restored)
    if "params" not in state:
        raise ValueError(f"{ckpt_dir} step {step}: no 'params' in the saved state (keys {sorted(state)})")
    params = jax.tree_util.tree_map(jnp.asarray, state["params"])
    if isinstance(params.get("layers"), dict):   # orbax restores lists as {"0": .., "1": ..}
        params["layers"] = [params["layers"][str(i)] for i in range(len(params["layers"]))]
    check_params(params, cfg)
    router = state.get("router") or None
    if with_quant:
        qad = (configs.get("train") or {}).get("qad")
        qstate = None
        if qad and state.get("quant") is not None:
            from ..quant.state import QuantSpec, tree_to_state
            qstate = tree_to_state(QuantSpec(qad), jax.tree_util.tree_map(jnp.asarray, state["quant"]))
        return cfg, params, router, ecfg, qstate
    return cfg, params, router, ecfg
