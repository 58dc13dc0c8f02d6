"""Pure-JAX references for the two hot paths of the hybrid (METHOD §2; the SSD algorithm of state-spaces/mamba).

SSD notation (Mamba2 state-space duality; linear-attention names in brackets):
  x  [b, l, h, p]  values (v)          dt [b, l, h]   step sizes (already softplus'ed / clamped)
  A  [h]           decay rate (< 0)    log-decay per step = dt * A (log alpha)
  B  [b, l, g, n]  input projection (k) C  [b, l, g, n]  output projection (q)
  D  [h]           skip                state [b, h, p, n]
Recurrence (per head, group g(h) = h // (h / g)):
  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T ;   y_t = S_t C_t + D x_t
`seq_idx [b, l]` marks packed documents: the state resets where it changes.
`active_heads` (scalar, may be traced): heads per group that are active; the others output 0.

Two references: `ssd_scan` (sequential lax.scan oracle) and `ssd_chunked` (the chunked SSD
algorithm: intra-chunk matmuls + inter-chunk state passing), which the model uses by default.
`gmm_reference` is `jax.lax.ragged_dot` with the elastic `active_*` arguments applied.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _expand_groups(t_BLGN: jax.Array, num_heads: int) -> jax.Array:
    """[b, l, g, n] -> [b, l, h, n]: each group's projection shared by its h/g heads."""
    g = t_BLGN.shape[2]
    return jnp.repeat(t_BLGN, num_heads // g, axis=2)


def active_head_mask(num_heads: int, num_groups: int, active_heads) -> jax.Array:
    """[h] float mask: the first `active_heads` heads of every group (heads are group-major)."""
    per_group = num_heads // num_groups
    within = jnp.arange(num_heads) % per_group
    if active_heads is None:
        return jnp.ones((num_heads,), jnp.float32)
    return (within < active_heads).astype(jnp.float32)


def _check_ssd_shapes(x, dt, A, B, C, D, initial_state, seq_idx):
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [b, l, h, p], got shape {x.shape}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd: dt must be [b, l, h] = {(b, l, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"ssd: A must be [h] = {(h,)}, got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"ssd: B and C must be [b, l, g, n] with matching shapes, got {B.shape} and {C.shape}")
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssd: heads ({h}) must be divisible by groups ({g})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd: D must be [h] = {(h,)}, got {D.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"ssd: initial_state must be [b, h, p, n] = {(b, h, p, n)}, got {initial_state.shape}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"ssd: seq_idx must be [b, l] = {(b, l)}, got {seq_idx.shape}")


def ssd_scan(x, dt, A, B, C, D=None, *, initial_state=None, seq_idx=None, active_heads=None):
    """Sequential oracle: one lax.scan step per token. Returns (y [b,l,h,p] in x.dtype, state f32)."""
    _check_ssd_shapes(x, dt, A, B, C, D, initial_state, seq_idx)
    b, l, h, p = x.shape
    n = B.shape[-1]
    f32 = jnp.float32
    x32, dt32, A32 = x.astype(f32), dt.astype(f32), A.astype(f32)
    B_h = _expand_groups(B.astype(f32), h)
    C_h = _expand_groups(C.astype(f32), h)
    state0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    if seq_idx is None:
        reset = jnp.zeros((b, l), bool)
    else:
        reset = jnp.concatenate([jnp.zeros((b, 1), bool), seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)

    def step(state, inp):
        x_t, dt_t, B_t, C_t, r_t = inp  # [b,h,p] [b,h] [b,h,n] [b,h,n] [b]
        state = jnp.where(r_t[:, None, None, None], 0.0, state)
        decay = jnp.exp(dt_t * A32)[:, :, None, None]
        state = decay * state + (dt_t[:, :, None, None] * x_t[..., None] * B_t[:, :, None, :])
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t, precision=HIGHEST)
        return state, y_t

    xs = (jnp.moveaxis(x32, 1, 0), jnp.moveaxis(dt32, 1, 0), jnp.moveaxis(B_h, 1, 0),
          jnp.moveaxis(C_h, 1, 0), jnp.moveaxis(reset, 1, 0))
    state, y = jax.lax.scan(step, state0, xs)
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + D.astype(f32)[None, None, :, None] * x32
    mask = active_head_mask(h, B.shape[2], active_heads)
    y = y * mask[None, None, :, None]
    state = state * mask[None, :, None, None]
    return y.astype(x.dtype), state


def padded_seq_ids(seq_idx, batch: int, length: int) -> jax.Array:
    """Document ids [batch, length] for the chunked SSD: `seq_idx` (None: one document) padded at
    the end by repeating its last id, so padding continues the last document."""
    if seq_idx is None:
        return jnp.zeros((batch, length), jnp.int32)
    sid = seq_idx.astype(jnp.int32)
    pad = length - sid.shape[1]
    return sid if pad == 0 else jnp.concatenate([sid, jnp.repeat(sid[:, -1:], pad, axis=1)], axis=1)


def ssd_chunked(x, dt, A, B, C, D=None, *, chunk_size=128, initial_state=None, seq_idx=None,
                active_heads=None):
    """Chunked SSD (Mamba2 `ssd_minimal` decomposition) in f32.

    y = (intra-chunk: (C B^T ∘ L) (dt x)) + (inter-chunk: C · decayed chunk-initial state) + D x,
    with the chunk-initial states from a sequential scan over chunks. Lengths that are not a
    multiple of `chunk_size` are zero-padded (dt = 0 leaves the state unchanged).
    """
    _check_ssd_shapes(x, dt, A, B, C, D, initial_state, seq_idx)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = int(chunk_size)
    f32 = jnp.float32
    nc = -(-l // Q)
    pad = nc * Q - l

    def padt(t, value=0):
        if pad == 0:
            return t
        widths = [(0, 0)] * t.ndim
        widths[1] = (0, pad)
        return jnp.pad(t, widths, constant_values=value)

    x32 = padt(x.astype(f32))
    dt32 = padt(dt.astype(f32))
    B_h = padt(_expand_groups(B.astype(f32), h))
    C_h = padt(_expand_groups(C.astype(f32), h))
    sid = padded_seq_ids(seq_idx, b, nc * Q)

    # [b, c, Q, ...]
    xc = x32.reshape(b, nc, Q, h, p)
    dtc = dt32.reshape(b, nc, Q, h)
    Bc = B_h.reshape(b, nc, Q, h, n)
    Cc = C_h.reshape(b, nc, Q, h, n)
    sc = sid.reshape(b, nc, Q)

    dA = dtc * A.astype(f32)[None, None, None, :]          # [b,c,Q,h]
    dA_cs = jnp.cumsum(dA, axis=2)                          # [b,c,Q,h]
    # Segment sums L[i, j] = exp(cs_i - cs_j) for j <= i (same document), else 0.
    diff = dA_cs[:, :, :, None, :] - dA_cs[:, :, None, :, :]          # [b,c,Qi,Qj,h]
    causal = jnp.tril(jnp.ones((Q, Q), bool))
    same_doc = sc[:, :, :, None] == sc[:, :, None, :]                 # [b,c,Qi,Qj]
    valid = causal[None, None] & same_doc
    L = jnp.where(valid[..., None], jnp.exp(jnp.where(valid[..., None], diff, 0.0)), 0.0)

    xdt = xc * dtc[..., None]                                          # [b,c,Q,h,p]
    CB = jnp.einsum("bcihn,bcjhn->bcijh", Cc, Bc, precision=HIGHEST)
    y_diag = jnp.einsum("bcijh,bcjhp->bcihp", CB * L, xdt, precision=HIGHEST)

    # Per-chunk states from the chunk's own inputs (only the document live at the chunk's end).
    last_doc = sc[:, :, -1]                                            # [b,c]
    decay_to_end = jnp.exp(dA_cs[:, :, -1:, :] - dA_cs)                # [b,c,Q,h]
    live = (sc == last_doc[:, :, None]).astype(f32)                    # [b,c,Q]
    S = jnp.einsum("bcjh,bcjhn,bcjhp->bchpn", decay_to_end * live[..., None], Bc, xdt,
                   precision=HIGHEST)
    chunk_decay = jnp.exp(dA_cs[:, :, -1, :])                          # [b,c,h]

    # Document carried into chunk c: the one live at the end of chunk c-1 (chunk 0: seq_idx[0]).
    carried_doc = jnp.concatenate([sc[:, :1, 0], last_doc[:, :-1]], axis=1)   # [b,c]
    keep_carry = (last_doc == carried_doc).astype(f32)                 # carry survives chunk c?

    state0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    def pass_state(state, inp):
        S_c, decay_c, keep_c = inp
        new = S_c + (keep_c[:, None, None, None] * decay_c[:, :, None, None]) * state
        return new, state  # emit the chunk-initial state

    final_state, init_states = jax.lax.scan(
        pass_state, state0,
        (jnp.moveaxis(S, 1, 0), jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(keep_carry, 1, 0)))
    init_states = jnp.moveaxis(init_states, 0, 1)                      # [b,c,h,p,n]

    in_carried = (sc == carried_doc[:, :, None]).astype(f32)           # [b,c,Q]
    state_decay = jnp.exp(dA_cs) * in_carried[..., None]               # [b,c,Q,h]
    y_off = jnp.einsum("bcihn,bchpn,bcih->bcihp", Cc, init_states, state_decay, precision=HIGHEST)

    y = (y_diag + y_off).reshape(b, nc * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.astype(f32)[None, None, :, None] * x.astype(f32)
    mask = active_head_mask(h, g, active_heads)
    y = y * mask[None, None, :, None]
    final_state = final_state * mask[None, :, None, None]
    return y.astype(x.dtype), final_state


def gmm_checked_masked(lhs, rhs, group_sizes, active_groups=None, active_k=None, active_n=None):
    """Check lhs [m, k] / rhs [g, k, n] / group_sizes [g] and apply the elastic masks (the first
    `active_k` contraction columns, `active_n` output columns, `active_groups` groups): the
    common front of every grouped-matmul implementation."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm: need lhs [m, k] and rhs [g, k, n] with equal k, got {lhs.shape}, {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm: group_sizes must be [g] = {(rhs.shape[0],)}, got {group_sizes.shape}")
    g, k, n = rhs.shape
    if active_k is not None:
        lhs = lhs * (jnp.arange(k) < active_k).astype(lhs.dtype)[None, :]
    if active_n is not None:
        rhs = rhs * (jnp.arange(n) < active_n).astype(rhs.dtype)[None, None, :]
    if active_groups is not None:
        rhs = rhs * (jnp.arange(g) < active_groups).astype(rhs.dtype)[:, None, None]
    return lhs, rhs


def gmm_reference(lhs, rhs, group_sizes, *, active_groups=None, active_k=None, active_n=None,
                  preferred_element_type=jnp.float32, precision=None):
    """Grouped matmul via `jax.lax.ragged_dot`: lhs [m, k] sorted by group, rhs [g, k, n].

    Elastic arguments: only the first `active_groups` groups, the first `active_k` reduction rows
    and the first `active_n` output columns take part; outputs outside them are zero.
    """
    lhs, rhs = gmm_checked_masked(lhs, rhs, group_sizes, active_groups, active_k, active_n)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                             preferred_element_type=preferred_element_type,
                             precision=HIGHEST if precision is None else precision)
    return out
