"""The four Nemotron-H mixers as pure functions, with elastic masks (spec §4.2-4.3, ANCHORS §5.2).

Each mixer takes the normed block input `x_BLD`, its parameter dict, an `ElasticLayer` (masks for
this layer, or None for the full model), a `Context` (segments / validity / decode cache) and
returns (output, new cache entry). Shapes: B batch, L new tokens, D hidden, H heads, P head dim,
G groups, N state size, K conv kernel, S cache length, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from .. import kernels
from ..quant.qweight import unwrap
from ..config import NemotronHConfig
from ..sharding import constrain, context_mesh, mesh_axes_for
from .attention import attend
from .policy import ComputePolicy

HIGHEST = jax.lax.Precision.HIGHEST
_DEFAULT_POLICY = ComputePolicy()


@dataclass(frozen=True)
class ElasticLayer:
    """Masks of one layer, built from SoftWidths inside the jitted forward (all arrays)."""

    head_mask: Any = None         # M: [H] (group-aware) / *: [nH] (per KV group)
    norm_eps: Any = None          # M: gated-norm eps factor ρ
    norm_scale: Any = None        # M: gated-norm output scale √ρ
    active_heads: Any = None      # M: active heads per group (kernel skipping)
    ffn_mask: Any = None          # -: [I];  E: [Ie]
    active_ffn: Any = None        # E: union of active expert widths (kernel skipping)
    expert_counts: Any = None     # E: [n_opts]
    expert_probs: Any = None      # E: [n_opts]
    channel_mask: Any = None      # M: [P] channels kept in every head (None = all)
    premask: bool = False         # static: the official soft-mask form (SoftWidths.mask_form)


jax.tree_util.register_dataclass(
    ElasticLayer, data_fields=["head_mask", "norm_eps", "norm_scale", "active_heads", "ffn_mask",
                               "active_ffn", "expert_counts", "expert_probs", "channel_mask"],
    meta_fields=["premask"])


@dataclass
class Context:
    """Per-call data shared by all layers."""

    segment_ids: Any = None   # [B, L] int, 0 = padding (full-sequence mode)
    valid: Any = None         # [B, L] bool, False = padding
    positions: Any = None     # [L] absolute positions of the new tokens (cache mode)
    decoding: bool = False    # cache mode: read/write the layer caches
    policy: ComputePolicy = ComputePolicy()   # runtime knobs (dtypes, kernels, remat)
    quant: Any = None         # elastic_jax.quant.QuantState: fake-quantized projections (spec §10)


def dense(x, w, policy: ComputePolicy | None = None):
    """x [..., in] @ w [in, out] with f32 accumulation, operands and result in the policy's compute
    dtype (default: the parameter dtype) at its matmul precision (ComputePolicy.lax_precision). A
    quantized weight (`QWeight`) fake-quantizes x with its static input scale first, as an FP8
    kernel would."""
    x, w = unwrap(x, w)
    pol = _DEFAULT_POLICY if policy is None else policy
    dt = pol.dtype_for(w.dtype)
    return jnp.einsum("...i,io->...o", x.astype(dt), w.astype(dt), precision=pol.lax_precision(dt),
                      preferred_element_type=jnp.float32).astype(dt)


def rms_norm(x, weight, eps, eps_factor=None, out_scale=None):
    """HF RMSNorm in f32. With an elastic hidden mask: eps·ρ and ×√ρ make the full-width norm of a
    masked vector equal the norm over the active channels (spec §4.3)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    e = eps if eps_factor is None else eps * eps_factor
    y = x32 * jax.lax.rsqrt(var + e)
    if out_scale is not None:
        y = y * out_scale
    return weight * y.astype(weight.dtype)


def relu2(x):
    return jnp.square(jax.nn.relu(x))


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


