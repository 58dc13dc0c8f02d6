"""Mamba2 SSD chunked scan as Pallas kernels, forward and backward (jax.custom_vjp), elastic-aware.

Notation as in reference.py (x_BLHP values, dt_BLH steps, A_H decay, B_BLGN / C_BLGN
projections, state_BHPN); per chunk c of length Q with in-chunk log-decay cumsum
cs_i = sum_{t<=i} dt_t A (the Mamba2 Triton decomposition, state-spaces/mamba):

  chunk_state  S_c   = sum_j w_j x_j (x) B_j,   w_j = exp(cs_last - cs_j) dt_j [j in last doc]
  state_pass   H_c+1 = S_c + keep_c exp(cs_last) H_c          (XLA lax.scan over chunks)
  chunk_scan   y_i   = sum_{j<=i, same doc} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j
                       + e_i C_i.H_c + D x_i,   e_i = exp(cs_i) [i in carried doc]

Kernels (grid (batch, group, chunk), all axes parallel): `_state_kernel`, `_scan_kernel`
(forward), `_dstate_kernel` (d H from the output term) and `_bwd_kernel` (dx, dB, dC and the
d dt / d cs vectors) for the backward; the chunk-to-chunk recurrences (forward and reverse)
and the O(b h l) vector prologue / epilogue stay in XLA. One program handles one group's
chunk: C.B^T is computed once per group and reused by the group's heads, which are walked by a
`fori_loop` over the *active* heads only (`active_heads`, a traced scalar read from the
metadata); inactive heads get zero outputs and no matmul. On GPU (Triton) their inputs are not
loaded either; on TPU the group's input block is DMA'd whole (blocks are per group), so there
only the compute is skipped.

Layouts inside the kernels are head-major (x [b, h, L, p], B/C [b, g, L, n], per-token
vectors as [.., Q, 1] columns and [.., 1, Q] rows, states [nc, b, h, p, n]) so every block's
last two dims are either full or (8,128)-friendly on TPU, and every loaded tile is 2-D.
The "gpu" (Triton) variant pads p, n and heads-per-group to powers of two (Triton needs
power-of-two tiles); the padded heads sit after the active ones and are skipped.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import (cdiv, compiler_params, dot, f32, meta_pallas_call, next_pow2,
                      resolve_lowering)
from .reference import _check_ssd_shapes


# ----------------------------------------------------------------------------- layout helpers

def _pad_to(t, axis, size, value=0):
    if t.shape[axis] == size:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, size - t.shape[axis])
    return jnp.pad(t, widths, constant_values=value)


def _pad_heads(t, axis, g, hpg, hpg2):
    """Pad heads-per-group along `axis` (heads are group-major) from hpg to hpg2 with zeros."""
    if hpg == hpg2:
        return t
    shape = t.shape
    t = t.reshape(shape[:axis] + (g, hpg) + shape[axis + 1:])
    t = _pad_to(t, axis + 1, hpg2)
    return t.reshape(shape[:axis] + (g * hpg2,) + shape[axis + 1:])


def _unpad_heads(t, axis, g, hpg, hpg2):
    if hpg == hpg2:
        return t
    shape = t.shape
    t = t.reshape(shape[:axis] + (g, hpg2) + shape[axis + 1:])
    t = jax.lax.slice_in_dim(t, 0, hpg, axis=axis + 1)
    return t.reshape(shape[:axis] + (g * hpg,) + shape[axis + 1:])


class _Dims:
    """Static sizes: real (b, l, h, p, g, n, hpg) and kernel-side (H, P, N, hpg2, Q, nc, Lp)."""

    def __init__(self, x, B, Q, variant):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        self.hpg = self.h // self.g
        self.Q = int(Q)
        self.nc = max(1, cdiv(self.l, self.Q))
        self.Lp = self.nc * self.Q
        if variant == "gpu":  # Triton: power-of-two tiles, dots need >= 16
            self.P, self.N = max(16, next_pow2(self.p)), max(16, next_pow2(self.n))
            self.hpg2 = next_pow2(self.hpg)
        else:
            self.P, self.N, self.hpg2 = self.p, self.n, self.hpg
        self.H = self.g * self.hpg2


def _prep(d: _Dims, x, dt, A, B, C, D, init, seq_idx, act):
    """XLA prologue: pad, go head-major, in-chunk cumsums and the per-token decay vectors."""
    b, g, Q, nc, Lp, H = d.b, d.g, d.Q, d.nc, d.Lp, d.H
    ph = functools.partial(_pad_heads, g=g, hpg=d.hpg, hpg2=d.hpg2)
    x_h = ph(_pad_to(_pad_to(x, 1, Lp), 3, d.P), axis=2).transpose(0, 2, 1, 3)      # [b,H,Lp,P]
    B_g = _pad_to(_pad_to(B, 1, Lp), 3, d.N).transpose(0, 2, 1, 3)                  # [b,g,Lp,N]
    C_g = _pad_to(_pad_to(C, 1, Lp), 3, d.N).transpose(0, 2, 1, 3)
    dt_c = ph(_pad_to(dt.astype(f32), 1, Lp), axis=2).transpose(0, 2, 1).reshape(b, H, nc, Q)
    A_h = ph(A.astype(f32), axis=0)
    cs = jnp.cumsum(dt_c * A_h[None, :, None, None], axis=-1)                      # [b,H,nc,Q]

    if seq_idx is None:
        sid = None
        live = inc = None
        keep = jnp.ones((b, nc), f32)
    else:
        s = seq_idx.astype(jnp.int32)
        if Lp > d.l:
            s = jnp.concatenate([s, jnp.repeat(s[:, -1:], Lp - d.l, axis=1)], axis=1)
        sid = s.reshape(b, nc, Q)
        last_doc = sid[:, :, -1]
        carried = jnp.concatenate([sid[:, :1, 0], last_doc[:, :-1]], axis=1)
        keep = (last_doc == carried).astype(f32)
        live = (sid == last_doc[..., None]).astype(f32)[:, None]                    # [b,1,nc,Q]
        inc = (sid == carried[..., None]).astype(f32)[:, None]

    u = jnp.exp(cs[..., -1:] - cs)
    e = jnp.exp(cs)
    if sid is not None:
        u, e = u * live, e * inc
    w = u * dt_c
    kd = keep[:, None, :] * jnp.exp(cs[..., -1])                                    # [b,H,nc]

    hpg_act = jnp.clip(jnp.asarray(d.hpg if act is None else act, jnp.int32).reshape(()), 0, d.hpg)
    mask_h = (jnp.arange(H) % d.hpg2 < hpg_act).astype(f32)                          # [H]
    D_h = jnp.zeros((H,), f32) if D is None else ph(D.astype(f32), axis=0)
    if init is None:
        H0 = jnp.zeros((b, H, d.P, d.N), f32)
    else:
        H0 = ph(_pad_to(_pad_to(init.astype(f32), 2, d.P), 3, d.N), axis=1)
    H0 = H0 * mask_h[None, :, None, None]
    col = lambda v: v[..., None]           # [b,H,nc,Q,1]
    row = lambda v: v[..., None, :]        # [b,H,nc,1,Q]
    return dict(x_h=x_h, B_g=B_g, C_g=C_g, dt_c=dt_c, A_h=A_h, cs=cs, u_col=col(u), w_col=col(w),
                e_col=col(e), cs_col=col(cs), cs_row=row(cs), dt_row=row(dt_c), kd=kd, sid=sid,
                act=hpg_act.reshape(1), mask_h=mask_h, D_h=D_h, H0=H0)


# ----------------------------------------------------------------------------- specs

def _specs(d: _Dims):
    """(block_shape, index_fn(b, g, c, *meta)) for each kernel-side array layout."""
    hpg, Q, P, N = d.hpg2, d.Q, d.P, d.N
    return dict(
        heads=((None, hpg, Q, P), lambda b, g, c, *_: (b, g, c, 0)),       # [b,H,Lp,P]
        group=((None, None, Q, N), lambda b, g, c, *_: (b, g, c, 0)),      # [b,g,Lp,N]
        col=((None, hpg, None, Q, 1), lambda b, g, c, *_: (b, g, c, 0, 0)),  # [b,H,nc,Q,1]
        row=((None, hpg, None, 1, Q), lambda b, g, c, *_: (b, g, c, 0, 0)),  # [b,H,nc,1,Q]
        state=((None, None, hpg, P, N), lambda b, g, c, *_: (c, b, g, 0, 0)),  # [nc,b,H,P,N]
        sid_col=((None, None, Q, 1), lambda b, g, c, *_: (b, c, 0, 0)),    # [b,nc,Q,1]
        sid_row=((None, None, 1, Q), lambda b, g, c, *_: (b, c, 0, 0)),    # [b,nc,1,Q]
    )


def _causal(Q, sidc_ref, sidr_ref):
    i = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    mask = i >= j
    if sidc_ref is not None:
        mask = jnp.logical_and(mask, sidc_ref[...] == sidr_ref[...])
    return mask


def _zero_rest(n_act, hpg, refs):
    """Inactive heads j in [n_act, hpg): zero outputs, nothing loaded, no matmul."""
    def body(j, carry):
        for r in refs:
            r[j] = jnp.zeros(r.shape[1:], r.dtype)
        return carry
    jax.lax.fori_loop(n_act, hpg, body, None)


# ----------------------------------------------------------------------------- kernels

def _state_kernel(act_ref, x_ref, B_ref, w_ref, S_ref, *, hpg, mm):
    """S_j[p, n] = sum_t (w_t x_t)[p] B_t[n] for the active heads j of this group's chunk."""
    n_act = act_ref[0]

    @pl.when(n_act > 0)
    def _():
        Bm = B_ref[...].astype(mm)

        def body(j, carry):
            xw = (x_ref[j].astype(f32) * w_ref[j]).astype(mm)                       # [Q,P]
            S_ref[j] = dot(xw, Bm, ((0,), (0,)))                                    # [P,N]
            return carry
        jax.lax.fori_loop(0, n_act, body, None)
    _zero_rest(n_act, hpg, [S_ref])


