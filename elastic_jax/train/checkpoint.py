"""Orbax checkpoints of a training run (ANCHORS §7.13).

One `ocp.CheckpointManager` under `<out_dir>/checkpoints` with two items per step:
  "state": params, router, optimizer state, the base RNG key and the step (sharded arrays;
           restored onto whatever mesh the resuming run uses);
  "meta":  JSON — model / elastic / train / data configs, the data iterator state of every host,
           curriculum stage, tokens seen, and an opaque caller blob (e.g. the importance ranking
           and permutation the parent was prepared with).
Saves are asynchronous (`wait()` before reading), `keep` most recent are kept, and each save is
atomic: orbax writes into a temporary folder and renames it when complete, so a save interrupted
by a crash is never listed — `latest_step()` is the newest *complete* step.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from .config import RESUMABLE_FIELDS


class CheckpointMismatch(ValueError):
    """The checkpoint in `out_dir` was written by a run with a different config."""


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(f"{p}: {'<absent>' if k not in a else a[k]!r} != {'<absent>' if k not in b else b[k]!r}")
            else:
                out += _diff(a[k], b[k], p)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def comparable(configs: dict) -> dict:
    """The configs with the fields that may change on resume (mesh, logging) removed."""
    out = dict(configs)
    if "train" in out and isinstance(out["train"], dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in RESUMABLE_FIELDS}
    return out


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

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
        """The "state" item restored onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_local(self, step: int | None = None, device=None) -> Any:
        """The "state" item of `step` (default: latest) on one local device, whatever mesh wrote it
        (for inspection and export)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{self.directory}: no complete checkpoint")
        md = self.manager.item_metadata(step)["state"]
        sh = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), md)
        return self.restore_state(step, abstract)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