# ------------------------------------------------------------------------ attention
def attention_mixer(p, x_BLD, cfg: NemotronHConfig, el: ElasticLayer | None, ctx: Context, cache):
    """GQA causal attention, no positional embedding (NoPE), scale 1/sqrt(head_dim)."""
    B, L, _ = x_BLD.shape
    hd, nKV = cfg.head_dim, cfg.num_key_value_heads
    nH = p["q_proj"].shape[1] // hd
    rep = nH // nKV
    q = constrain(dense(x_BLD, p["q_proj"], ctx.policy).reshape(B, L, nKV, rep, hd),
                  ("batch", "length", "act_kv_heads", None, None))
    k = constrain(dense(x_BLD, p["k_proj"], ctx.policy).reshape(B, L, nKV, hd),
                  ("batch", "length", "act_kv_heads", None))
    v = constrain(dense(x_BLD, p["v_proj"], ctx.policy).reshape(B, L, nKV, hd),
                  ("batch", "length", "act_kv_heads", None))
    new_cache = None
    pol = ctx.policy
    if ctx.decoding:
        start = ctx.positions[0]
        kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
        vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
        valid_new = jnp.ones((B, L), bool) if ctx.valid is None else ctx.valid
        kv_valid = jax.lax.dynamic_update_slice(cache["valid"], valid_new, (0, start))
        new_cache = {"k": kc, "v": vc, "valid": kv_valid}
        # one new token: the direct path ([1, S] scores); a long prefill: the policy's kernel
        o = attend(q, kc.astype(q.dtype), vc.astype(q.dtype), q_pos=ctx.positions, k_pos=jnp.arange(kc.shape[1]),
                   k_valid=kv_valid, impl="xla" if L == 1 else pol.attention_impl,
                   precision=pol.lax_precision(q.dtype))
    else:
        pos = jnp.arange(L)
        o = attend(q, k, v, q_pos=pos, k_pos=pos, seg_q=ctx.segment_ids, seg_k=ctx.segment_ids,
                   impl=pol.attention_impl, precision=pol.lax_precision(q.dtype))
    if el is not None:
        o = o * el.head_mask.reshape(nKV, rep)[None, None, :, :, None]
    o = o.reshape(B, L, nH * hd).astype(q.dtype)
    return dense(o, p["o_proj"], ctx.policy), new_cache


# ------------------------------------------------------------------------------ MLP
def mlp_mixer(p, x_BLD, cfg, el: ElasticLayer | None, ctx, cache):
    h = dense(x_BLD, p["up_proj"], ctx.policy)
    if el is not None and el.premask:     # official soft form: mask before relu²
        h = relu2(h * el.ffn_mask.astype(h.dtype))
    else:
        h = relu2(h)
        if el is not None:
            h = h * el.ffn_mask.astype(h.dtype)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return dense(h, p["down_proj"], ctx.policy), None