def _scan_kernel(act_ref, D_ref, x_ref, B_ref, C_ref, csc_ref, csr_ref, dtr_ref, e_ref, H_ref,
                 *rest, hpg, Q, mm, has_D, has_seq):
    """y_j = (C B^T o L o dt) x_j + e o (C H_j^T) + D_j x_j for the active heads j."""
    if has_seq:
        sidc_ref, sidr_ref, y_ref = rest
    else:
        (y_ref,), sidc_ref, sidr_ref = rest, None, None
    gi = pl.program_id(1)
    n_act = act_ref[0]

    @pl.when(n_act > 0)
    def _():
        Cm = C_ref[...].astype(mm)
        CB = dot(Cm, B_ref[...].astype(mm), ((1,), (1,)))                           # [Q,Q]
        causal = _causal(Q, sidc_ref, sidr_ref)

        def body(j, carry):
            Lm = jnp.exp(jnp.where(causal, csc_ref[j] - csr_ref[j], -jnp.inf))
            M = CB * Lm * dtr_ref[j]
            xj = x_ref[j]
            y = dot(M.astype(mm), xj.astype(mm))                                     # [Q,P]
            y = y + e_ref[j] * dot(Cm, H_ref[j].astype(mm), ((1,), (1,)))
            if has_D:
                y = y + D_ref[gi * hpg + j] * xj.astype(f32)
            y_ref[j] = y.astype(y_ref.dtype)
            return carry
        jax.lax.fori_loop(0, n_act, body, None)
    _zero_rest(n_act, hpg, [y_ref])


