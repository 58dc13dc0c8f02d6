"""Differentiable cost model and budget loss (METHOD §6.2, §6.4, §14.6).

Costs are analytic functions of the (expected, real-valued) width along every axis, so the budget
loss differentiates through d̄ = π · options into the router. At integer widths `param_cost` equals
`ej.param_count` (the size of `ej.slice_params` output) exactly; unlike the official counter
(§6.4) it counts the MoE shared expert as h·shared per matrix (not ffn·shared) and uses the model's
real n_groups instead of a hard-coded 8.

`expected` maps ej.Widths axis names to arrays: "hidden" a scalar, per-layer axes a scalar
(every layer of that kind) or [n_kind]; "layers" optionally [n_layers] gates (a dropped layer
costs nothing). Missing axes are at the parent size.

The integer-width twin is `model.cost.CostModel` (FLOPs and bytes of calls, the planner, the
latency model, budget control); both read the kinds' declarations (`params`, `dims`,
`cache_elems`) and agree at integer widths (tests/test_cost.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import NemotronHConfig
from ..model.kinds import KINDS
from ..model.kinds.base import count
from ..widths import PER_LAYER_AXES, full_size
from .config import ElasticConfig


def _per_layer(cfg: NemotronHConfig, expected: dict, axis: str) -> jax.Array:
    n = cfg.count(PER_LAYER_AXES[axis])
    v = expected.get(axis)
    if v is None:
        return jnp.asarray([full_size(cfg, axis, i) for i in range(n)], jnp.float32)
    return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))


def _hidden(cfg: NemotronHConfig, expected: dict) -> jax.Array:
    v = expected.get("hidden")
    return jnp.asarray(cfg.hidden_size if v is None else v, jnp.float32).reshape(())


def _gates(cfg: NemotronHConfig, expected: dict, char: str) -> jax.Array:
    """Layer gates of the layers of one kind ([n_kind], ones when no depth gates given)."""
    g = expected.get("layers")
    idx = cfg.layer_indices(char)
    if g is None:
        return jnp.ones((len(idx),), jnp.float32)
    return jnp.asarray(g, jnp.float32).reshape(cfg.num_hidden_layers)[jnp.asarray(idx, jnp.int32)] if idx else \
        jnp.zeros((0,), jnp.float32)


def _kind_per_layer(cfg: NemotronHConfig, expected: dict, kind, D, active: bool = False) -> dict:
    """Named dimension sizes of the layers of one kind, each [n_kind] (or a scalar)."""
    return kind.dims(cfg, D, {a: _per_layer(cfg, expected, a) for a in kind.AXES}, active)


def param_cost(cfg: NemotronHConfig, expected: dict, active: bool = False) -> jax.Array:
    """Analytic parameter count (f32 scalar) at the given widths (METHOD §6.4, corrected).

    embed V·D + lm_head D·V + norm_f D, plus per kept layer its norm D and Σ over the parameters
    its kind declares of Π of their dimension sizes (elastic_jax/model/kinds/), the sizes computed
    from the expected widths; with `active` a MoE layer's stacked expert axis counts the
    `num_experts_per_tok` experts one token touches (the router still counts all E).
    """
    D = _hidden(cfg, expected)
    total = 2.0 * float(cfg.vocab_size) * D + D
    for char, kind in KINDS.items():
        if cfg.count(char):
            per = D + count(kind.params(cfg), _kind_per_layer(cfg, expected, kind, D, active))
            total = total + jnp.sum(_gates(cfg, expected, char) * per)
    return total


def memory_cost(cfg: NemotronHConfig, expected: dict, *, context: int, batch: int, bytes_per_param: float,
                bytes_kv: float, bytes_ssm: float, bytes_conv: float | None = None) -> jax.Array:
    """Deployment memory in bytes (f32 scalar): weights (all parameters; every expert is resident)
    + each kind's decode state (`cache_elems`): attention KV cache 2·B·ctx·nKV·hd per attention
    layer, Mamba SSM state B·H·P·N and conv window B·(K-1)·(H·P + 2·G·N) per Mamba layer.
    `bytes_conv` defaults to `bytes_per_param` (the conv window is kept in the weight dtype, as
    `ej.init_cache` does). Activation buffers are not counted.
    """
    bytes_of = {"kv": bytes_kv, "ssm": bytes_ssm, "conv": bytes_per_param if bytes_conv is None else bytes_conv}
    mem = bytes_per_param * param_cost(cfg, expected, active=False)
    D = _hidden(cfg, expected)
    for char, kind in KINDS.items():
        if cfg.count(char):
            g = _gates(cfg, expected, char)
            elems = kind.cache_elems(cfg, _kind_per_layer(cfg, expected, kind, D), batch, context)
            for cls, n in elems.items():
                mem = mem + bytes_of[cls] * jnp.sum(g * n)
    return mem


def cost(cfg: NemotronHConfig, ecfg: ElasticConfig, expected: dict, kind: str | None = None) -> jax.Array:
    """One cost of the widths: `kind` "active" / "total" (alias "params") / "memory"; default
    `ecfg.budget_target`."""
    kind = ecfg.budget_target if kind is None else kind
    if kind == "memory":
        return memory_cost(cfg, expected, context=ecfg.mem_context, batch=ecfg.mem_batch,
                           bytes_per_param=ecfg.bytes_per_param, bytes_kv=ecfg.mem_bytes_kv,
                           bytes_ssm=ecfg.mem_bytes_ssm, bytes_conv=ecfg.bytes_conv)
    return param_cost(cfg, expected, active=kind == "active")


def depth_gates(ecfg: ElasticConfig, cfg: NemotronHConfig, probs) -> jax.Array:
    """Layer gates [n_layers] = Σ_i π_i · 1[rank(layer) < n_i] (Nemotron Elastic depth axis)."""
    counts = jnp.asarray(ecfg.depth_counts(cfg), jnp.int32)
    rank = jnp.asarray(ecfg.layer_rank(), jnp.int32)
    keep = (rank[None, :] < counts[:, None]).astype(jnp.float32)             # [n_opts, n_layers]
    return jnp.sum(jnp.asarray(probs, jnp.float32)[:, None] * keep, axis=0)


def expected_widths(router_out, ecfg: ElasticConfig, cfg: NemotronHConfig) -> dict:
    """d̄ = π · options per axis (METHOD §6.2 step 1): "hidden" a scalar, per-layer axes [n_kind]
    (heterogeneous) or a scalar (homogeneous); "layers" the expected depth gates [n_layers] when
    depth is elastic. Non-elastic axes are absent (= parent size)."""
    opts = ecfg.options(cfg)
    out = {axis: jnp.sum(router_out.probs[axis] * jnp.asarray(o, jnp.float32), axis=-1)
           for axis, o in opts.items()}
    if "layers" in router_out.probs:
        out["layers"] = depth_gates(ecfg, cfg, router_out.probs["layers"])
    return out


def anchor_term(probs: dict) -> jax.Array:
    """Σ_axes MSE(π_axis, one_hot(0)): the official full-budget anchor; in heterogeneous mode the
    MSE averages over layers and options alike (METHOD §6.2 step 5)."""
    anchor = jnp.zeros((), jnp.float32)
    for pi in probs.values():
        target = jax.nn.one_hot(0, pi.shape[-1], dtype=pi.dtype)
        anchor = anchor + jnp.mean(jnp.square(pi - target))
    return anchor


def budget_loss(cfg: NemotronHConfig, ecfg: ElasticConfig, router_out, budget, is_full, *,
                budget_idx=None) -> jax.Array:
    """Router loss (METHOD §6.2), f32 scalar; `budget`, `is_full`, `budget_idx` may be traced:

        Σ_targets w_t · diff_t,  diff_t = |cost_t(d̄) / (r_t · cost_t(full)) − 1|,
                                 zeroed when not full and diff_t < dead_zone;
        + anchor_weight · Σ_axes MSE(π_axis, one_hot(0))   when the budget is the full one.

    r_t is the target's ratio for this budget (`BudgetTarget.ratios[budget_idx]`; the budget value
    itself when the target has no ratios). `budget_idx` defaults to the trained budget nearest to
    `budget`. One target is the official loss; `budget_targets` constrains several costs at once
    (e.g. total and active parameters). The caller multiplies by λ (`ecfg.budget_weight`)."""
    b = jnp.asarray(budget, jnp.float32)
    if budget_idx is None:
        budget_idx = jnp.argmin(jnp.abs(jnp.asarray(ecfg.budgets, jnp.float32) - b))
    is_full = jnp.asarray(is_full, bool)
    expected = expected_widths(router_out, ecfg, cfg)
    total = jnp.zeros((), jnp.float32)
    for t in ecfg.targets():
        full = cost(cfg, ecfg, {}, t.cost_kind)
        c = cost(cfg, ecfg, expected, t.cost_kind)
        r = b if t.ratios is None else jnp.asarray(t.ratios, jnp.float32)[budget_idx]
        diff = jnp.abs(c / (r * full) - 1.0)
        diff = jnp.where(jnp.logical_or(is_full, diff >= ecfg.dead_zone), diff, 0.0)
        total = total + t.weight * diff
    return total + jnp.where(is_full, ecfg.anchor_weight * anchor_term(router_out.probs), 0.0)