# ------------------------------------------------------------------------------ MoE
def route(p, x_TD, cfg: NemotronHConfig, el: ElasticLayer | None):
    """Sigmoid router with correction bias, group-limited top-k (DeepSeek-V3 / HF NemotronH).

    Elastic expert count (spec §4.3, soft form): option i keeps the first counts_i / n_group experts
    of every group with weight π_i; an expert's routing score is Σ_i w_i (σ(l) + bias) and its gate
    Σ_i w_i σ(l); experts outside every option get -inf and are never chosen.
    Returns (topk_idx [T, k] int32, topk_weight [T, k] f32).
    """
    E = p["gate"].shape[1]
    logits = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), p["gate"].astype(jnp.float32), precision=HIGHEST)
    scores = jax.nn.sigmoid(logits)
    bias = p["e_score_correction_bias"].astype(jnp.float32)
    per_group = E // cfg.n_group
    if el is None:
        choice = scores + bias
        gate_scores = scores
        active = None
    else:
        within = jnp.arange(E) % per_group
        keep = within[None, :] < (el.expert_counts[:, None] // cfg.n_group)          # [n_opts, E]
        weight = jnp.sum(el.expert_probs[:, None] * keep, axis=0)                     # [E]
        active = jnp.any(keep & (el.expert_probs[:, None] > 0), axis=0)
        # the official hard mode scales the logits by the option probability before the sigmoid, so
        # the expert-count head gets a gradient the top-k renormalization cannot cancel; w/sg(w) is
        # that scale with value exactly 1 (the forward is unchanged in every mode)
        safe_w = jnp.where(weight > 0, weight, 1.0)
        scores = jax.nn.sigmoid(logits * (safe_w / jax.lax.stop_gradient(safe_w)))
        gate_scores = scores * weight
        choice = jnp.where(active, (scores + bias) * weight, -jnp.inf)
    T = x_TD.shape[0]
    if cfg.n_group > 1:
        grouped = choice.reshape(T, cfg.n_group, per_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)                 # [T, n_group]
        _, gidx = jax.lax.top_k(group_scores, cfg.topk_group)
        gmask = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], gidx].set(True)
        # experts of unselected groups can never be picked (HF: masked_fill(-inf))
        choice = jnp.where(jnp.repeat(gmask, per_group, axis=1), choice, -jnp.inf)
        if active is not None:
            choice = jnp.where(active, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    w = jnp.take_along_axis(gate_scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), w * cfg.routed_scaling_factor


def moe_mixer(p, x_BLD, cfg: NemotronHConfig, el: ElasticLayer | None, ctx, cache):
    """Routed relu² experts dispatched by sort + grouped matmul, plus the shared expert. Under a
    mesh in context the routed experts run per shard (expert_parallel.py).
    Second output: None when decoding, else {"expert_load": [E] f32 tokens routed to each expert
    (padding excluded)} for the aux-loss-free balancing update (train/balance.py)."""
    B, L, D = x_BLD.shape
    x_TD = x_BLD.reshape(B * L, D)
    valid_T = None if ctx.decoding or ctx.valid is None else ctx.valid.reshape(B * L)
    mesh = context_mesh()
    if mesh is not None:
        from .expert_parallel import routed_experts_sharded
        y, load = routed_experts_sharded(p, x_TD, cfg, el, ctx.policy, mesh, valid_T)
        aux = None if ctx.decoding else {"expert_load": load}
        return _add_shared_expert(p, x_TD, y, ctx.policy).reshape(B, L, D).astype(x_BLD.dtype), aux
    idx_TK, w_TK = route(p, x_TD, cfg, el)
    T, Kk = idx_TK.shape
    E = p["gate"].shape[1]
    flat = idx_TK.reshape(-1)
    order = jnp.argsort(flat)
    rows = x_TD[order // Kk]                                                      # [T·k, D] sorted by expert
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    active_n = None if el is None else el.active_ffn
    rows, w_up = unwrap(rows, p["up_proj"])
    cdt = ctx.policy.dtype_for(w_up.dtype)                # expert matmuls: compute dtype, f32 accumulation
    prec = ctx.policy.lax_precision(cdt)
    h = kernels.gmm(rows.astype(cdt), w_up.astype(cdt), group_sizes, active_n=active_n,
                    impl=ctx.policy.kernel_impl, preferred_element_type=jnp.float32, precision=prec)
    if el is not None and el.premask:     # official soft form: mask before relu²
        h = relu2(h * el.ffn_mask)
    else:
        h = relu2(h)
        if el is not None:
            h = h * el.ffn_mask
    h, w_down = unwrap(h.astype(cdt), p["down_proj"])
    o = kernels.gmm(h.astype(cdt), w_down.astype(cdt), group_sizes, active_k=active_n,
                    impl=ctx.policy.kernel_impl, preferred_element_type=jnp.float32, precision=prec)
    unsorted = jnp.zeros_like(o).at[order].set(o).reshape(T, Kk, D)
    y = jnp.einsum("tkd,tk->td", unsorted, w_TK, precision=HIGHEST)
    aux = None if ctx.decoding else {"expert_load": expert_load(idx_TK, E, valid_T)}
    return _add_shared_expert(p, x_TD, y, ctx.policy).reshape(B, L, D).astype(x_BLD.dtype), aux


def expert_load(idx_TK, E: int, valid_T=None):
    """[E] f32 (token, choice) pairs routed to each expert, padding tokens excluded; no gradient."""
    T, Kk = idx_TK.shape
    tok_w = jnp.ones((T,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.zeros((E,), jnp.float32).at[idx_TK.reshape(-1)].add(jnp.repeat(tok_w, Kk)))


def _add_shared_expert(p, x_TD, y_TD, policy):
    if "shared_up" in p:
        y_TD = y_TD + dense(relu2(dense(x_TD, p["shared_up"], policy)), p["shared_down"], policy).astype(jnp.float32)
    return y_TD


MIXERS = {"M": mamba_mixer, "*": attention_mixer, "-": mlp_mixer, "E": moe_mixer}