def _dstate_kernel(act_ref, dy_ref, C_ref, e_ref, out_ref, *, hpg, mm):
    """dH_j[p, n] = sum_i (e_i dy_i)[p] C_i[n]: gradient of the chunk-initial state (y_off)."""
    n_act = act_ref[0]

    @pl.when(n_act > 0)
    def _():
        Cm = C_ref[...].astype(mm)

        def body(j, carry):
            dye = (dy_ref[j].astype(f32) * e_ref[j]).astype(mm)
            out_ref[j] = dot(dye, Cm, ((0,), (0,)))
            return carry
        jax.lax.fori_loop(0, n_act, body, None)
    _zero_rest(n_act, hpg, [out_ref])


def _bwd_kernel(act_ref, D_ref, x_ref, dy_ref, B_ref, C_ref, csc_ref, csr_ref, dtr_ref, e_ref,
                u_ref, w_ref, H_ref, dS_ref, *rest, hpg, Q, mm, has_D, has_seq):
    """Per active head j (M = CB o L o dt, M' = CB o L, dM = dy x^T):
      dx = M^T dy + w o (B dS^T) + D dy
      dC += (dM o L o dt) B + e o (dy H);   dB += (dM o L o dt)^T C + w o (x dS)
      d dt: colsum(dM o M') + (rowsum((x dS) o B)) o u
      d cs: rowsum(dM o M) - colsum(dM o M) + e o rowsum(dy o C H^T) - dw o w (+ sum at last)
    dB / dC are accumulated over the group's heads in-kernel (one [Q, N] f32 block per group).
    """
    if has_seq:
        sidc_ref, sidr_ref, *outs = rest
    else:
        outs, sidc_ref, sidr_ref = rest, None, None
    dx_ref, dB_ref, dC_ref, ddtc_ref, ddtr_ref, dcsc_ref, dcsr_ref, xdy_ref = outs
    gi = pl.program_id(1)
    n_act = act_ref[0]
    N = B_ref.shape[-1]

    @pl.when(n_act > 0)
    def _():
        Bm = B_ref[...].astype(mm)
        Cm = C_ref[...].astype(mm)
        CB = dot(Cm, Bm, ((1,), (1,)))
        causal = _causal(Q, sidc_ref, sidr_ref)
        last = jax.lax.broadcasted_iota(jnp.int32, (Q, 1), 0) == Q - 1

        def body(j, carry):
            dB_acc, dC_acc = carry
            xj = x_ref[j].astype(mm)
            dy = dy_ref[j].astype(mm)
            dtr = dtr_ref[j]
            e, u, w = e_ref[j], u_ref[j], w_ref[j]
            Lm = jnp.exp(jnp.where(causal, csc_ref[j] - csr_ref[j], -jnp.inf))
            Mp = CB * Lm
            M = Mp * dtr
            dM = dot(dy, xj, ((1,), (1,)))                                          # [Q,Q]
            dS = dS_ref[j].astype(mm)
            Hj = H_ref[j].astype(mm)
            dx = dot(M.astype(mm), dy, ((0,), (0,))) + w * dot(Bm, dS, ((1,), (1,)))
            if has_D:
                dx = dx + D_ref[gi * hpg + j] * dy.astype(f32)
            dx_ref[j] = dx.astype(dx_ref.dtype)
            G = dM * M
            dCB = (dM * Lm * dtr).astype(mm)
            xdS = dot(xj, dS)                                                        # [Q,N]
            dw = jnp.sum(xdS * Bm.astype(f32), axis=1, keepdims=True)               # [Q,1]
            dww = dw * w
            CH = dot(Cm, Hj, ((1,), (1,)))                                           # [Q,P]
            de = jnp.sum(dy.astype(f32) * CH, axis=1, keepdims=True)
            dcs = (jnp.sum(G, axis=1, keepdims=True) + de * e - dww
                   + jnp.where(last, jnp.sum(dww, axis=0, keepdims=True), 0.0))
            dcsc_ref[j] = dcs
            dcsr_ref[j] = -jnp.sum(G, axis=0, keepdims=True)
            ddtr_ref[j] = jnp.sum(dM * Mp, axis=0, keepdims=True)
            ddtc_ref[j] = dw * u
            xdy_ref[j] = jnp.sum(xj.astype(f32) * dy.astype(f32), axis=1, keepdims=True)
            dC_acc = dC_acc + dot(dCB, Bm) + e * dot(dy, Hj)
            dB_acc = dB_acc + dot(dCB, Cm, ((0,), (0,))) + w * xdS
            return dB_acc, dC_acc

        zeros = jnp.zeros((Q, N), f32)
        dB_acc, dC_acc = jax.lax.fori_loop(0, n_act, body, (zeros, zeros))
        dB_ref[...] = dB_acc
        dC_ref[...] = dC_acc

    @pl.when(n_act <= 0)
    def _():
        dB_ref[...] = jnp.zeros(dB_ref.shape, dB_ref.dtype)
        dC_ref[...] = jnp.zeros(dC_ref.shape, dC_ref.dtype)
    _zero_rest(n_act, hpg, [dx_ref, ddtc_ref, ddtr_ref, dcsc_ref, dcsr_ref, xdy_ref])


