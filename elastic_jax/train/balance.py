"""Aux-loss-free MoE load balancing (DeepSeek-V3 / Nemotron 3; Megatron
`--moe-router-enable-expert-bias`): after each optimizer step, per MoE layer,

    bias_e += u · sign(mean_e'(load_e') − load_e)

with load_e the tokens the (masked) routing sent to expert e during the step. The correction bias
only enters the top-k *choice* (never the gate values), so it gets no gradient; it is updated here,
outside the optimizer, and lives in the params (saved and resumed with the state). The frozen
teacher's bias is never touched.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..config import NemotronHConfig


def update_expert_bias(params, cfg: NemotronHConfig, loads, rate: float):
    """params with every MoE layer's `e_score_correction_bias` moved by `rate` toward balance.
    `loads`: [n_moe_layers, E] routing counts (MoE-layer order). Other leaves are shared, not copied."""
    moe_layers = cfg.layer_indices("E")
    if not moe_layers or rate == 0:
        return params
    layers = list(params["layers"])
    for j, i in enumerate(moe_layers):
        mixer = dict(layers[i]["mixer"])
        load = loads[j]
        b = mixer["e_score_correction_bias"]
        step = rate * jnp.sign(jnp.mean(load) - load)
        mixer["e_score_correction_bias"] = (b.astype(jnp.float32) + step).astype(b.dtype)
        layers[i] = dict(layers[i], mixer=mixer)
    return dict(params, layers=layers)


def routing_entropy(loads) -> jnp.ndarray:
    """Normalized entropy H(load / Σload) / log E per MoE layer ([n_moe_layers]; 1 = uniform)."""
    loads = jnp.asarray(loads, jnp.float32)
    p = loads / jnp.maximum(jnp.sum(loads, axis=-1, keepdims=True), 1e-20)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return h / jnp.log(loads.shape[-1])
