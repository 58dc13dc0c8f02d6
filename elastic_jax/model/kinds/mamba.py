"""Mamba2 layer kind (pattern char "M")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ... import kernels
from ...config import NemotronHConfig
from ...sharding import constrain, context_mesh, mesh_axes_for
from ..layers import HIGHEST, Context, ElasticLayer, dense


# --------------------------------------------------------------------------- Mamba2
def ssd_partition(batch: int, groups: int):
    """Mesh axes of the SSD kernel's (batch, heads) blocks under the context mesh (None: no mesh):
    batch by the `batch` rule, whole groups of heads by `act_ssm_groups`."""
    if context_mesh() is None:
        return None
    b = mesh_axes_for("batch", batch)
    return b, tuple(a for a in mesh_axes_for("act_ssm_groups", groups) if a not in b)


def _causal_conv(xBC_BLC, w_KC, b_C, ctx_BKC, seg_BL):
    """Depthwise causal conv over [left context (K-1 rows) | new rows]: out[t] = Σ_k w[k]·in[t-K+1+k] + b.
    Taps that cross a document boundary (different segment id) read zero."""
    K = w_KC.shape[0]
    L = xBC_BLC.shape[1]
    full = jnp.concatenate([ctx_BKC.astype(xBC_BLC.dtype), xBC_BLC], axis=1)      # [B, K-1+L, C]
    out = jnp.zeros(xBC_BLC.shape, jnp.float32)
    for k in range(K):
        tap = full[:, k:k + L].astype(jnp.float32)
        if seg_BL is not None and k < K - 1:
            shift = K - 1 - k
            seg_src = jnp.concatenate([jnp.full((seg_BL.shape[0], shift), -1, seg_BL.dtype), seg_BL[:, :-shift]], 1)
            tap = tap * (seg_src == seg_BL)[..., None]
        out = out + tap * w_KC[k].astype(jnp.float32)
    return (out + b_C.astype(jnp.float32)).astype(xBC_BLC.dtype)


def mamba_mixer(p, x_BLD, cfg: NemotronHConfig, el: ElasticLayer | None, ctx: Context, cache):
    B, L, _ = x_BLD.shape
    H = p["A_log"].shape[0]
    P, G, N, K = cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    z = dense(x_BLD, p["z_proj"], ctx.policy)
    xBC = jnp.concatenate([dense(x_BLD, p[n], ctx.policy) for n in ("x_proj", "B_proj", "C_proj")], -1)
    dt = dense(x_BLD, p["dt_proj"], ctx.policy)
    if ctx.valid is not None:
        xBC = xBC * ctx.valid[..., None].astype(xBC.dtype)
    hm = None
    if el is not None:
        hm = (jnp.repeat(el.head_mask, P) if el.channel_mask is None else
              (el.head_mask[:, None] * el.channel_mask[None, :]).reshape(H * P))
    w = jnp.concatenate([p["conv_x"], p["conv_B"], p["conv_C"]], axis=1)
    b = jnp.concatenate([p["conv_x_bias"], p["conv_B_bias"], p["conv_C_bias"]], axis=0)
    if el is not None and el.premask:   # official soft form: x, dt at the projection, conv-x weights/bias
        keep = jnp.concatenate([hm, jnp.ones((xBC.shape[-1] - H * P,), hm.dtype)])
        xBC = xBC * keep.astype(xBC.dtype)
        w, b = w * keep.astype(w.dtype), b * keep.astype(b.dtype)
        dt = dt * el.head_mask.astype(dt.dtype)
    conv_ctx = cache["conv"] if ctx.decoding else jnp.zeros((B, K - 1, xBC.shape[-1]), xBC.dtype)
    seg = None if ctx.decoding else ctx.segment_ids
    conv_out = jax.nn.silu(_causal_conv(xBC, w, b, conv_ctx, seg).astype(jnp.float32)).astype(xBC.dtype)
    xs, Bv, Cv = jnp.split(conv_out, [H * P, H * P + G * N], axis=-1)
    if ctx.valid is not None:  # padding leaves the state untouched: x = 0 and dt = 0 there
        xs = xs * ctx.valid[..., None].astype(xs.dtype)
    if el is not None:
        if not el.premask:
            xs = xs * hm.astype(xs.dtype)
        z = z * hm.astype(z.dtype)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    lo, hi = cfg.time_step_limit
    dt = jnp.clip(dt, lo, hi)
    if ctx.valid is not None:
        dt = dt * ctx.valid[..., None].astype(jnp.float32)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    x_BLHP = constrain(xs.reshape(B, L, H, P), ("batch", "length", "act_ssm_heads", None))
    B_BLGN = Bv.reshape(B, L, G, N)
    C_BLGN = Cv.reshape(B, L, G, N)
    state0 = cache["ssm"] if ctx.decoding else None
    active = None if el is None else el.active_heads
    if ctx.decoding and L == 1:
        # one recurrence step: S = exp(dt A) S + dt x B^T ; y = S C + D x
        Bh = jnp.repeat(B_BLGN[:, 0].astype(jnp.float32), H // G, axis=1)     # [B,H,N]
        Ch = jnp.repeat(C_BLGN[:, 0].astype(jnp.float32), H // G, axis=1)
        d0 = dt[:, 0]                                                           # [B,H]
        xf = x_BLHP[:, 0].astype(jnp.float32)                                   # [B,H,P]
        state = jnp.exp(d0 * A)[..., None, None] * state0 + d0[..., None, None] * xf[..., None] * Bh[:, :, None, :]
        y = jnp.einsum("bhpn,bhn->bhp", state, Ch, precision=HIGHEST) + p["D"].astype(jnp.float32)[:, None] * xf
        y_BLHP = y[:, None].astype(xs.dtype)
    else:
        y_BLHP, state = kernels.ssd(x_BLHP, dt, A, B_BLGN, C_BLGN, p["D"].astype(jnp.float32),
                                    chunk_size=cfg.chunk_size, initial_state=state0,
                                    seq_idx=None if ctx.decoding else ctx.segment_ids,
                                    active_heads=active, impl=ctx.policy.kernel_impl,
                                    partition=ssd_partition(B, G))
    y = y_BLHP.reshape(B, L, H * P)
    # gated group RMSNorm: norm(y · silu(z)) per group of d_inner / G channels (HF norm_before_gate=False)
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    g = g.reshape(B, L, G, H * P // G)
    var = jnp.mean(g * g, axis=-1, keepdims=True)
    eps = cfg.layer_norm_epsilon if el is None else cfg.layer_norm_epsilon * el.norm_eps
    g = g * jax.lax.rsqrt(var + eps)
    if el is not None:
        g = g * el.norm_scale
    g = p["norm"] * g.reshape(B, L, H * P).astype(p["norm"].dtype)
    out = dense(g, p["out_proj"], ctx.policy)
    new_cache = None
    if ctx.decoding:
        K1 = K - 1
        hist = jnp.concatenate([cache["conv"].astype(xBC.dtype), xBC], axis=1)
        new_cache = {"conv": hist[:, -K1:].astype(cache["conv"].dtype) if K1 else cache["conv"],
                     "ssm": state.astype(cache["ssm"].dtype)}
    return out, new_cache