# ----------------------------------------------------------------------------- calls

def _mm_dtype(*ts):
    dt = jnp.result_type(*[t.dtype for t in ts])
    return jnp.bfloat16 if dt == jnp.bfloat16 else (jnp.float16 if dt == jnp.float16 else f32)


def _call(kernel, d, cfg, meta, ins, outs, out_shape, name):
    variant, interpret = cfg[1], cfg[2]
    return meta_pallas_call(
        kernel, variant=variant, interpret=interpret, grid=(d.b, d.g, d.nc), meta=meta,
        in_specs=ins, out_specs=outs, out_shape=out_shape, name=name,
        # TPU: [.., Q, 1] column blocks are lane-padded in VMEM, so raise the scoped limit
        params=compiler_params(variant, interpret, num_dims=3, num_warps=4 if d.Q <= 64 else 8,
                               vmem_limit_bytes=48 * 1024 * 1024))


def _chunk_states(d, cfg, pr, mm):
    sp = _specs(d)
    call = _call(functools.partial(_state_kernel, hpg=d.hpg2, mm=mm), d, cfg, [pr["act"]],
                 [sp["heads"], sp["group"], sp["col"]], sp["state"],
                 jax.ShapeDtypeStruct((d.nc, d.b, d.H, d.P, d.N), f32), "ssd_chunk_state")
    return call(pr["x_h"], pr["B_g"], pr["w_col"])


