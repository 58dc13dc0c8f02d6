"""The SSD and grouped-matmul kernels per shard under the context mesh (`jax.shard_map`).

The caller names the mesh axes that split each dimension (`partition=`); the kernels then run on
their local blocks, never on gathered operands. SSD is independent per batch row and per group of
heads, so (batch, heads) blocks need no communication. The grouped matmul with its rows split:
each shard's rows [r0, r0 + m_local) meet the groups in the clipped ranges of the global
cumulative sizes, which gives exact local group sizes (rows past the global sum stay zero); the
output columns split over `n_axes` shift the elastic bound `active_n` by the shard's offset.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _entry(axes):
    axes = tuple(axes or ())
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _linear_index(axes, mesh):
    i = jnp.zeros((), jnp.int32)
    for a in axes:
        i = i * mesh.shape[a] + jax.lax.axis_index(a)
    return i


def _check_divides(what, dim, axes, mesh):
    n = math.prod(mesh.shape[a] for a in axes)
    if dim % n:
        raise ValueError(f"{what} ({dim}) is not divisible by the product {n} of its mesh axes {tuple(axes)}")
    return n


def ssd_sharded(local_fn, partition, x, dt, A, B, C, D, *, chunk_size, initial_state, seq_idx, active_heads, impl):
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, head_axes = (tuple(a or ()) for a in partition)
    _check_divides("ssd: batch", x.shape[0], batch_axes, mesh)
    _check_divides("ssd: groups", B.shape[2], head_axes, mesh)   # whole groups per shard (heads follow)
    b, h = _entry(batch_axes), _entry(head_axes)
    specs = [P(b, None, h, None), P(b, None, h), P(h), P(b, None, h, None), P(b, None, h, None),
             None if D is None else P(h), None if initial_state is None else P(b, h, None, None),
             None if seq_idx is None else P(b, None), None if active_heads is None else P()]

    def body(x, dt, A, B, C, D, init, sid, act):
        return local_fn(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=init, seq_idx=sid,
                        active_heads=act, impl=impl)

    act = None if active_heads is None else jnp.asarray(active_heads, jnp.int32)
    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=(P(b, None, h, None), P(b, h, None, None)),
                       check_vma=False)
    return fn(x, dt, A, B, C, D, initial_state, seq_idx, act)


def gmm_sharded(local_fn, partition, lhs, rhs, group_sizes, *, active_groups, active_k, active_n, impl,
                preferred_element_type, precision=None):
    mesh = jax.sharding.get_abstract_mesh()
    row_axes, n_axes = (tuple(a or ()) for a in partition)
    n_rows = _check_divides("gmm: lhs rows", lhs.shape[0], row_axes, mesh)
    n_cols = _check_divides("gmm: rhs columns", rhs.shape[2], n_axes, mesh)
    m_loc, n_loc = lhs.shape[0] // n_rows, rhs.shape[2] // n_cols
    r, c = _entry(row_axes), _entry(n_axes)
    scalar = lambda v: None if v is None else jnp.asarray(v, jnp.int32)

    def body(lhs, rhs, gs, ag, ak, an):
        r0 = _linear_index(row_axes, mesh) * m_loc
        ends = jnp.clip(jnp.cumsum(gs.astype(jnp.int32)) - r0, 0, m_loc)
        local_gs = jnp.diff(ends, prepend=0).astype(jnp.int32)
        if an is not None:
            an = jnp.clip(an - _linear_index(n_axes, mesh) * n_loc, 0, n_loc)
        return local_fn(lhs, rhs, local_gs, active_groups=ag, active_k=ak, active_n=an, impl=impl,
                        preferred_element_type=preferred_element_type, precision=precision)

    specs = (P(r, None), P(None, None, c), P(), *(None if v is None else P() for v in (active_groups, active_k,
                                                                                          active_n)))
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(r, c), check_vma=False)
    return fn(lhs, rhs, group_sizes, scalar(active_groups), scalar(active_k), scalar(active_n))
