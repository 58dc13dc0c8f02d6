"""Grouped matmul for MoE (megablox-style) as Pallas kernels, with custom_vjp, elastic-aware.

  out[r, :] = lhs[r, :] @ rhs[group(r)]          lhs [m, k] rows sorted by group, rhs [G, k, n]
  d lhs     = gmm(d out, rhs^T)                   (transpose_rhs: no copy of the weights)
  d rhs[g]  = lhs[rows_g]^T @ d out[rows_g]       (tgmm, the transposed grouped matmul)

Group metadata (`group_metadata`, XLA): the m-tiles each group touches, listed in row order, so
one grid axis enumerates the (group, m-tile) pairs; a tile shared by two groups is visited once
per group and each visit writes only its group's rows. Rows past sum(group_sizes) form a tail
pseudo-group that is never active (ragged_dot semantics: those rows are zero).

Elastic arguments (ints or traced int32 scalars): only groups < active_groups, reduction index
< active_k and output columns < active_n take part; everything else is exactly zero. Tiles of
inactive groups, k-tiles past active_k and n-tiles past active_n do no loads and no matmul
(the "tpu" variant also clamps their index maps onto the previous block, so no DMA either);
they only store zeros.

Variants (see _common): "gpu" = Triton style (grid (tiles, n-tiles); fori_loop over k with
masked tile loads from whole-array refs and masked stores, so shared tiles never race);
"tpu" = Mosaic / megablox style (PrefetchScalarGridSpec, grid (n, tiles, k) with a VMEM f32
accumulator). Ragged edges (m, k, n not multiples of the tiles) are masked, never padded, so
the weights are not copied.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import (as_i32_scalar, cdiv, compiler_params, dot, f32, meta_pallas_call,
                      next_pow2, resolve_lowering)


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


# ----------------------------------------------------------------------------- metadata

def group_metadata(group_sizes, m: int, tm: int, active_groups, *, tail: bool, visit_empty: bool):
    """-> (offsets [G'+1], group_ids [T], m_tile_ids [T], num_tiles, num_active_tiles), T static.

    G' = G (+1 tail pseudo-group holding rows past the sum). Step t < num_tiles visits m-tile
    m_tile_ids[t] for group group_ids[t]; steps are in row order, so a tile's visits are
    consecutive. Steps of groups < active_groups come first (num_active_tiles of them).
    Steps >= num_tiles repeat the last visit (padding of the static grid).
    """
    gs = group_sizes.astype(jnp.int32)
    G = gs.shape[0]
    ends = jnp.minimum(jnp.cumsum(gs), m)
    if tail:
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    tiles_m = max(1, cdiv(m, tm))
    first = jnp.minimum(starts // tm, tiles_m - 1)
    ntiles = jnp.where(sizes > 0, cdiv(ends, tm) - starts // tm, 1 if visit_empty else 0)
    T = tiles_m + sizes.shape[0] - 1   # sum of the per-group tile spans is at most this
    cum = jnp.cumsum(ntiles)
    num_tiles = cum[-1]
    t = jnp.minimum(jnp.arange(T, dtype=jnp.int32), jnp.maximum(num_tiles - 1, 0))
    # group of step t = #groups whose cumulative tile count is <= t (a compare-sum, no loop)
    gid = jnp.minimum(jnp.sum(cum[None, :] <= t[:, None], axis=1), sizes.shape[0] - 1).astype(jnp.int32)
    tile = (first[gid] + t - (cum[gid] - ntiles[gid])).astype(jnp.int32)
    ag = jnp.asarray(active_groups, jnp.int32)
    num_active = jnp.where(ag > 0, cum[jnp.maximum(ag - 1, 0)], 0).astype(jnp.int32)
    return offsets, gid, tile, num_tiles.astype(jnp.int32), num_active


def _tiles(variant, m, k, n, tiling):
    """Tile sizes: user tiling or defaults; Triton needs powers of two >= 16, Mosaic (8, 128)."""
    if variant == "gpu":
        tm, tk, tn = tiling or (64, 64, 64)
        fit = lambda t, d: max(16, min(next_pow2(t), next_pow2(d)))
        return fit(tm, m), fit(tk, k), fit(tn, n)
    tm, tk, tn = tiling or (128, 128, 128)
    tm = min(tm, max(8, cdiv(m, 8) * 8))
    tk = k if tk >= k else tk       # full dim, or a multiple of 128 on a real TPU
    tn = n if tn >= n else tn
    return tm, tk, tn


# ----------------------------------------------------------------------------- gmm kernels

def _gmm_gpu_kernel(off_ref, gid_ref, tile_ref, sc_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn,
                    m, n, mm, transpose_rhs):
    """Program (t, j): rows of group gid[t] in m-tile tile[t], columns tile j; k loop inside."""
    from jax.experimental.pallas import triton as pltriton
    t, nj = pl.program_id(0), pl.program_id(1)
    num_tiles, ag, ak, an = sc_ref[0], sc_ref[1], sc_ref[2], sc_ref[3]

    @pl.when(t < num_tiles)
    def _():
        g = gid_ref[t]
        r0, c0 = tile_ref[t] * tm, nj * tn
        rows, cols = r0 + _iota((tm, tn), 0), c0 + _iota((tm, tn), 1)
        store_mask = (rows >= off_ref[g]) & (rows < off_ref[g + 1]) & (cols < n)
        out_view = out_ref.at[pl.ds(r0, tm), pl.ds(c0, tn)]
        live = (g < ag) & (c0 < an)

        @pl.when(live)
        def _():
            def body(i, acc):
                k0 = i * tk
                a = pltriton.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)],
                                  mask=(r0 + _iota((tm, tk), 0) < m) & (k0 + _iota((tm, tk), 1) < ak),
                                  other=0).astype(mm)
                if transpose_rhs:   # rhs [G, n, k] viewed as [G, k, n]^T: tile [tn, tk]
                    bmask = (c0 + _iota((tn, tk), 0) < an) & (k0 + _iota((tn, tk), 1) < ak)
                    b = pltriton.load(rhs_ref.at[g, pl.ds(c0, tn), pl.ds(k0, tk)], mask=bmask, other=0)
                    return acc + dot(a, b.astype(mm), ((1,), (1,)))
                bmask = (k0 + _iota((tk, tn), 0) < ak) & (c0 + _iota((tk, tn), 1) < an)
                b = pltriton.load(rhs_ref.at[g, pl.ds(k0, tk), pl.ds(c0, tn)], mask=bmask, other=0)
                return acc + dot(a, b.astype(mm))
            acc = jax.lax.fori_loop(0, cdiv(ak, tk), body, jnp.zeros((tm, tn), f32))
            pltriton.store(out_view, acc.astype(out_ref.dtype), mask=store_mask)

        @pl.when(jnp.logical_not(live))
        def _():
            pltriton.store(out_view, jnp.zeros((tm, tn), out_ref.dtype), mask=store_mask)


def _gmm_tpu_kernel(off_ref, gid_ref, tile_ref, sc_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                    tm, tk, tn, mm, transpose_rhs, tiles_k):
    """Megablox gmm step (j, t, kk): acc += lhs tile @ rhs tile; masked store at the last kk."""
    nj, t, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_tiles, ag, ak, an = sc_ref[0], sc_ref[1], sc_ref[2], sc_ref[3]
    g = gid_ref[t]
    live = (t < num_tiles) & (g < ag) & (nj * tn < an)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    @pl.when(live & (kk * tk < ak))
    def _():
        # masks in f32 (no bf16 VPU on older TPUs), like megablox; also hides ragged-edge garbage
        a = lhs_ref[...].astype(f32)
        a = jnp.where(kk * tk + _iota(a.shape, 1) < ak, a, 0).astype(mm)
        b = rhs_ref[...].astype(f32)
        if transpose_rhs:   # [tn, tk]
            b = jnp.where((kk * tk + _iota(b.shape, 1) < ak) & (nj * tn + _iota(b.shape, 0) < an), b, 0)
            acc_ref[...] += dot(a, b.astype(mm), ((1,), (1,)))
        else:               # [tk, tn]
            b = jnp.where((kk * tk + _iota(b.shape, 0) < ak) & (nj * tn + _iota(b.shape, 1) < an), b, 0)
            acc_ref[...] += dot(a, b.astype(mm))

    @pl.when((kk == tiles_k - 1) & (t < num_tiles))
    def _():
        rows = tile_ref[t] * tm + _iota((tm, tn), 0)
        mask = (rows >= off_ref[g]) & (rows < off_ref[g + 1])
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(f32)).astype(out_ref.dtype)


def _gmm_call(lhs, rhs, group_sizes, ag, ak, an, *, out_dtype, transpose_rhs, variant, interpret,
              tiling):
    """out [m, n] = grouped lhs @ rhs (or rhs^T per group). ag/ak/an: int32 scalars (clipped)."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    mm = jnp.result_type(lhs.dtype, rhs.dtype)
    tm, tk, tn = _tiles(variant, m, k, n, tiling)
    off, gid, tile, num_tiles, num_active = group_metadata(group_sizes, m, tm, ag, tail=True,
                                                           visit_empty=False)
    T = gid.shape[0]
    tiles_n, tiles_k = cdiv(n, tn), max(1, cdiv(k, tk))
    scal = jnp.stack([num_tiles, ag, ak, an, num_active]).astype(jnp.int32)
    meta = [off, gid, tile, scal]
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    flops = 2 * m * k * n
    cost = pl.CostEstimate(flops=flops, transcendentals=0,
                           bytes_accessed=lhs.size * lhs.dtype.itemsize * tiles_n
                           + rhs.size * rhs.dtype.itemsize + m * n * jnp.dtype(out_dtype).itemsize)
    if variant == "gpu":
        kern = functools.partial(_gmm_gpu_kernel, tm=tm, tk=tk, tn=tn, m=m, n=n, mm=mm,
                                 transpose_rhs=transpose_rhs)
        call = meta_pallas_call(
            kern, variant=variant, interpret=interpret, grid=(T, tiles_n), meta=meta,
            in_specs=[pl.no_block_spec, pl.no_block_spec], out_specs=pl.no_block_spec,
            out_shape=out_shape, name="gmm", cost_estimate=cost,
            params=compiler_params(variant, interpret, num_dims=2, num_warps=4, num_stages=3))
        return call(lhs, rhs)

    def clamp(t, kk, nj, sc):
        """Inactive steps reuse the previous block index (no DMA): t, k, n clamped."""
        kl = jnp.maximum(cdiv(sc[2], tk), 1) - 1
        nl = jnp.maximum(cdiv(sc[3], tn), 1) - 1
        tl = jnp.maximum(sc[4], 1) - 1
        dead = (t >= sc[4]) | (nj > nl)
        return jnp.where(dead, tl, t), jnp.where(dead, kl, jnp.minimum(kk, kl)), jnp.minimum(nj, nl)

    def lhs_map(nj, t, kk, off_r, gid_r, tile_r, sc):
        te, ke, _ = clamp(t, kk, nj, sc)
        return tile_r[te], ke

    def rhs_map(nj, t, kk, off_r, gid_r, tile_r, sc):
        te, ke, ne = clamp(t, kk, nj, sc)
        return (gid_r[te], ne, ke) if transpose_rhs else (gid_r[te], ke, ne)

    def out_map(nj, t, kk, off_r, gid_r, tile_r, sc):
        return tile_r[t], nj

    from jax.experimental.pallas import tpu as pltpu
    kern = functools.partial(_gmm_tpu_kernel, tm=tm, tk=tk, tn=tn, mm=mm,
                             transpose_rhs=transpose_rhs, tiles_k=tiles_k)
    call = meta_pallas_call(
        kern, variant=variant, interpret=interpret, grid=(tiles_n, T, tiles_k), meta=meta,
        in_specs=[((tm, tk), lhs_map), ((None, tn, tk) if transpose_rhs else (None, tk, tn), rhs_map)],
        out_specs=((tm, tn), out_map), out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((tm, tn), f32)], name="gmm", cost_estimate=cost,
        params=compiler_params(variant, interpret, num_dims=3,
                               semantics=("parallel", "arbitrary", "arbitrary")))
    return call(lhs, rhs)


# ----------------------------------------------------------------------------- tgmm kernels

def _tgmm_gpu_kernel(off_ref, sc_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn, k, n, mm):
    """Program (g, i, j): out[g, k-tile i, n-tile j] = sum over the group's row tiles."""
    from jax.experimental.pallas import triton as pltriton
    g, ki, nj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ag, ak, an = sc_ref[1], sc_ref[2], sc_ref[3]
    k0, c0 = ki * tk, nj * tn
    start, end = off_ref[g], off_ref[g + 1]
    out_view = out_ref.at[g, pl.ds(k0, tk), pl.ds(c0, tn)]
    store_mask = (k0 + _iota((tk, tn), 0) < k) & (c0 + _iota((tk, tn), 1) < n)
    live = (g < ag) & (k0 < ak) & (c0 < an)

    @pl.when(live)
    def _():
        def body(i, acc):
            r0 = start + i * tm
            ra = r0 + _iota((tm, tk), 0)
            a = pltriton.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)],
                              mask=(ra < end) & (k0 + _iota((tm, tk), 1) < ak), other=0)
            rd = r0 + _iota((tm, tn), 0)
            d = pltriton.load(dout_ref.at[pl.ds(r0, tm), pl.ds(c0, tn)],
                              mask=(rd < end) & (c0 + _iota((tm, tn), 1) < an), other=0)
            return acc + dot(a.astype(mm), d.astype(mm), ((0,), (0,)))
        acc = jax.lax.fori_loop(0, cdiv(end - start, tm), body, jnp.zeros((tk, tn), f32))
        pltriton.store(out_view, acc.astype(out_ref.dtype), mask=store_mask)

    @pl.when(jnp.logical_not(live))
    def _():
        pltriton.store(out_view, jnp.zeros((tk, tn), out_ref.dtype), mask=store_mask)