def _pass_states(S, kd, H0):
    """H_{c+1} = S_c + kd_c H_c (sequential over chunks). -> (final, chunk-initial states)."""
    def step(Hc, inp):
        S_c, kd_c = inp
        return S_c + kd_c[..., None, None] * Hc, Hc
    return jax.lax.scan(step, H0, (S, jnp.moveaxis(kd, 2, 0)))


def _sid_inputs(pr, sp):
    if pr["sid"] is None:
        return [], []
    return [pr["sid"][..., None], pr["sid"][:, :, None, :]], [sp["sid_col"], sp["sid_row"]]


def _forward(cfg, x, dt, A, B, C, D, init, seq_idx, act):
    d = _Dims(x, B, cfg[0], cfg[1])
    pr = _prep(d, x, dt, A, B, C, D, init, seq_idx, act)
    mm = _mm_dtype(x, B, C)
    S = _chunk_states(d, cfg, pr, mm)
    final, Hs = _pass_states(S, pr["kd"], pr["H0"])
    sp = _specs(d)
    sid_in, sid_specs = _sid_inputs(pr, sp)
    kern = functools.partial(_scan_kernel, hpg=d.hpg2, Q=d.Q, mm=mm, has_D=D is not None,
                             has_seq=pr["sid"] is not None)
    call = _call(kern, d, cfg, [pr["act"], pr["D_h"]],
                 [sp["heads"], sp["group"], sp["group"], sp["col"], sp["row"], sp["row"],
                  sp["col"], sp["state"]] + sid_specs,
                 sp["heads"], jax.ShapeDtypeStruct((d.b, d.H, d.Lp, d.P), x.dtype), "ssd_chunk_scan")
    y_h = call(pr["x_h"], pr["B_g"], pr["C_g"], pr["cs_col"], pr["cs_row"], pr["dt_row"],
               pr["e_col"], Hs, *sid_in)
    uh = functools.partial(_unpad_heads, g=d.g, hpg=d.hpg, hpg2=d.hpg2)
    y = uh(y_h.transpose(0, 2, 1, 3), axis=2)[:, :d.l, :, :d.p]
    final = uh(final * pr["mask_h"][None, :, None, None], axis=1)[:, :, :d.p, :d.n]
    return y, final


