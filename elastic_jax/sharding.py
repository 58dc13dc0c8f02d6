"""Logical-axis sharding rules: ONE table maps the logical names of parameters and activations to
the mesh axes (data, fsdp, tensor, expert) (one rules table, as MaxText's `logical_axis_rules`). Base layer: the model, `hf/` and the
training code all import it from here.

Parameters carry logical names (`ej.param_axes(cfg)`: vocab, embed, heads, kv_heads, mlp,
shared_mlp, ssm_heads, ssm_inner, ssm_groups, conv, experts, experts_router, expert_mlp); activations use `batch`,
`length` and the `act_*` names. A dimension is split only when its size divides by the product
of the mesh axes and no mesh axis is used twice in one array; otherwise it stays replicated (tiny
test models, odd head counts). For parameters that fallback is checked:
`assert_params_sufficiently_sharded` raises, naming the parameters, when more than a tolerance
of the parameter bytes lost a split the rules asked for (MaxText's check of the same name).

How the mesh reaches the model (MaxText / jax-llm-examples style): the caller enters
`jax.set_mesh(mesh)` (the training loop does) and, optionally, `use_rules(rules)`; inside, the
model reads `jax.sharding.get_abstract_mesh()` and puts `with_sharding_constraint` on its
activations (`constrain`) and runs the MoE / kernels per shard under `jax.shard_map`. Without a
mesh in context (or on a mesh of one device) every helper here is a no-op, so the pure-function
single-device API is unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis, a tuple of mesh axes, or None (replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("shared_mlp", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_inner", "tensor"),
    ("ssm_groups", None),
    ("ssm_state", None),
    ("conv", None),
    ("experts", "expert"),
    ("experts_router", None),
    ("expert_mlp", "tensor"),
    # activations (batches of tokens and everything computed from them)
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_ssm_heads", "tensor"),
    ("act_ssm_groups", "tensor"),
    ("act_experts", "expert"),
)


def rules_dict(rules) -> dict:
    """The rules as a dict, each target checked (a mesh axis, a tuple of them, or None)."""
    out = {}
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"sharding rule {item!r}: must be a pair (logical axis name, mesh axes)")
        name, target = item
        if isinstance(target, list):
            target = tuple(target)
        if target is not None and not isinstance(target, (str, tuple)):
            raise ValueError(f"sharding rule {name!r} -> {target!r}: target must be a mesh axis name, a tuple "
                             "of them, or None")
        for t in (target,) if isinstance(target, str) else (target or ()):
            if t not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {target!r}: {t!r} is not a mesh axis {MESH_AXES}")
        out[name] = target
    return out


def merge_rules(overrides=(), base=DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
    """`base` with the (name, target) pairs of `overrides` replacing or adding entries."""
    table = rules_dict(base)
    table.update(rules_dict(overrides))
    return tuple(table.items())


def _targets(target) -> list:
    return [target] if isinstance(target, str) else list(target or ())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for one array from its logical axis names (see the module docstring).
    `mesh`: a Mesh or AbstractMesh."""
    table = rules_dict(rules)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the array rank {len(shape)} (shape {tuple(shape)})")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        cand = [a for a in _targets(None if name is None else table[name])
                if a not in used and mesh.shape.get(a, 1) > 1]
        # keep the longest prefix of mesh axes whose product divides the dimension
        while cand and dim % math.prod(mesh.shape[a] for a in cand):
            cand.pop()
        used.update(cand)
        spec.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
    return P(*spec)


def _wanted_factor(axes, mesh, table) -> int:
    """Product of the (distinct, >1) mesh axes the rules ask for, over all dimensions."""
    seen: set[str] = set()
    for name in axes:
        if name is not None:
            seen.update(a for a in _targets(table.get(name)) if mesh.shape.get(a, 1) > 1)
    return math.prod(mesh.shape[a] for a in seen)


def _spec_factor(spec: P, mesh) -> int:
    return math.prod(mesh.shape[a] for entry in spec for a in _targets(entry))


