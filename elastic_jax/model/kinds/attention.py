"""Attention layer kind (pattern char "*")."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ...config import NemotronHConfig
from ...registry import Axis
from ...sharding import constrain
from ...widths import prefix_mask
from ...kernels.dot_product_attention import attend, reference_attention
from ..layers import Context, dense
from .base import Param, expand, masks_record, seq_sumsq
from .hf_rules import Rule, _t, _t_inv

CHAR = "*"
NAME = "attention"
KEY = "attention"                    # its name in config formats (a puzzle `block_type`)
HF_LAYER_TYPE = "full_attention"     # its `layers_block_type` entry in an HF config.json
HF_LAYER_ALIASES = ("attention",)    # older spellings read
AXES = {"attn_heads": Axis(CHAR, "num_attention_heads", "attn_heads_per_layer", "query heads",
                           "num_key_value_heads", "KV groups", option_field="attn_options",
                           unit_width=lambda cfg: cfg.head_dim)}       # o_proj rows per head
# quantization (METHOD §10): q/k/v are one module in the serving stacks (vLLM / SGLang `qkv_proj`),
# so they share one weight and input scale; the FP8 KV-cache scales of the cached projections
FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"),)
KV_CACHE_SCALES = {"k_proj": "k_scale", "v_proj": "v_scale"}
# cache entries written one slot per decoded position: a finished row's later writes land in slots its
# frozen `valid` masks, so batched decoding need not freeze them per row (infer/budget.py)
SLOT_CACHE = ("k", "v")
# NVIDIA's Nemotron Nano FP8 / NVFP4 recipe keeps these layers in BF16 (`quant.recipe_spec("nano")`)
NANO_HIGH_PRECISION = "self"


@masks_record
class AttentionMasks:
    """One attention layer's masks: [nH] query heads (per KV group)."""

    head_mask: object = None


# ----------------------------------------------------------------------- declarations
def dims(cfg: NemotronHConfig, hidden, w: dict, active: bool = False) -> dict:
    """`heads` = nH·hd query channels, `kv_heads` = nKV·hd key / value channels."""
    return {"embed": hidden, "heads": w["attn_heads"] * cfg.head_dim,
            "kv_heads": cfg.num_key_value_heads * cfg.head_dim}


def params(cfg: NemotronHConfig) -> dict[str, Param]:
    return {"q_proj": Param(("embed", "heads")), "k_proj": Param(("embed", "kv_heads")),
            "v_proj": Param(("embed", "kv_heads")), "o_proj": Param(("heads", "embed"), "normal_out")}


def select(cfg: NemotronHConfig, sizes: dict, sel: dict) -> dict:
    """Query heads (within their KV groups) -> their q_proj columns / o_proj rows."""
    return {"heads": expand(sel["attn_heads"], cfg.head_dim)}


def masks(cfg: NemotronHConfig, sw, k, mixer) -> AttentionMasks:
    c, p = sw.attn_heads[0][k], sw.attn_heads[1][k]
    nH = mixer["q_proj"].shape[1] // cfg.head_dim
    return AttentionMasks(head_mask=prefix_mask(nH, c, p, cfg.num_key_value_heads))


def init_cache(cfg: NemotronHConfig, sizes: dict, batch: int, max_len: int, dtype) -> dict:
    """KV cache [B, nKV, S, hd] (head-major: decode's batched dots read it in place) and its
    validity [B, S]."""
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "valid": jnp.zeros((batch, max_len), bool)}


def cache_elems(cfg: NemotronHConfig, sizes: dict, batch, context) -> dict:
    return {"kv": 2.0 * batch * context * sizes["kv_heads"]}


# ---------------------------------------------------------------- importance (METHOD §3.2)
def importance_stats(it: dict, cfg: NemotronHConfig, valid, length: int) -> dict:
    """Σ over sequences of the squared per-sequence mean |head output| (the o_proj input) [nH, hd]."""
    return {"heads": seq_sumsq(it["heads"], valid)}


def importance_scores(st: dict, cfg: NemotronHConfig, **_) -> dict:
    """Query heads: L2 over head_dim."""
    return {"attn_heads": np.sqrt(np.sum(np.asarray(st["heads"], np.float64), axis=1))}


