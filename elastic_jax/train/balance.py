"""Aux-loss-free MoE load balancing (DeepSeek-V3 / Nemotron 3; Megatron
`--moe-router-enable-expert-bias`): after each optimizer step, per MoE layer,

    bias_e += u · sign(Σ_m [e active in m] · (mean_{e' active in m} load_{m,e'} − load_{m,e}))

with load_{m,e} the tokens the (masked) routing sent to expert e in micro-batch (or row group) m.
Only the experts the sampled budget keeps take part (METHOD §4.3: an expert-count option masks the
experts past its prefix out of the top-k): a masked expert's load is 0 by construction, not by the
router's choice, and counting it would raise its bias on every small-budget step until the full
model routes most tokens to the least important tail experts (issue 30: routing entropy 1.00 -> 0.45
in a simulation with 8 / 6 / 4-expert budgets). With every expert active this is the plain rule
`bias_e += u · sign(mean(load) − load_e)` over the step's summed loads.

The correction bias only enters the top-k *choice* (never the gate values), so it gets no gradient;
it is updated here, outside the optimizer, and lives in the params (saved and resumed with the
state). The frozen teacher's bias is never touched.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..config import NemotronHConfig
from ..model.kinds import layers_with_aux
from ..widths import as_soft


def active_experts(cfg: NemotronHConfig, widths) -> jnp.ndarray | None:
    """bool [n_moe_layers, E]: the experts the sampled widths keep, i.e. those whose routing weight
    Σ_i π_i·[e < count_i] (METHOD §4.3) is at least half of Σ_i π_i. Hard masks: exactly the chosen
    prefix. Soft masks: an expert the mixture mostly masks out (its choice score scaled by a small
    weight, so rarely picked whatever its bias) is left out, as a masked one. None: the full model."""
    sw = as_soft(cfg, widths)
    if sw is None or sw.moe_experts is None:
        return None
    n_moe, E = len(layers_with_aux(cfg, "expert_load")), cfg.n_routed_experts
    counts, probs = sw.moe_experts
    n_opts = counts.shape[-1]
    counts = jnp.broadcast_to(counts, (n_moe, n_opts))
    probs = jnp.broadcast_to(probs, (n_moe, n_opts))
    within = jnp.arange(E) % (E // cfg.n_group)
    keep = within[None, None, :] < (counts[..., None] // cfg.n_group)               # [n_moe, n_opts, E]
    weight = jnp.sum(probs[..., None] * keep, axis=1)                                # [n_moe, E]
    return weight >= 0.5 * jnp.sum(probs, axis=-1, keepdims=True)


def load_deviation(loads, active=None) -> jnp.ndarray:
    """[n_moe_layers, E]: mean load of the active experts minus each active expert's load; 0 for the
    inactive ones (they neither gain nor lose bias). `active=None`: every expert active."""
    loads = jnp.asarray(loads, jnp.float32)
    if active is None:
        return jnp.mean(loads, axis=-1, keepdims=True) - loads
    a = active.astype(jnp.float32)
    mean = jnp.sum(loads * a, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1.0)
    return (mean - loads) * a


def update_expert_bias(params, cfg: NemotronHConfig, loads=None, rate: float = 0.0, *, deviation=None,
                       active=None):
    """params with every MoE layer's `e_score_correction_bias` moved by `rate` toward balance:
    `bias += rate · sign(deviation)`. Give either `deviation` ([n_moe_layers, E], `load_deviation`
    summed over the step's micro-batches) or `loads` ([n_moe_layers, E] routing counts, MoE-layer
    order) with an optional `active` mask. Other leaves are shared, not copied."""
    moe_layers = layers_with_aux(cfg, "expert_load")
    if not moe_layers or rate == 0:
        return params
    if (loads is None) == (deviation is None):
        raise ValueError("update_expert_bias: give exactly one of loads= and deviation=")
    dev = load_deviation(loads, active) if deviation is None else deviation
    layers = list(params["layers"])
    for j, i in enumerate(moe_layers):
        mixer = dict(layers[i]["mixer"])
        b = mixer["e_score_correction_bias"]
        step = rate * jnp.sign(dev[j])
        mixer["e_score_correction_bias"] = (b.astype(jnp.float32) + step).astype(b.dtype)
        layers[i] = dict(layers[i], mixer=mixer)
    return dict(params, layers=layers)


def routing_entropy(loads) -> jnp.ndarray:
    """Normalized entropy H(load / Σload) / log E per MoE layer ([n_moe_layers]; 1 = uniform)."""
    loads = jnp.asarray(loads, jnp.float32)
    p = loads / jnp.maximum(jnp.sum(loads, axis=-1, keepdims=True), 1e-20)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return h / jnp.log(loads.shape[-1])
