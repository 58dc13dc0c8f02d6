"""Chunked SSD in a group-major layout: the XLA path of `ssd` on CPU.

The same algorithm as `reference.ssd_chunked` (Mamba2 `ssd_minimal`: intra-chunk (C Bᵀ ∘ L)(dt x)
plus the decayed chunk-initial states), laid out for the CPU backend, which runs a dot_general
fastest with its batch dimensions leading and contiguous (BUILD_NOTES.md, issue 17):
  * every tensor is [b, g, c, h/g, ...] (batch, group, chunk, head within the group), so each
    contraction is a batched matmul over leading axes with no transposed copies in between;
  * C·Bᵀ is computed once per group ([b, g, c, Q, Q]) rather than once per head (the reference
    repeats B and C over the g's h/g heads first);
  * the chunk is a free parameter of the algorithm (the result does not depend on it beyond
    rounding): the CPU dispatch runs it at `CPU_CHUNK`, where the [Q, Q] segment-sum and exp work
    per token (∝ Q) balances the per-chunk state work (∝ 1/Q).
Semantics (seq_idx resets, initial / final state, `active_heads`, padding of odd lengths) are
those of `reference.ssd_chunked`; `reference.ssd_scan` is the oracle both are tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from .reference import _check_ssd_shapes, active_head_mask, padded_seq_ids

HIGHEST = jax.lax.Precision.HIGHEST
CPU_CHUNK = 32


def ssd_chunked_heads(x, dt, A, B, C, D=None, *, chunk_size=CPU_CHUNK, initial_state=None, seq_idx=None,
                      active_heads=None):
    """-> (y [b, l, h, p] in x.dtype, final state [b, h, p, n] f32), as `reference.ssd_chunked`."""
    _check_ssd_shapes(x, dt, A, B, C, D, initial_state, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = int(chunk_size)
    f32 = jnp.float32
    nc = -(-l // Q)
    pad = nc * Q - l

    def padt(t):
        return t if pad == 0 else jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))

    sid = padded_seq_ids(seq_idx, b, nc * Q)
    sc = rearrange(sid, "b (c q) -> b c q", q=Q)

    dt32 = padt(dt.astype(f32))
    # heads are group-major, (g hg): the layout whose per-group prefixes the nested models keep
    xdt = rearrange(padt(x.astype(f32)) * dt32[..., None], "b (c q) (g hg) p -> b g c hg q p", q=Q, g=g)
    cs = jnp.cumsum(rearrange(dt32 * A.astype(f32), "b (c q) (g hg) -> b g c hg q", q=Q, g=g), axis=-1)
    B_GCQN = rearrange(padt(B.astype(f32)), "b (c q) g n -> b g c q n", q=Q)
    C_GCQN = rearrange(padt(C.astype(f32)), "b (c q) g n -> b g c q n", q=Q)

    # intra-chunk: L[i, j] = exp(cs_i - cs_j) for j <= i in the same document, else 0
    valid = jnp.tril(jnp.ones((Q, Q), bool)) & (sc[:, :, :, None] == sc[:, :, None, :])
    valid = valid[:, None, :, None]                                                # [b,1,c,1,Q,Q]
    diff = cs[..., :, None] - cs[..., None, :]                                     # [b,g,c,hg,Q,Q]
    Lm = jnp.where(valid, jnp.exp(jnp.where(valid, diff, 0.0)), 0.0)
    CB = jnp.einsum("bgcin,bgcjn->bgcij", C_GCQN, B_GCQN, precision=HIGHEST)        # once per group
    y_diag = jnp.einsum("bgchij,bgchjp->bgchip", CB[:, :, :, None] * Lm, xdt, precision=HIGHEST)

    # per-chunk states from the chunk's own inputs (only the document live at the chunk's end)
    last_doc = sc[:, :, -1]                                                        # [b,c]
    live = (sc == last_doc[:, :, None]).astype(f32)[:, None, :, None, :]           # [b,1,c,1,Q]
    decay_to_end = jnp.exp(cs[..., -1:] - cs) * live                               # [b,g,c,hg,Q]
    S = jnp.einsum("bgcjn,bgchjp->bgchpn", B_GCQN, xdt * decay_to_end[..., None], precision=HIGHEST)
    chunk_decay = jnp.exp(cs[..., -1])                                             # [b,g,c,hg]
    carried_doc = jnp.concatenate([sc[:, :1, 0], last_doc[:, :-1]], axis=1)       # [b,c]
    keep_carry = (last_doc == carried_doc).astype(f32)                             # [b,c]
    state0 = (jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32))

    def pass_state(state, inp):
        S_c, decay_c, keep_c = inp
        return S_c + (keep_c[:, None, None, None, None] * decay_c[..., None, None]) * state, state

    final, init = jax.lax.scan(pass_state, rearrange(state0, "b (g hg) p n -> b g hg p n", g=g),
                               (jnp.moveaxis(S, 2, 0), jnp.moveaxis(chunk_decay, 2, 0), keep_carry.T))
    init = jnp.moveaxis(init, 0, 2)                                                # [b,g,c,hg,p,n]
    in_carried = (sc == carried_doc[:, :, None]).astype(f32)[:, None, :, None, :]  # [b,1,c,1,Q]
    y_off = (jnp.einsum("bgcin,bgchpn->bgchip", C_GCQN, init, precision=HIGHEST)
             * (jnp.exp(cs) * in_carried)[..., None])

    y = rearrange(y_diag + y_off, "b g c hg q p -> b (c q) (g hg) p")[:, :l]
    if D is not None:
        y = y + D.astype(f32)[None, None, :, None] * x.astype(f32)
    mask = active_head_mask(h, g, active_heads)
    y = y * mask[None, None, :, None]
    final = rearrange(final, "b g hg p n -> b (g hg) p n") * mask[None, :, None, None]
    return y.astype(x.dtype), final