# -------------------------------------------------------------------------------- HF keys
def hf_dims(cfg: NemotronHConfig, k: int) -> dict:
    return dict(nH=cfg.attn_heads_at(k), nKV=cfg.num_key_value_heads, hd=cfg.head_dim)


# GQA, no bias, no positional embedding
HF_RULES = (
    Rule("mixer.q_proj.weight", CHAR, ("q_proj",), lambda d: (d.nH * d.hd, d.D), _t, _t_inv, linear=True),
    Rule("mixer.k_proj.weight", CHAR, ("k_proj",), lambda d: (d.nKV * d.hd, d.D), _t, _t_inv, linear=True),
    Rule("mixer.v_proj.weight", CHAR, ("v_proj",), lambda d: (d.nKV * d.hd, d.D), _t, _t_inv, linear=True),
    Rule("mixer.o_proj.weight", CHAR, ("o_proj",), lambda d: (d.D, d.nH * d.hd), _t, _t_inv, linear=True),
)


# ------------------------------------------------------------------------ attention
def attention_mixer(p, x_BLD, cfg: NemotronHConfig, el: AttentionMasks | None, ctx: Context, cache):
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
        head_major = lambda t, c: jnp.swapaxes(t, 1, 2).astype(c.dtype)              # [B, nKV, L, hd]
        kc = jax.lax.dynamic_update_slice(cache["k"], head_major(k, cache["k"]), (0, 0, start, 0))
        vc = jax.lax.dynamic_update_slice(cache["v"], head_major(v, cache["v"]), (0, 0, start, 0))
        valid_new = jnp.ones((B, L), bool) if ctx.valid is None else ctx.valid
        kv_valid = jax.lax.dynamic_update_slice(cache["valid"], valid_new, (0, start))
        new_cache = {"k": kc, "v": vc, "valid": kv_valid}
        k_pos, prec = jnp.arange(kc.shape[2]), pol.lax_precision(q.dtype)
        if L == 1:        # one new token: the direct path ([1, S] scores) on the cache as stored
            o = reference_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), ctx.positions, k_pos,
                                    k_valid=kv_valid, scale=hd ** -0.5, precision=prec, kv_layout="bksd")
        else:             # a long prefill: the policy's kernel
            o = attend(q, jnp.swapaxes(kc, 1, 2).astype(q.dtype), jnp.swapaxes(vc, 1, 2).astype(q.dtype),
                       q_pos=ctx.positions, k_pos=k_pos, k_valid=kv_valid, impl=pol.attention_impl, precision=prec)
    else:
        pos = jnp.arange(L)
        o = attend(q, k, v, q_pos=pos, k_pos=pos, seg_q=ctx.segment_ids, seg_k=ctx.segment_ids,
                   impl=pol.attention_impl, precision=pol.lax_precision(q.dtype))
    if el is not None:
        o = o * el.head_mask.reshape(nKV, rep)[None, None, :, :, None]
    o = o.reshape(B, L, nH * hd).astype(q.dtype)
    if ctx.collect:     # intermediates: the per-head output (o_proj input) [B, L, nH, hd]
        return dense(o, p["o_proj"], ctx.policy), {"heads": o.reshape(B, L, nH, hd)}
    return dense(o, p["o_proj"], ctx.policy), new_cache


apply = attention_mixer


# ------------------------------------------------------------------------ cost (model/cost.py)
def flops(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    """Forward FLOPs per token: 2 x the q/k/v/o weights; QK^T and AV (2·nH·hd each) over the
    positions the token attends, causally (`mode.attended`)."""
    D, q, kv = sizes["embed"], sizes["heads"], sizes["kv_heads"]
    return {"weights": 2.0 * D * (2 * q + 2 * kv), "mixing": 4.0 * q * mode.attended}


def weights_read(cfg: NemotronHConfig, sizes: dict, mode) -> float:
    """Every projection, once per call."""
    D, q, kv = sizes["embed"], sizes["heads"], sizes["kv_heads"]
    return float(D * (2 * q + 2 * kv))


def state_traffic(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    """KV elements a cached call reads (the `context` positions) and writes (its new ones)."""
    if not mode.cached:
        return {}
    return {"kv": 2.0 * mode.batch * sizes["kv_heads"] * (mode.context + mode.seq_len)}
