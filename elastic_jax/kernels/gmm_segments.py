"""Grouped matmul as tile-padded sorted segments: the XLA path of `gmm` on CPU.

`jax.lax.ragged_dot` on the CPU backend lowers densely: it builds an [m, g·k] masked copy of lhs
and multiplies it by all g groups' weights, g times the useful FLOPs plus an m x g·k temporary
(profiled in BUILD_NOTES.md, issue 17). Here each group's rows (lhs is sorted by group) are cut
into tiles of `tm` rows, the last tile of a group padded with a zero row, so every tile belongs
to one group. No capacity, nothing dropped: a static bound on the tile count holds for any group
sizes, Σ_g ceil(s_g / tm) <= m // tm + g.

The tiles run as a loop (`lax.scan`) of 2-D matmuls: tile t gathers its rows, multiplies them
by rhs[group of t] and scatters the product into the output; tiles past the used count skip
(`lax.cond`). On the CPU backend a batched dot over [tiles, tm, k] x [tiles, k, n] runs at a
third of a 2-D dot's FLOP/s, and [tiles, tm, ·] copies of lhs / the output cost as much again in
memory traffic; the loop runs within ~1.1x of one dense [m, k] x [k, n] matmul (BUILD_NOTES.md,
issue 17). A custom VJP keeps the backward in the same form: d lhs per tile against rhs[group]ᵀ,
d rhs accumulated per group in the loop's carry.
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
    (the row of every slot; m = a padded slot)), with T = m // tm + g tiles."""
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
    return tg, used, src


def _dot(a, b, precision, out_dtype):
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)


def _rows(t, src_M):
    """Rows `src` of t; index len(t) (a padded slot) reads zeros."""
    return t.at[src_M].get(mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def segment_matmul(lhs, rhs_GKN, src_TM, tile_group_T, used_T, precision, out_dtype):
    """out[src[t]] = lhs[src[t]] @ rhs[tile_group[t]] over the used tiles t: [m, n], rows in no slot
    (past Σ group sizes) 0. Each tile gathers its rows and scatters its product in the loop, so
    no [tiles, tm, ·] copy of lhs or of the output is ever materialized."""
    return _segment_matmul_fwd(lhs, rhs_GKN, src_TM, tile_group_T, used_T, precision, out_dtype)[0]


def _segment_matmul_fwd(lhs, rhs_GKN, src_TM, tile_group_T, used_T, precision, out_dtype):
    def tile(out, xs):
        src, gi, u = xs
        run = lambda: out.at[src].set(_dot(_rows(lhs, src), rhs_GKN[gi], precision, out_dtype), mode="drop")
        return jax.lax.cond(u, run, lambda: out), None

    out, _ = jax.lax.scan(tile, jnp.zeros((lhs.shape[0], rhs_GKN.shape[2]), out_dtype),
                          (src_TM, tile_group_T, used_T))
    return out, (lhs, rhs_GKN, src_TM, tile_group_T, used_T)


def _segment_matmul_bwd(precision, out_dtype, res, ct_MN):
    lhs, rhs_GKN, src_TM, tile_group_T, used_T = res
    f32 = jnp.float32

    def tile(carry, xs):
        src, gi, u = xs

        def run():
            d_lhs, d_rhs = carry
            w_KN, c_MN = rhs_GKN[gi], _rows(ct_MN, src).astype(rhs_GKN.dtype)
            d_x = _dot(c_MN, w_KN.T, precision, f32).astype(lhs.dtype)
            d_w = _dot(_rows(lhs, src).T, c_MN.astype(lhs.dtype), precision, f32)
            return d_lhs.at[src].set(d_x, mode="drop"), d_rhs.at[gi].add(d_w)

        return jax.lax.cond(u, run, lambda: carry), None

    (d_lhs, d_rhs), _ = jax.lax.scan(tile, (jnp.zeros(lhs.shape, lhs.dtype), jnp.zeros(rhs_GKN.shape, f32)),
                                     (src_TM, tile_group_T, used_T))
    return d_lhs, d_rhs.astype(rhs_GKN.dtype), None, None, None


segment_matmul.defvjp(_segment_matmul_fwd, _segment_matmul_bwd)


def gmm_segments(lhs, rhs, group_sizes, *, active_groups=None, active_k=None, active_n=None,
                 preferred_element_type=jnp.float32, precision=None, tile: int | None = None):
    """lhs [m, k] (rows sorted by group) x rhs [g, k, n] -> [m, n], as `gmm_reference`: rows past
    Σ group_sizes give 0; the elastic `active_*` arguments mask k, n and groups the same way."""
    lhs, rhs = gmm_checked_masked(lhs, rhs, group_sizes, active_groups, active_k, active_n)
    m, g = lhs.shape[0], rhs.shape[0]
    tm = segment_tile(m, g) if tile is None else int(tile)
    tg, used, src = segment_layout(group_sizes, m, g, tm)
    return segment_matmul(lhs, rhs, src, tg, used, HIGHEST if precision is None else precision,
                          jnp.dtype(preferred_element_type))
