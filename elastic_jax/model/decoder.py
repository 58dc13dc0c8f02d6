"""The decoder walk: embeddings -> [h + gate_l · mask(mixer_l(RMSNorm_l(h)))]_l -> norm_f -> lm_head.

`forward` is a pure function of (params, tokens, cfg, widths); `prefill` / `decode_step` run the
same blocks over a cache (attention KV, Mamba conv window and SSM state).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig
from ..widths import SoftWidths, Widths, as_soft, max_count, norm_correction, prefix_mask
from ..quant.state import apply_layer
from .layers import MIXERS, Context, ElasticLayer, rms_norm
from .policy import ComputePolicy, resolve_policy


def _layer_masks(cfg: NemotronHConfig, sw: SoftWidths, layer: int, mixer_params) -> ElasticLayer:
    char = cfg.pattern[layer]
    k = cfg.kind_index()[layer]
    if char == "M":
        c, p = sw.mamba_heads[0][k], sw.mamba_heads[1][k]
        H = mixer_params["A_log"].shape[0]
        eps_f, scale = norm_correction(H, c, p)
        return ElasticLayer(head_mask=prefix_mask(H, c, p, cfg.n_groups), norm_eps=eps_f, norm_scale=scale,
                            active_heads=max_count(c, p) // cfg.n_groups)
    if char == "*":
        c, p = sw.attn_heads[0][k], sw.attn_heads[1][k]
        nH = mixer_params["q_proj"].shape[1] // cfg.head_dim
        return ElasticLayer(head_mask=prefix_mask(nH, c, p, cfg.num_key_value_heads))
    if char == "-":
        c, p = sw.ffn[0][k], sw.ffn[1][k]
        return ElasticLayer(ffn_mask=prefix_mask(mixer_params["up_proj"].shape[1], c, p))
    c, p = sw.moe_ffn[0][k], sw.moe_ffn[1][k]
    return ElasticLayer(ffn_mask=prefix_mask(mixer_params["up_proj"].shape[2], c, p),
                        active_ffn=max_count(c, p),
                        expert_counts=sw.moe_experts[0][k], expert_probs=sw.moe_experts[1][k])


def check_tokens(tokens, cfg: NemotronHConfig):
    """Shape / dtype checks, and a range check when the tokens are concrete."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        t = np.asarray(tokens)  # concrete (also when closed over inside a jit): range-check on host
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}); got range [{lo}, {hi}]")


def _run(params, tokens, cfg: NemotronHConfig, widths, ctx: Context, cache, return_hidden=False, head=True):
    check_tokens(tokens, cfg)
    sw = as_soft(cfg, widths)
    h = jnp.take(params["embed"], tokens, axis=0)
    if sw is not None:
        D = params["embed"].shape[1]
        hc, hp = sw.hidden
        hmask = prefix_mask(D, hc, hp).astype(h.dtype)
        h_eps, h_scale = norm_correction(D, hc, hp)
        h = h * hmask
    else:
        hmask = h_eps = h_scale = None
    new_cache = [] if cache is not None else None
    hiddens = []
    for i, char in enumerate(cfg.pattern):
        lp = params["layers"][i]
        el = None if sw is None else _layer_masks(cfg, sw, i, lp["mixer"])
        if ctx.quant is not None:   # fixed-scale fake quantization of the projections (spec §10)
            lp = {"norm": lp["norm"], "mixer": apply_layer(lp["mixer"], ctx.quant, i)}

        def block(h, lp, el, layer_cache, char=char):
            x = rms_norm(h, lp["norm"], cfg.layer_norm_epsilon, h_eps, h_scale)
            if hmask is not None:
                x = x * hmask
            out, c = MIXERS[char](lp["mixer"], x, cfg, el, ctx, layer_cache)
            if hmask is not None:
                out = out * hmask
            return out, c

        if ctx.policy.remat != "none" and cache is None:
            block = jax.checkpoint(block)
        out, c = block(h, lp, el, None if cache is None else cache[i])
        gate = None if sw is None else sw.layers[i].astype(out.dtype)
        h = h + (out if gate is None else gate * out)
        if new_cache is not None:
            new_cache.append(c)
        hiddens.append(h)
    x = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon, h_eps, h_scale)
    if hmask is not None:
        x = x * hmask
    if not head:                      # final normed (masked) hidden states, no lm_head (train/losses.py)
        return x, new_cache
    logits = jnp.einsum("bld,dv->blv", x.astype(params["lm_head"].dtype), params["lm_head"],
                        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if return_hidden:
        return logits, hiddens
    return logits, new_cache


def forward(params, tokens, cfg: NemotronHConfig, widths: Widths | SoftWidths | None = None, *,
            segment_ids=None, policy: ComputePolicy | None = None, quant=None):
    """Logits f32 [B, L, vocab] of the (masked) model. `segment_ids` [B, L]: packed documents
    (attention, conv and SSM state do not cross boundaries); id 0 marks padding. `quant`: an
    `elastic_jax.quant.QuantState` (FP8 / NVFP4 simulated with its fixed scales)."""
    valid = None if segment_ids is None else segment_ids > 0
    ctx = Context(segment_ids=segment_ids, valid=valid, policy=resolve_policy(cfg, policy), quant=quant)
    logits, _ = _run(params, tokens, cfg, widths, ctx, None)
    return logits


# ------------------------------------------------------------------------------ caches
@dataclasses.dataclass(frozen=True)
class Cache:
    """Decode state: per-layer entries (attention {k, v, valid}, Mamba {conv, ssm}, else None),
    the number of positions written, and the static capacity."""

    layers: list
    pos: jax.Array
    max_len: int


jax.tree_util.register_dataclass(Cache, data_fields=["layers", "pos"], meta_fields=["max_len"])


def init_cache(cfg: NemotronHConfig, batch: int, max_len: int, params=None, dtype=jnp.float32) -> dict:
    """Empty decode cache: attention KV [B, S, nKV, hd] + validity, Mamba conv window and f32 SSM state."""
    layers = []
    for i, c in enumerate(cfg.pattern):
        k = cfg.kind_index()[i]
        if c == "*":
            shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
            layers.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                           "valid": jnp.zeros((batch, max_len), bool)})
        elif c == "M":
            H = cfg.mamba_heads_at(k) if params is None else params["layers"][i]["mixer"]["A_log"].shape[0]
            conv_dim = H * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size
            layers.append({"conv": jnp.zeros((batch, cfg.conv_kernel - 1, conv_dim), dtype),
                           "ssm": jnp.zeros((batch, H, cfg.mamba_head_dim, cfg.ssm_state_size), jnp.float32)})
        else:
            layers.append(None)
    return Cache(layers=layers, pos=jnp.zeros((), jnp.int32), max_len=max_len)


