"""Mamba2 layer kind (pattern char "M")."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ... import kernels
from ...config import NemotronHConfig
from ...registry import Axis
from ...sharding import constrain, context_mesh, mesh_axes_for
from ...widths import max_count, norm_correction, prefix_mask
from ..layers import HIGHEST, Context, dense
from .base import Param, expand, masks_record, rank_within_groups, seq_sumsq, static
from .hf_rules import Rule, _bias_join, _bias_split, _conv_join, _conv_split, _split_rows_t, _t, _t_inv

CHAR = "M"
NAME = "Mamba2"
KEY = "mamba"                          # its name in config formats (a puzzle `block_type`)
HF_LAYER_TYPE = "linear_attention"     # its `layers_block_type` entry in an HF config.json
HF_LAYER_ALIASES = ("mamba", "mamba2")  # older spellings read
AXES = {"mamba_heads": Axis(CHAR, "mamba_num_heads", "mamba_heads_per_layer", "heads", "n_groups", "Mamba groups",
                            option_field="mamba_options", unit_width=lambda cfg: cfg.mamba_head_dim),
        # the head dim: one size per model (HF `mamba_head_dim`); None in SoftWidths when not elastic.
        # out_proj rows = heads x channels, heads a multiple of n_groups
        "mamba_channels": Axis(CHAR, "mamba_head_dim", None, "channels", full_is_none=True,
                               option_field="mamba_channel_options", unit_width=lambda cfg: cfg.n_groups)}
# NVIDIA's Nemotron Nano FP8 / NVFP4 recipe keeps the nearest layer of this kind on each side of a
# BF16 attention layer in BF16 too (`quant.recipe_spec("nano")`)
NANO_HIGH_PRECISION = "nearest"


@masks_record
class MambaMasks:
    """One Mamba2 layer's masks: [H] group-aware heads, the gated-norm correction (eps factor ρ,
    output scale √ρ), the active heads per group (kernel skipping), [P] channels kept in every head
    (None = all); `premask`: the official soft form."""

    head_mask: object = None
    norm_eps: object = None
    norm_scale: object = None
    active_heads: object = None
    channel_mask: object = None
    premask: bool = static(False)


# ----------------------------------------------------------------------- declarations
def dims(cfg: NemotronHConfig, hidden, w: dict, active: bool = False) -> dict:
    """H heads of P channels (`ssm_heads` = H, `ssm_inner` = H·P), G groups of N state (`ssm_groups`
    = G·N, the B and C columns, never elastic), K conv taps."""
    H, P = w["mamba_heads"], w["mamba_channels"]
    return {"embed": hidden, "ssm_heads": H, "ssm_inner": H * P,
            "ssm_groups": cfg.n_groups * cfg.ssm_state_size, "conv": cfg.conv_kernel}


def _conv_init(key, shape, cfg, n_layers):
    bound = 1.0 / math.sqrt(cfg.conv_kernel)   # PyTorch Conv1d default (fan_in = K for a depthwise conv)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _a_log_init(key, shape, cfg, n_layers):
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32))


def _dt_bias_init(key, shape, cfg, n_layers):
    lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo), cfg.time_step_floor)
    return dt + jnp.log(-jnp.expm1(-dt))          # inverse softplus


def params(cfg: NemotronHConfig) -> dict[str, Param]:
    """Layout (JAX [in, out]); heads are group-major: head h belongs to group h // (H / G), as in HF."""
    return {
        "z_proj": Param(("embed", "ssm_inner")), "x_proj": Param(("embed", "ssm_inner")),
        "B_proj": Param(("embed", "ssm_groups")), "C_proj": Param(("embed", "ssm_groups")),
        "dt_proj": Param(("embed", "ssm_heads")),
        "conv_x": Param(("conv", "ssm_inner"), _conv_init), "conv_x_bias": Param(("ssm_inner",), _conv_init),
        "conv_B": Param(("conv", "ssm_groups"), _conv_init), "conv_B_bias": Param(("ssm_groups",), _conv_init),
        "conv_C": Param(("conv", "ssm_groups"), _conv_init), "conv_C_bias": Param(("ssm_groups",), _conv_init),
        "A_log": Param(("ssm_heads",), _a_log_init), "D": Param(("ssm_heads",), "ones"),
        "dt_bias": Param(("ssm_heads",), _dt_bias_init), "norm": Param(("ssm_inner",), "ones"),
        "out_proj": Param(("ssm_inner", "embed"), "normal_out"),
    }