def _tgmm_tpu_kernel(off_ref, gid_ref, tile_ref, sc_ref, lhs_ref, dout_ref, out_ref, acc_ref, *,
                     tm, tk, tn, mm, T):
    """Megablox tgmm step (j, i, t): accumulate the group's rows of this m-tile; store when the
    group changes (every group, empty or inactive, is visited at least once -> zeros)."""
    nj, ki, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_tiles, ag, ak, an = sc_ref[0], sc_ref[1], sc_ref[2], sc_ref[3]
    g = gid_ref[t]
    valid = t < num_tiles
    first = valid & ((t == 0) | (gid_ref[jnp.maximum(t - 1, 0)] != g))
    last = valid & ((t == num_tiles - 1) | (gid_ref[jnp.minimum(t + 1, T - 1)] != g))
    live = valid & (g < ag) & (ki * tk < ak) & (nj * tn < an)

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    @pl.when(live)
    def _():
        start, end = off_ref[g], off_ref[g + 1]
        a = lhs_ref[...].astype(f32)                       # [tm, tk]
        rows = tile_ref[t] * tm + _iota(a.shape, 0)
        a = jnp.where((rows >= start) & (rows < end) & (ki * tk + _iota(a.shape, 1) < ak), a, 0)
        d = dout_ref[...].astype(f32)                      # [tm, tn]
        rows = tile_ref[t] * tm + _iota(d.shape, 0)
        d = jnp.where((rows >= start) & (rows < end) & (nj * tn + _iota(d.shape, 1) < an), d, 0)
        acc_ref[...] += dot(a.astype(mm), d.astype(mm), ((0,), (0,)))

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_call(lhs, dout, group_sizes, ag, ak, an, *, out_dtype, variant, interpret, tiling):
    """out [G, k, n]: out[g] = lhs[rows_g]^T @ dout[rows_g] (zero outside the active window)."""
    m, k = lhs.shape
    n = dout.shape[1]
    G = group_sizes.shape[0]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((G, k, n), out_dtype)
    mm = jnp.result_type(lhs.dtype, dout.dtype)
    tm, tk, tn = _tiles(variant, m, k, n, tiling)
    off, gid, tile, num_tiles, num_active = group_metadata(group_sizes, m, tm, ag, tail=False,
                                                           visit_empty=True)
    T = gid.shape[0]
    tiles_k, tiles_n = cdiv(k, tk), cdiv(n, tn)
    scal = jnp.stack([num_tiles, ag, ak, an, num_active]).astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct((G, k, n), out_dtype)
    cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=lhs.size * lhs.dtype.itemsize * tiles_n
                           + dout.size * dout.dtype.itemsize * tiles_k
                           + G * k * n * jnp.dtype(out_dtype).itemsize)
    if variant == "gpu":
        kern = functools.partial(_tgmm_gpu_kernel, tm=tm, tk=tk, tn=tn, k=k, n=n, mm=mm)
        call = meta_pallas_call(
            kern, variant=variant, interpret=interpret, grid=(G, tiles_k, tiles_n),
            meta=[off, scal], in_specs=[pl.no_block_spec, pl.no_block_spec],
            out_specs=pl.no_block_spec, out_shape=out_shape, name="tgmm", cost_estimate=cost,
            params=compiler_params(variant, interpret, num_dims=3, num_warps=4, num_stages=3))
        return call(lhs, dout)

    def clamp(t, ki, nj, sc):
        kl = jnp.maximum(cdiv(sc[2], tk), 1) - 1
        nl = jnp.maximum(cdiv(sc[3], tn), 1) - 1
        tl = jnp.maximum(sc[4], 1) - 1
        dead = (t >= sc[4]) | (ki > kl) | (nj > nl)
        return jnp.where(dead, tl, t), jnp.minimum(ki, kl), jnp.minimum(nj, nl)

    def lhs_map(nj, ki, t, off_r, gid_r, tile_r, sc):
        te, ke, _ = clamp(t, ki, nj, sc)
        return tile_r[te], ke

    def dout_map(nj, ki, t, off_r, gid_r, tile_r, sc):
        te, _, ne = clamp(t, ki, nj, sc)
        return tile_r[te], ne

    def out_map(nj, ki, t, off_r, gid_r, tile_r, sc):
        return gid_r[t], ki, nj

    from jax.experimental.pallas import tpu as pltpu
    kern = functools.partial(_tgmm_tpu_kernel, tm=tm, tk=tk, tn=tn, mm=mm, T=T)
    call = meta_pallas_call(
        kern, variant=variant, interpret=interpret, grid=(tiles_n, tiles_k, T),
        meta=[off, gid, tile, scal],
        in_specs=[((tm, tk), lhs_map), ((tm, tn), dout_map)],
        out_specs=((None, tk, tn), out_map), out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((tk, tn), f32)], name="tgmm", cost_estimate=cost,
        params=compiler_params(variant, interpret, num_dims=3,
                               semantics=("parallel", "arbitrary", "arbitrary")))
    return call(lhs, dout)


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg, lhs, rhs, group_sizes, ag, ak, an):
    out_dtype, variant, interpret, tiling = cfg
    return _gmm_call(lhs, rhs, group_sizes, ag, ak, an, out_dtype=out_dtype, transpose_rhs=False,
                     variant=variant, interpret=interpret, tiling=tiling)


