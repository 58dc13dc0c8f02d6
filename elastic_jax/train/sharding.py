"""Device mesh (data, fsdp, tensor, expert) and the logical-axis rules table (ANCHORS §7.3).

Every parameter carries logical axis names (`ej.param_axes(cfg)`: vocab, embed, heads, kv_heads,
mlp, ssm_heads, ssm_groups, conv, experts, experts_router, expert_mlp; the router's are all None);
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

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import MESH_AXES, MeshConfig

# logical axis -> mesh axis, a tuple of mesh axes, or None (replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_groups", None),
    ("ssm_state", None),
    ("conv", None),
    ("experts", "expert"),
    ("experts_router", None),
    ("expert_mlp", "tensor"),
)


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


def _rules_dict(rules) -> dict:
    out = {}
    for name, target in rules:
        if target is not None and not isinstance(target, (str, tuple)):
            raise ValueError(f"sharding rule {name!r} -> {target!r}: target must be a mesh axis name, a tuple "
                             "of them, or None")
        for t in (target,) if isinstance(target, str) else (target or ()):
            if t not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {target!r}: {t!r} is not a mesh axis {MESH_AXES}")
        out[name] = target
    return out


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for one array from its logical axis names (see the module docstring)."""
    table = _rules_dict(rules)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the array rank {len(shape)} (shape {tuple(shape)})")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = None if name is None else table[name]
        cand = [target] if isinstance(target, str) else list(target or ())
        cand = [a for a in cand if a not in used and mesh.shape[a] > 1]
        # keep the longest prefix of mesh axes whose product divides the dimension
        while cand and dim % math.prod(mesh.shape[a] for a in cand):
            cand.pop()
        used.update(cand)
        spec.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
    return P(*spec)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree, given its logical axes and its arrays (or ShapeDtypeStructs)."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    flat_axes, _ = jax.tree_util.tree_flatten(axes_tree, is_leaf=is_axes)
    flat_shapes, treedef = jax.tree_util.tree_flatten(shapes_tree)
    if len(flat_axes) != len(flat_shapes):
        raise ValueError(f"axis-name tree has {len(flat_axes)} leaves but the array tree has {len(flat_shapes)}")
    return treedef.unflatten([NamedSharding(mesh, logical_to_spec(a, s.shape, mesh, rules))
                              for a, s in zip(flat_axes, flat_shapes)])


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


def batch_spec(mesh: Mesh, batch: int, rules=DEFAULT_RULES, *, leading: int = 0) -> P:
    """Spec of a [*leading, batch, length] token array: batch split by the `batch` rule."""
    s = logical_to_spec(("batch", "length"), (batch, 1), mesh, rules)
    return P(*([None] * leading), *s)


def batch_axes(mesh: Mesh, batch: int, rules=DEFAULT_RULES):
    return batch_spec(mesh, batch, rules)[0]


def host_local_to_global(local: np.ndarray, mesh: Mesh, spec: P, global_shape: Sequence[int]) -> jax.Array:
    """Assemble a global array from this process's rows (per-host data sharding). With one process
    this is a plain sharded `device_put`."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