def init_keys(key, names) -> dict:
    """The HF NemotronH initialization's key layout (kept so seeds give the same parameters)."""
    ks = jax.random.split(key, 8)
    ck = jax.random.split(ks[5], 6)
    keys = dict(zip(("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj"), ks[:5]))
    for j, name in enumerate(("conv_x", "conv_B", "conv_C")):
        keys[name], keys[name + "_bias"] = ck[2 * j], ck[2 * j + 1]
    keys.update(dt_bias=ks[6], out_proj=ks[7], A_log=None, D=None, norm=None)
    return keys


def select(cfg: NemotronHConfig, sizes: dict, sel: dict) -> dict:
    """Heads (`sel["mamba_heads"]`) and the channels kept in every head (`sel["mamba_channels"]`)."""
    heads = sel["mamba_heads"]
    P = sizes["ssm_inner"] // sizes["ssm_heads"]
    return {"ssm_heads": heads, "ssm_inner": expand(heads, P, sel["mamba_channels"])}


def masks(cfg: NemotronHConfig, sw, k, mixer) -> MambaMasks:
    """Group-aware head mask and the gated-norm correction; head channels: ρ = (heads/H)·(channels/P)."""
    c, p = sw.mamba_heads[0][k], sw.mamba_heads[1][k]
    H = mixer["A_log"].shape[0]
    eps_f, scale = norm_correction(H, c, p)
    chan = None
    if sw.mamba_channels is not None:
        cc, cp = sw.mamba_channels[0][k], sw.mamba_channels[1][k]
        chan = prefix_mask(cfg.mamba_head_dim, cc, cp)
        eps_c, scale_c = norm_correction(cfg.mamba_head_dim, cc, cp)
        eps_f, scale = eps_f * eps_c, scale * scale_c
    return MambaMasks(head_mask=prefix_mask(H, c, p, cfg.n_groups), norm_eps=eps_f, norm_scale=scale,
                        active_heads=max_count(c, p) // cfg.n_groups, channel_mask=chan,
                        premask=sw.mask_form == "official")


