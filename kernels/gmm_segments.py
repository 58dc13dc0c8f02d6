"""Grouped matmul as tile-padded sorted segments: the XLA path of `gmm` on CPU.

`jax.lax.ragged_dot` on the CPU backend lowers densely: it builds an [m, g·k] masked copy of lhs
and multiplies it by all g groups' weights, g times the useful FLOPs plus an m x g·k temporary
(profiled in BUILD_NOTES.md, issue 17). Here each group's rows (lhs is sorted by group) are cut
into tiles of `tm` rows, the last tile of a group padded with a zero row, so every tile belongs
to one group. No capacity, nothing dropped: a static bound on the tile count holds for any group
sizes, Σ_g ceil(s_g / tm) <= m // tm + g.

The tiles run as a loop of 2-D matmuls (`lax.map`), tile t against rhs[group of t], and the
tiles past the used count skip their matmul (`lax.cond`): on the CPU backend a batched dot over
[tiles, tm, k] x [tiles, k, n] runs at a third of a 2-D dot's FLOP/s (and gathers a [k, n]
weight per tile), while the loop of 2-D dots runs within ~1.3x of one dense [m, k] x [k, n]
matmul (BUILD_NOTES.md, issue 17). A custom VJP keeps the backward in the same form: d lhs per
tile against rhs[group]ᵀ, d rhs accumulated per group in the loop's carry.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .reference import gmm_checked_masked

HIGHEST = jax.lax.Precision.HIGHEST
MAX_TILE = 128


def segment_tile(m: int, g: int) -> int:
    """Rows per tile: the power of two nearest below the mean group size m / g, in [8, MAX_TILE]
    (padding <= g·tm rows stays <= m once groups hold >= MAX_TILE rows on average)."""
    mean = max(1, m // max(g, 1))
    return int(min(MAX_TILE, max(8, 1 << (mean.bit_length() - 1))))


def segment_layout(group_sizes, m: int, g: int, tm: int):
    """Where every row goes: -> (tile_group [T] (clamped to g-1), tile_used [T] bool, src [T, tm]
    (source row of every slot, m = the appended zero row), slot [m] (the slot of every row),
    total rows Σ group_sizes), with T = m // tm + g tiles."""
    n_tiles = m // tm + g
    sizes = group_sizes.astype(jnp.int32)
    row_end = jnp.cumsum(sizes)
    row_start = row_end - sizes
    tiles = (sizes + tm - 1) // tm
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    tile_ids = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_group = jnp.searchsorted(tile_end, tile_ids, side="right")          # g: past the used tiles
    tg = jnp.minimum(tile_group, g - 1)
    local = (tile_ids - tile_start[tg])[:, None] * tm + jnp.arange(tm, dtype=jnp.int32)
    used = tile_group < g
    src = jnp.where(used[:, None] & (local < sizes[tg][:, None]), row_start[tg][:, None] + local, m)
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(row_end, rows, side="right"), g - 1)
    slot = tile_start[row_group] * tm + rows - row_start[row_group]
    return tg, used, src, slot, row_end[-1]


def _dot(a, b, precision, out_dtype):
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def tile_matmul(lhs_TMK, rhs_GKN, tile_group_T, used_T, precision, out_dtype):
    """out[t] = lhs[t] @ rhs[tile_group[t]] for the used tiles, 0 for the others: [T, tm, n]."""
    return _tile_matmul_fwd(lhs_TMK, rhs_GKN, tile_group_T, used_T, precision, out_dtype)[0]


def _tile_matmul_fwd(lhs_TMK, rhs_GKN, tile_group_T, used_T, precision, out_dtype):
    tm, n = lhs_TMK.shape[1], rhs_GKN.shape[2]

    def one(xs):
        x_MK, gi, u = xs
        return jax.lax.cond(u, lambda: _dot(x_MK, rhs_GKN[gi], precision, out_dtype),
                            lambda: jnp.zeros((tm, n), out_dtype))

    out = jax.lax.map(one, (lhs_TMK, tile_group_T, used_T))
    return out, (lhs_TMK, rhs_GKN, tile_group_T, used_T)


def _tile_matmul_bwd(precision, out_dtype, res, ct_TMN):
    lhs_TMK, rhs_GKN, tile_group_T, used_T = res
    tm, k = lhs_TMK.shape[1:]
    f32 = jnp.float32

    def one(acc_GKN, xs):
        x_MK, ct_MN, gi, u = xs

        def used():
            w_KN = rhs_GKN[gi]
            d_x = _dot(ct_MN.astype(w_KN.dtype), w_KN.T, precision, f32).astype(x_MK.dtype)
            d_w = _dot(x_MK.T, ct_MN.astype(x_MK.dtype), precision, f32)
            return d_x, acc_GKN.at[gi].add(d_w)

        return jax.lax.cond(u, used, lambda: (jnp.zeros((tm, k), x_MK.dtype), acc_GKN))[::-1]

    acc, d_lhs = jax.lax.scan(lambda c, xs: one(c, xs), jnp.zeros(rhs_GKN.shape, f32),
                              (lhs_TMK, ct_TMN, tile_group_T, used_T))
    return d_lhs, acc.astype(rhs_GKN.dtype), None, None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


def gmm_segments(lhs, rhs, group_sizes, *, active_groups=None, active_k=None, active_n=None,
                 preferred_element_type=jnp.float32, precision=None, tile: int | None = None):
    """lhs [m, k] (rows sorted by group) x rhs [g, k, n] -> [m, n], as `gmm_reference`: rows past
    Σ group_sizes give 0; the elastic `active_*` arguments mask k, n and groups the same way."""
    lhs, rhs = gmm_checked_masked(lhs, rhs, group_sizes, active_groups, active_k, active_n)
    m, k = lhs.shape
    g, _, n = rhs.shape
    tm = segment_tile(m, g) if tile is None else int(tile)
    tg, used, src, slot, total = segment_layout(group_sizes, m, g, tm)
    lhs_TMK = jnp.concatenate([lhs, jnp.zeros((1, k), lhs.dtype)])[src.reshape(-1)].reshape(-1, tm, k)
    out_TMN = tile_matmul(lhs_TMK, rhs, tg, used, HIGHEST if precision is None else precision,
                          jnp.dtype(preferred_element_type))
    # every row of lhs back from its slot; rows past Σ sizes -> 0
    out = out_TMN.reshape(-1, n)[slot]
    return jnp.where((jnp.arange(m) < total)[:, None], out, jnp.zeros((), out.dtype))