def _gmm_fwd(cfg, lhs, rhs, group_sizes, ag, ak, an):
    return _gmm(cfg, lhs, rhs, group_sizes, ag, ak, an), (lhs, rhs, group_sizes, ag, ak, an)


def _gmm_bwd(cfg, res, dout):
    _, variant, interpret, tiling = cfg
    lhs, rhs, group_sizes, ag, ak, an = res
    # d lhs [m, k] = dout @ rhs[g]^T: reduction over n (active an), output columns k (active ak).
    dlhs = _gmm_call(dout, rhs, group_sizes, ag, an, ak, out_dtype=lhs.dtype, transpose_rhs=True,
                     variant=variant, interpret=interpret, tiling=tiling)
    drhs = _tgmm_call(lhs, dout, group_sizes, ag, ak, an, out_dtype=rhs.dtype, variant=variant,
                      interpret=interpret, tiling=tiling)
    return dlhs, drhs, None, None, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_pallas(lhs, rhs, group_sizes, *, active_groups=None, active_k=None, active_n=None,
               preferred_element_type=None, tiling=None, variant=None, interpret=None):
    """Pallas grouped matmul, same contract as `reference.gmm_reference` (differentiable in
    lhs and rhs). `tiling` (tm, tk, tn); `variant` "gpu" | "tpu", `interpret` from the platform."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm: need lhs [m, k] and rhs [g, k, n] with equal k, got {lhs.shape}, {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm: group_sizes must be [g] = {(rhs.shape[0],)}, got {group_sizes.shape}")
    G, k, n = rhs.shape
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    variant, interpret = resolve_lowering(variant, interpret)
    cfg = (out_dtype, variant, interpret, None if tiling is None else tuple(int(t) for t in tiling))
    return _gmm(cfg, lhs, rhs, group_sizes.astype(jnp.int32), as_i32_scalar(active_groups, G, G),
                as_i32_scalar(active_k, k, k), as_i32_scalar(active_n, n, n))
