"""Attention layer kind (pattern char "*")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ...config import NemotronHConfig
from ...sharding import constrain
from ..attention import attend
from ..layers import Context, ElasticLayer, dense


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