def init_cache(cfg: NemotronHConfig, sizes: dict, batch: int, max_len: int, dtype) -> dict:
    """Conv window [B, K-1, H·P + 2·G·N] and f32 SSM state [B, H, P, N]."""
    H, HP = sizes["ssm_heads"], sizes["ssm_inner"]
    return {"conv": jnp.zeros((batch, cfg.conv_kernel - 1, HP + 2 * sizes["ssm_groups"]), dtype),
            "ssm": jnp.zeros((batch, H, HP // H, cfg.ssm_state_size), jnp.float32)}


def cache_elems(cfg: NemotronHConfig, sizes: dict, batch, context) -> dict:
    """Decode-state elements by class (the memory cost model): SSM state and conv window."""
    return {"ssm": batch * sizes["ssm_inner"] * cfg.ssm_state_size,
            "conv": batch * (cfg.conv_kernel - 1) * (sizes["ssm_inner"] + 2 * sizes["ssm_groups"])}


# ---------------------------------------------------------------- importance (METHOD §3.2)
def importance_stats(it: dict, cfg: NemotronHConfig, valid, length: int) -> dict:
    """Σ over sequences of the squared per-sequence mean |x projection| per (head, channel) [H, P]."""
    return {"x": seq_sumsq(it["x_proj"], valid)}


def importance_scores(st: dict, cfg: NemotronHConfig, mamba_channel_frac: float = 1.0, **_) -> dict:
    """Channels: L2 over heads; heads: L2 over the top `mamba_channel_frac` of the channels ([NE] D_top)."""
    hp = np.sqrt(np.asarray(st["x"], np.float64))                              # [H, P]
    ch = np.sqrt(np.sum(hp ** 2, axis=0))                                     # [P]
    top = rank_within_groups(ch)[:max(1, int(np.floor(mamba_channel_frac * ch.size + 1e-9)))]
    return {"mamba_heads": np.sqrt(np.sum(hp[:, top] ** 2, axis=1)), "mamba_channels": ch}


# -------------------------------------------------------------------------------- HF keys
def hf_dims(cfg: NemotronHConfig, k: int) -> dict:
    return dict(H=cfg.mamba_heads_at(k), P=cfg.mamba_head_dim, G=cfg.n_groups, N=cfg.ssm_state_size,
                K=cfg.conv_kernel)


# in_proj = [z | x | B | C | dt], conv1d over [x | B | C] (HF fuses them; we keep the pieces)
HF_RULES = (
    Rule("mixer.in_proj.weight", CHAR, ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj"),
         lambda d: (2 * d.HP + 2 * d.GN + d.H, d.D), *_split_rows_t(lambda d: (d.HP, d.HP, d.GN, d.GN, d.H)),
         linear=True),
    Rule("mixer.conv1d.weight", CHAR, ("conv_x", "conv_B", "conv_C"), lambda d: (d.HP + 2 * d.GN, 1, d.K),
         _conv_split, _conv_join),
    Rule("mixer.conv1d.bias", CHAR, ("conv_x_bias", "conv_B_bias", "conv_C_bias"), lambda d: (d.HP + 2 * d.GN,),
         _bias_split, _bias_join, optional=lambda cfg: not cfg.use_conv_bias),
    Rule("mixer.A_log", CHAR, ("A_log",), lambda d: (d.H,)),
    Rule("mixer.D", CHAR, ("D",), lambda d: (d.H,)),
    Rule("mixer.dt_bias", CHAR, ("dt_bias",), lambda d: (d.H,)),
    Rule("mixer.norm.weight", CHAR, ("norm",), lambda d: (d.HP,)),
    Rule("mixer.out_proj.weight", CHAR, ("out_proj",), lambda d: (d.D, d.HP), _t, _t_inv, linear=True),
)


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


def mamba_mixer(p, x_BLD, cfg: NemotronHConfig, el: MambaMasks | None, ctx: Context, cache):
    B, L, _ = x_BLD.shape
    H = p["A_log"].shape[0]
    P, G, N, K = cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    # the in-projections' weight gradients contract token-major on CPU (layers.dense): their cotangents
    # are the gate's and the conv's elementwise backward, which XLA:CPU would recompute transposed
    proj = lambda n: dense(x_BLD, p[n], ctx.policy, token_major_grad=True)
    z, xp, dt = proj("z_proj"), proj("x_proj"), proj("dt_proj")
    xBC = jnp.concatenate([xp, proj("B_proj"), proj("C_proj")], -1)
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
    if ctx.collect:     # intermediates: the x projection per (head, channel) [B, L, H, P]
        return out, {"x_proj": xp.reshape(B, L, H, P)}
    return out, new_cache


apply = mamba_mixer


# ------------------------------------------------------------------------ cost (model/cost.py)
def flops(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    """Forward FLOPs per token: 2 x the in / out projections; the depthwise conv (2·K per
    channel); one token (decode) runs the recurrence (state update ~4·H·P·N, read-out y = S C
    2·H·P·N), more run the chunked SSD with chunk Q: C B^T (2·Q·H·N) and its product with x
    (2·Q·H·P) within the chunk, the chunk state and its read-out (4·H·P·N)."""
    D, H, HP, GN = sizes["embed"], sizes["ssm_heads"], sizes["ssm_inner"], sizes["ssm_groups"]
    N, K, Q = cfg.ssm_state_size, cfg.conv_kernel, cfg.chunk_size
    weights = 2.0 * D * (2 * HP + 2 * GN + H) + 2.0 * HP * D
    conv = 2.0 * K * (HP + 2 * GN)
    if mode.seq_len == 1:
        return {"weights": weights, "mixing": 2.0 * HP * N, "elementwise": conv + 4.0 * HP * N}
    return {"weights": weights, "mixing": 4.0 * HP * N + 2.0 * Q * (HP + H * N), "elementwise": conv}


def weights_read(cfg: NemotronHConfig, sizes: dict, mode) -> float:
    """Every parameter, once per call."""
    total = 0.0
    for p in params(cfg).values():
        n = 1.0
        for d in p.dims:
            n = n * sizes[d]
        total += n
    return total


def state_traffic(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    """A cached call reads and writes the whole SSM state and conv window of its rows."""
    if not mode.cached:
        return {}
    return {cls: 2.0 * n for cls, n in cache_elems(cfg, sizes, mode.batch, 0).items()}
