"""Grouped matmul as tile-padded sorted segments: the XLA path of `gmm` on CPU.

`jax.lax.ragged_dot` on the CPU backend lowers densely: it builds an [m, g·k] masked copy of lhs
and multiplies it by all g groups' weights, g times the useful FLOPs plus an m x g·k temporary
(profiled in BUILD_NOTES.md, issue 17). Here each group's rows (lhs is sorted by group) are cut
into tiles of `tm` rows, the last tile of a group padded with a zero row, so every tile belongs
to one group; one batched matmul [tiles, tm, k] x rhs[group of tile] [tiles, k, n] computes
them all. No capacity, nothing dropped: a static bound on the tile count holds for any group
sizes, Σ_g ceil(s_g / tm) <= m // tm + g. The waste is at most g·tm padded rows plus the gather
of one [k, n] weight per tile.
"""
from __future__ import annotations

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


def gmm_segments(lhs, rhs, group_sizes, *, active_groups=None, active_k=None, active_n=None,
                 preferred_element_type=jnp.float32, precision=None, tile: int | None = None):
    """lhs [m, k] (rows sorted by group) x rhs [g, k, n] -> [m, n], as `gmm_reference`: rows past
    Σ group_sizes give 0; the elastic `active_*` arguments mask k, n and groups the same way."""
    lhs, rhs = gmm_checked_masked(lhs, rhs, group_sizes, active_groups, active_k, active_n)
    m, k = lhs.shape
    g, _, n = rhs.shape
    tm = segment_tile(m, g) if tile is None else int(tile)
    n_tiles = m // tm + g
    sizes = group_sizes.astype(jnp.int32)
    row_end = jnp.cumsum(sizes)
    row_start = row_end - sizes
    tiles = (sizes + tm - 1) // tm
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    # every padded slot (tile t, row r): its group, its source row (m = the appended zero row)
    tile_group = jnp.searchsorted(tile_end, jnp.arange(n_tiles, dtype=jnp.int32), side="right")   # g: unused
    tg = jnp.minimum(tile_group, g - 1)
    local = (jnp.arange(n_tiles, dtype=jnp.int32) - tile_start[tg])[:, None] * tm + jnp.arange(tm, dtype=jnp.int32)
    src = jnp.where((tile_group < g)[:, None] & (local < sizes[tg][:, None]), row_start[tg][:, None] + local, m)
    lhs_TMK = jnp.concatenate([lhs, jnp.zeros((1, k), lhs.dtype)])[src.reshape(-1)].reshape(n_tiles, tm, k)
    out_TMN = jnp.einsum("tmk,tkn->tmn", lhs_TMK, rhs[tg], precision=HIGHEST if precision is None else precision,
                         preferred_element_type=preferred_element_type)
    # every row of lhs back from its slot; rows past Σ sizes -> 0
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(row_end, rows, side="right"), g - 1)
    slot = tile_start[row_group] * tm + rows - row_start[row_group]
    out = out_TMN.reshape(n_tiles * tm, n)[slot]
    return jnp.where((rows < row_end[-1])[:, None], out, jnp.zeros((), out.dtype))