_is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def assert_params_sufficiently_sharded(axes_tree, shapes_tree, mesh, rules=DEFAULT_RULES, tolerance: float = 0.02):
    """Raise if the parameters that got less of a split than the rules ask for (a dimension that
    does not divide its mesh axes, or an axis already used) hold more than `tolerance` of all
    parameter elements; the message names the largest of them with their shapes and specs."""
    table = rules_dict(rules)
    flat_axes = jax.tree_util.tree_flatten(axes_tree, is_leaf=_is_axes)[0]
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes_tree)
    if len(flat_axes) != len(flat):
        raise ValueError(f"axis-name tree has {len(flat_axes)} leaves but the array tree has {len(flat)}")
    total, short = 0, []
    for axes, (path, leaf) in zip(flat_axes, flat):
        size = math.prod(leaf.shape)
        total += size
        spec = logical_to_spec(axes, leaf.shape, mesh, rules)
        want, got = _wanted_factor(axes, mesh, table), _spec_factor(spec, mesh)
        if got < want:
            short.append((size, jax.tree_util.keystr(path), tuple(leaf.shape), tuple(axes), spec, got, want))
    lost = sum(s[0] for s in short)
    if total and lost / total > tolerance:
        short.sort(key=lambda s: -s[0])
        names = "; ".join(f"{p} {shape} axes {axes} -> {spec} (split {got}x of {want}x)"
                          for _, p, shape, axes, spec, got, want in short[:8])
        raise ValueError(
            f"parameters holding {lost / total:.1%} of all parameter elements (tolerance {tolerance:.1%}) are not "
            f"sharded as the rules ask on mesh {dict(mesh.shape)}, because a dimension does not divide its mesh "
            f"axes: {names}{' ...' if len(short) > 8 else ''}. Change the mesh shape or the sharding rules "
            "(TrainConfig.sharding_rules), or raise TrainConfig.sharding_tolerance.")
    return lost / total if total else 0.0


def tree_shardings(axes_tree, shapes_tree, mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree, given its logical axes and its arrays (or ShapeDtypeStructs)."""
    flat_axes, _ = jax.tree_util.tree_flatten(axes_tree, is_leaf=_is_axes)
    flat_shapes, treedef = jax.tree_util.tree_flatten(shapes_tree)
    if len(flat_axes) != len(flat_shapes):
        raise ValueError(f"axis-name tree has {len(flat_axes)} leaves but the array tree has {len(flat_shapes)}")
    return treedef.unflatten([NamedSharding(mesh, logical_to_spec(a, s.shape, mesh, rules))
                              for a, s in zip(flat_axes, flat_shapes)])


def batch_spec(mesh, batch: int, rules=DEFAULT_RULES, *, leading: int = 0) -> P:
    """Spec of a [*leading, batch, length] token array: batch split by the `batch` rule."""
    s = logical_to_spec(("batch", "length"), (batch, 1), mesh, rules)
    return P(*([None] * leading), *s)


# ------------------------------------------------------------------- mesh and rules in context
_RULES: contextvars.ContextVar = contextvars.ContextVar("elastic_jax_sharding_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules):
    """Rules the model's activation constraints and shard_maps use inside this context (default:
    DEFAULT_RULES). Trace under it: jit caches do not see it."""
    token = _RULES.set(tuple(rules_dict(rules).items()))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules():
    return _RULES.get()


def context_mesh():
    """The abstract mesh set by `jax.set_mesh`, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size <= 1:
        return None
    return mesh


def constrain(x, axes: Sequence[str | None]):
    """`with_sharding_constraint` of `x` by its logical axis names under the context mesh and
    rules; `x` itself when no mesh is in context."""
    mesh = context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh,
                                                                                   current_rules())))


def mesh_axes_for(name: str, dim: int, mesh=None, rules=None) -> tuple[str, ...]:
    """The mesh axes that split a dimension of size `dim` with logical name `name` (maybe empty)."""
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None:
        return ()
    entry = logical_to_spec((name,), (dim,), mesh, current_rules() if rules is None else rules)[0]
    return tuple(_targets(entry))


def host_value(x):
    """`x` (possibly a multi-host, sharded jax.Array) as a numpy array on this host: a replicated
    array is read locally, any other one gathered from every process (`process_allgather`)."""
    import numpy as np
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
