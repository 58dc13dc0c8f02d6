"""Device mesh (data, fsdp, tensor, expert) of a run; the logical-axis rules table and the
logical-to-mesh helpers live in `elastic_jax/sharding.py` (re-exported here).

Every parameter carries logical axis names (`ej.param_axes(cfg)`: vocab, embed, heads, kv_heads,
mlp, shared_mlp, ssm_heads, ssm_inner, ssm_groups, conv, experts, experts_router, expert_mlp; the router's are all None);
ONE table maps them to mesh axes. A dimension is only split when its size divides by the mesh
axes' product and no mesh axis is used twice in one array; otherwise that dimension stays
replicated (tiny test models, odd head counts). Optimizer state follows its parameter (matched by
path and shape), the frozen teacher is sharded like the student, and batches are split over
("data", "fsdp", "expert") on their batch dimension. The mesh uses Auto axes (GSPMD): jit with
`in_shardings` / `out_shardings` computes the same numbers as one device.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = tree_shardings(param_axes(cfg), params, mesh)
    params = jax.device_put(params, shardings)

Multi-host: call `init_distributed()` (wraps `jax.distributed.initialize`) before anything else
touches devices; every process then builds the same global mesh over `jax.devices()` and feeds
only its own rows of each batch (`host_local_to_global`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ..sharding import (DEFAULT_RULES, MESH_AXES, assert_params_sufficiently_sharded,  # noqa: F401
                        batch_spec, logical_to_spec, merge_rules, tree_shardings, use_rules)
from .config import MeshConfig


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, **kw) -> None:
    """`jax.distributed.initialize` (arguments as there; None = auto-detect on TPU / SLURM). On
    CPU, multi-process collectives use gloo. Call once per process, before using devices."""
    try:   # only affects the CPU backend (multi-process CPU runs, e.g. tests on one machine)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kw)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """The 4-axis mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg.size != len(devices):
        raise ValueError(f"MeshConfig(data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor}, "
                         f"expert={mesh_cfg.expert}) needs {mesh_cfg.size} devices (the product of the axes) "
                         f"but {len(devices)} are available; the axes must multiply to the device count")
    arr = np.asarray(devices, dtype=object).reshape(mesh_cfg.shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def follow_shardings(tree, ref_tree, ref_shardings, mesh: Mesh):
    """Shardings for a tree (e.g. optax state) whose leaves mirror `ref_tree` leaves: a leaf whose
    key path ends with a reference leaf's path and has its shape gets that leaf's sharding;
    everything else (counts, scalars) is replicated."""
    ref = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(ref_tree)[0],
                                jax.tree_util.tree_leaves(ref_shardings)):
        ref[tuple(str(k) for k in path)] = (tuple(leaf.shape), sh)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(len(keys)):
            hit = ref.get(keys[n:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def host_local_to_global(local: np.ndarray, mesh: Mesh, spec: P, global_shape: Sequence[int]) -> jax.Array:
    """Assemble a global array from this process's rows (per-host data sharding). With one process
    this is a plain sharded `device_put`."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