def _cached(params, tokens, cfg, widths, cache: "Cache", valid, policy=None, quant=None):
    L = tokens.shape[1]
    if not isinstance(cache.pos, jax.core.Tracer) and int(cache.pos) + L > cache.max_len:
        raise ValueError(f"cache overflow: position {int(cache.pos)} + {L} new tokens > max_len={cache.max_len}")
    ctx = Context(valid=valid, positions=cache.pos + jnp.arange(L), decoding=True,
                  policy=resolve_policy(cfg, policy), quant=quant)
    logits, layers = _run(params, tokens, cfg, widths, ctx, cache.layers)
    return logits, Cache(layers=layers, pos=cache.pos + L, max_len=cache.max_len)


def prefill(params, tokens, cfg: NemotronHConfig, widths=None, *, max_len: int, valid=None, cache=None,
            policy: ComputePolicy | None = None, quant=None):
    """Run the prompt [B, L] (left-padded rows marked by `valid` False) into a fresh cache of
    `max_len` positions. Returns (logits [B, L, V], cache)."""
    if tokens.shape[1] > max_len:
        raise ValueError(f"prompt length {tokens.shape[1]} exceeds the context max_len={max_len}")
    if cache is None:
        cache = init_cache(cfg, tokens.shape[0], max_len, params, dtype=params["embed"].dtype)
    return _cached(params, tokens, cfg, widths, cache, valid, policy, quant)


def decode_step(params, tokens, cache, cfg: NemotronHConfig, widths=None, *, policy: ComputePolicy | None = None,
                quant=None):
    """Append tokens [B, T] (usually T = 1) to the cache. Returns (logits [B, T, V], cache)."""
    return _cached(params, tokens, cfg, widths, cache, None, policy, quant)


def final_hidden(params, tokens, cfg: NemotronHConfig, widths: Widths | SoftWidths | None = None, *,
                 segment_ids=None, policy: ComputePolicy | None = None, quant=None):
    """Final normed (and hidden-masked) states [B, L, D] in the parameter dtype: `forward` without
    the lm_head, so a loss can apply `params["lm_head"]` in vocabulary chunks (elastic_jax/train)."""
    valid = None if segment_ids is None else segment_ids > 0
    ctx = Context(segment_ids=segment_ids, valid=valid, policy=resolve_policy(cfg, policy), quant=quant)
    x, _ = _run(params, tokens, cfg, widths, ctx, None, head=False)
    return x


def hidden_states(params, tokens, cfg: NemotronHConfig, widths=None, *, policy: ComputePolicy | None = None,
                  quant=None):
    """Residual stream after every layer (list of [B, L, D]) and the logits."""
    ctx = Context(policy=resolve_policy(cfg, policy), quant=quant)
    logits, hiddens = _run(params, tokens, cfg, widths, ctx, None, return_hidden=True)
    return logits, hiddens