def _backward(cfg, res, cts):
    x, dt, A, B, C, D, init, seq_idx, act = res
    dy, dfinal = cts
    d = _Dims(x, B, cfg[0], cfg[1])
    pr = _prep(d, x, dt, A, B, C, D, init, seq_idx, act)
    mm = _mm_dtype(x, B, C)
    sp = _specs(d)
    # Recompute the chunk-initial states (cheaper than keeping [nc, b, h, p, n] alive).
    S = _chunk_states(d, cfg, pr, mm)
    _, Hs = _pass_states(S, pr["kd"], pr["H0"])
    ph = functools.partial(_pad_heads, g=d.g, hpg=d.hpg, hpg2=d.hpg2)
    dy_h = ph(_pad_to(_pad_to(dy.astype(x.dtype), 1, d.Lp), 3, d.P), axis=2).transpose(0, 2, 1, 3)
    dfin = ph(_pad_to(_pad_to(dfinal.astype(f32), 2, d.P), 3, d.N), axis=1)
    dfin = dfin * pr["mask_h"][None, :, None, None]

    call = _call(functools.partial(_dstate_kernel, hpg=d.hpg2, mm=mm), d, cfg, [pr["act"]],
                 [sp["heads"], sp["group"], sp["col"]], sp["state"],
                 jax.ShapeDtypeStruct((d.nc, d.b, d.H, d.P, d.N), f32), "ssd_chunk_dstate")
    dHoff = call(dy_h, pr["C_g"], pr["e_col"])

    kd_c = jnp.moveaxis(pr["kd"], 2, 0)                                             # [nc,b,H]

    def rstep(dHn, inp):
        dHoff_c, H_c, kd_cc = inp
        dcl = kd_cc * jnp.sum(H_c * dHn, axis=(-2, -1))
        return dHoff_c + kd_cc[..., None, None] * dHn, (dHn, dcl)
    dH0, (dS, dcl) = jax.lax.scan(rstep, dfin, (dHoff, Hs, kd_c), reverse=True)

    sid_in, sid_specs = _sid_inputs(pr, sp)
    kern = functools.partial(_bwd_kernel, hpg=d.hpg2, Q=d.Q, mm=mm, has_D=D is not None,
                             has_seq=pr["sid"] is not None)
    b, H, nc, Q = d.b, d.H, d.nc, d.Q
    vcol = jax.ShapeDtypeStruct((b, H, nc, Q, 1), f32)
    vrow = jax.ShapeDtypeStruct((b, H, nc, 1, Q), f32)
    out_shape = [jax.ShapeDtypeStruct((b, H, d.Lp, d.P), x.dtype),
                 jax.ShapeDtypeStruct((b, d.g, d.Lp, d.N), f32),
                 jax.ShapeDtypeStruct((b, d.g, d.Lp, d.N), f32), vcol, vrow, vcol, vrow, vcol]
    out_specs = [sp["heads"], sp["group"], sp["group"], sp["col"], sp["row"], sp["col"],
                 sp["row"], sp["col"]]
    call = _call(kern, d, cfg, [pr["act"], pr["D_h"]],
                 [sp["heads"], sp["heads"], sp["group"], sp["group"], sp["col"], sp["row"],
                  sp["row"], sp["col"], sp["col"], sp["col"], sp["state"], sp["state"]] + sid_specs,
                 out_specs, out_shape, "ssd_chunk_scan_bwd")
    dx_h, dB_g, dC_g, ddtc, ddtr, dcsc, dcsr, xdy = call(
        pr["x_h"], dy_h, pr["B_g"], pr["C_g"], pr["cs_col"], pr["cs_row"], pr["dt_row"],
        pr["e_col"], pr["u_col"], pr["w_col"], Hs, dS, *sid_in)

    # XLA epilogue: d cs -> d dA (reverse cumsum within the chunk) -> d dt and d A.
    dcs = dcsc[..., 0] + dcsr[..., 0, :]
    dcs = dcs.at[..., -1].add(jnp.moveaxis(dcl, 0, 2))
    ddA = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), axis=-1), -1)
    ddt = ddtc[..., 0] + ddtr[..., 0, :] + pr["A_h"][None, :, None, None] * ddA     # [b,H,nc,Q]
    dA = jnp.sum(pr["dt_c"] * ddA, axis=(0, 2, 3))

    uh = functools.partial(_unpad_heads, g=d.g, hpg=d.hpg, hpg2=d.hpg2)
    dx = uh(dx_h.transpose(0, 2, 1, 3), axis=2)[:, :d.l, :, :d.p].astype(x.dtype)
    ddt = uh(ddt.reshape(b, H, d.Lp).transpose(0, 2, 1), axis=2)[:, :d.l].astype(dt.dtype)
    dA = uh(dA, axis=0).astype(A.dtype)
    dB = dB_g.transpose(0, 2, 1, 3)[:, :d.l, :, :d.n].astype(B.dtype)
    dC = dC_g.transpose(0, 2, 1, 3)[:, :d.l, :, :d.n].astype(C.dtype)
    dD = None if D is None else uh(jnp.sum(xdy, axis=(0, 2, 3, 4)), axis=0).astype(D.dtype)
    dinit = None
    if init is not None:
        dinit = uh(dH0 * pr["mask_h"][None, :, None, None], axis=1)[:, :, :d.p, :d.n].astype(init.dtype)
    return dx, ddt, dA, dB, dC, dD, dinit, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd(cfg, x, dt, A, B, C, D, init, seq_idx, act):
    return _forward(cfg, x, dt, A, B, C, D, init, seq_idx, act)


def _ssd_fwd(cfg, x, dt, A, B, C, D, init, seq_idx, act):
    return _forward(cfg, x, dt, A, B, C, D, init, seq_idx, act), (x, dt, A, B, C, D, init, seq_idx, act)


_ssd.defvjp(_ssd_fwd, _backward)


def ssd_pallas(x, dt, A, B, C, D=None, *, chunk_size=128, initial_state=None, seq_idx=None,
               active_heads=None, variant=None, interpret=None):
    """Pallas SSD: same contract as `reference.ssd_chunked` -> (y [b,l,h,p] x.dtype, state f32).

    Differentiable (custom_vjp) in x, dt, A, B, C, D and initial_state. `active_heads` (int or
    traced int32 scalar): heads per group that run; the others output zeros and cost no block
    work. `variant` "gpu" | "tpu" and `interpret` default from the platform (_common).
    """
    _check_ssd_shapes(x, dt, A, B, C, D, initial_state, seq_idx)
    variant, interpret = resolve_lowering(variant, interpret)
    cfg = (int(chunk_size), variant, interpret)
    act = None if active_heads is None else jnp.asarray(active_heads, jnp.int32)
    if seq_idx is not None:
        seq_idx = jnp.asarray(seq_idx, jnp.int32)
    return _ssd(cfg, x, dt, A, B, C, D, initial_state, seq_idx, act)
