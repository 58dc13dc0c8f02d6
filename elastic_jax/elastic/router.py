"""The budget router (METHOD §5, §14.2): one tiny MLP per elastic axis, Gumbel-softmax over options.

    u (budget code, [n_budgets]) -> W1 (no bias) -> LeakyReLU(0.1) -> W2 (no bias) -> logits z
    z <- s_t · z                     (logit scale, linear 1 -> 10 over training)
    π = softmax((z + g) / τ_t)       (g ~ Gumbel(0, 1); τ annealed 1.0 -> 0.05)

The router does not see tokens: one configuration per forward pass / micro-batch. Homogeneous axes
emit [n_opts] logits; heterogeneous ones [n_layers_of_kind, n_opts] (the embedding axis is always
global). The probabilities feed `ej.SoftWidths` — soft: mask = Σ π_i prefix(option_i); hard: the
straight-through one-hot one_hot(argmax) + π − stop_gradient(π), exactly the chosen mask in value
with the soft gradient backwards (METHOD §4.3, §5.2). The depth head ("layers", when
`ElasticConfig.depth_options` is set) turns its π into layer gates Σ_i π_i·1[rank(l) < n_i].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig
from ..widths import PER_LAYER_AXES, SoftWidths, Widths
from .config import ElasticConfig
from .cost import depth_gates

LEAKY_SLOPE = 0.1


def _n_layers(cfg: NemotronHConfig, axis: str) -> int:
    return 1 if axis == "hidden" else cfg.count(PER_LAYER_AXES[axis])


def _hetero(ecfg: ElasticConfig, axis: str) -> bool:
    return ecfg.heterogeneous and axis not in ("hidden", "layers")


def head_options(cfg: NemotronHConfig, ecfg: ElasticConfig) -> dict:
    """Option counts of every router head: the width axes of `ecfg.options` plus "layers" (layer
    counts [n_opts]) when depth is elastic."""
    opts = dict(ecfg.options(cfg))
    depth = ecfg.depth_counts(cfg)
    if depth is not None:
        opts["layers"] = depth
    return opts


def router_shapes(cfg: NemotronHConfig, ecfg: ElasticConfig) -> dict:
    """{axis: {"w1": (n_budgets, router_dim), "w2": (router_dim, n_out)}} for every elastic axis."""
    out = {}
    for axis, opts in head_options(cfg, ecfg).items():
        n_out = opts.shape[-1] * (_n_layers(cfg, axis) if _hetero(ecfg, axis) else 1)
        out[axis] = {"w1": (ecfg.n_budgets, ecfg.router_dim), "w2": (ecfg.router_dim, n_out)}
    return out


def init_router(cfg: NemotronHConfig, ecfg: ElasticConfig, key: jax.Array) -> dict:
    """Router parameters: per axis two bias-free linears, weights ~ N(0, router_std²) (METHOD §5.1)."""
    shapes = router_shapes(cfg, ecfg)
    out = {}
    for i, (axis, sh) in enumerate(sorted(shapes.items())):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out[axis] = {"w1": ecfg.router_std * jax.random.normal(k1, sh["w1"], jnp.float32),
                     "w2": ecfg.router_std * jax.random.normal(k2, sh["w2"], jnp.float32)}
    return out


def router_axes(cfg: NemotronHConfig, ecfg: ElasticConfig) -> dict:
    """Logical axis names of the router params (all replicated: they are tiny)."""
    return {axis: {"w1": (None, None), "w2": (None, None)} for axis in router_shapes(cfg, ecfg)}


# ------------------------------------------------------------------------ budget code
def budget_code(ecfg: ElasticConfig, budget) -> jax.Array:
    """[n_budgets] f32 router input (METHOD §5.1): the one-hot of a trained budget; for an unseen
    budget, the linear interpolation (1-w)·e_i1 + w·e_i2 of its two neighbours; budgets above the
    largest / below the smallest trained one map to that one. Traceable in `budget` (no checks then).
    """
    if not isinstance(budget, jax.core.Tracer):
        b = float(np.asarray(budget))
        if not (0.0 < b <= 1.0):
            raise ValueError(f"budget={b!r}: must be in (0, 1] (a fraction of the parent cost)")
    asc = jnp.asarray(ecfg.budgets[::-1], jnp.float32)                   # ascending
    eye = jnp.eye(ecfg.n_budgets, dtype=jnp.float32)[::-1]               # row j = one-hot of asc[j]
    b = jnp.asarray(budget, jnp.float32)
    if ecfg.n_budgets == 1:
        return jnp.ones((1,), jnp.float32)
    return jax.vmap(lambda col: jnp.interp(b, asc, col), in_axes=1)(eye)


def budget_code_from_index(ecfg: ElasticConfig, idx) -> jax.Array:
    """One-hot [n_budgets] of a trained budget index (0 = the largest); `idx` may be traced."""
    return jax.nn.one_hot(idx, ecfg.n_budgets, dtype=jnp.float32)


def schedules(ecfg: ElasticConfig, step, total_steps) -> tuple[jax.Array, jax.Array]:
    """(τ, s) at `step` (METHOD §5.2): τ decays geometrically τ_start -> τ_end (τ_decay = (τ_end/
    τ_start)^(1/T), the official schedule with the decay chosen to land on τ_end at step T); the
    logit scale rises linearly scale_start -> scale_end. Clamped to the ends outside [0, T]."""
    t = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0),
                 0.0, 1.0)
    tau = ecfg.tau_start * (ecfg.tau_end / ecfg.tau_start) ** t
    scale = ecfg.scale_start + (ecfg.scale_end - ecfg.scale_start) * t
    return tau, scale


def router_key(key: jax.Array, step, microbatch=0, shard=None) -> jax.Array:
    """Deterministic Gumbel key for one (step, micro-batch[, data shard]):
    fold_in(fold_in(key, step), microbatch), then fold_in(·, shard) when a shard index is given, so
    data-parallel shards draw different noise as the official code does (METHOD §5.2)."""
    k = jax.random.fold_in(jax.random.fold_in(key, step), microbatch)
    return k if shard is None else jax.random.fold_in(k, shard)


def sample_hard(ecfg: ElasticConfig, key: jax.Array) -> jax.Array:
    """Bool: take a hard sample this step (probability `hard_sample_prob`, METHOD §5.2)."""
    return jax.random.uniform(key) < ecfg.hard_sample_prob


# ------------------------------------------------------------------------------ route
@dataclass(frozen=True)
class RouterOutput:
    """probs: axis -> π [n_opts] or [n_kind, n_opts]; choice: axis -> argmax (int32, same leading
    shape); soft_widths: the `ej.SoftWidths` to pass to `ej.forward`."""

    probs: Any
    choice: Any
    soft_widths: Any


jax.tree_util.register_dataclass(RouterOutput, data_fields=["probs", "choice", "soft_widths"], meta_fields=[])


def router_logits(router_params: dict, cfg: NemotronHConfig, ecfg: ElasticConfig, code) -> dict:
    """Raw (unscaled) logits per axis: [n_opts] or [n_kind, n_opts] (heterogeneous)."""
    opts = head_options(cfg, ecfg)
    code = jnp.asarray(code, jnp.float32)
    if code.shape != (ecfg.n_budgets,):
        raise ValueError(f"budget code has shape {code.shape}; expected ({ecfg.n_budgets},) = len(budgets)")
    out = {}
    for axis in opts:
        if axis not in router_params:
            raise ValueError(f"router params have no {axis!r} router; re-run init_router with this "
                             f"ElasticConfig (params axes: {sorted(router_params)})")
        p = router_params[axis]
        h = jax.nn.leaky_relu(code @ p["w1"], LEAKY_SLOPE)
        z = h @ p["w2"]
        n_opts = opts[axis].shape[-1]
        if _hetero(ecfg, axis):
            z = z.reshape(_n_layers(cfg, axis), n_opts)
        elif z.shape[-1] != n_opts:
            raise ValueError(f"router for {axis!r} has {z.shape[-1]} outputs but {n_opts} options; the "
                             "router params come from a different ElasticConfig")
        out[axis] = z
    return out


def route(router_params: dict, cfg: NemotronHConfig, ecfg: ElasticConfig, code, key, tau, scale, *,
          hard=False) -> RouterOutput:
    """Gumbel-softmax routing for one budget code (METHOD §5.2, §4.3).

    `key=None`: no Gumbel noise (deterministic, for evaluation). `hard` (Python or traced bool):
    the SoftWidths use the straight-through one-hot one_hot(argmax) + (π − stop_gradient(π)) instead
    of π: exactly the `Widths` forward of the chosen options in value, the soft gradient backwards
    (so every head, the expert count included, receives the KD gradient).
    """
    opts = head_options(cfg, ecfg)
    logits = router_logits(router_params, cfg, ecfg, code)
    probs, choice, mix = {}, {}, {}
    for i, axis in enumerate(sorted(opts)):
        z = logits[axis]
        if ecfg.normalize_logits and z.shape[-1] > 1:     # z <- s·z/std(z), per row (METHOD §5.2)
            z = z / (jnp.std(z, axis=-1, keepdims=True) + 1e-6)
        z = z * scale
        if key is not None:
            z = z + jax.random.gumbel(jax.random.fold_in(key, i), z.shape, jnp.float32)
        pi = jax.nn.softmax(z / tau, axis=-1)
        c = jnp.argmax(pi, axis=-1).astype(jnp.int32)
        probs[axis], choice[axis] = pi, c
        # pi - stop_gradient(pi) is exactly 0 in value: the hard mix is exactly one-hot
        hard_p = jax.nn.one_hot(c, pi.shape[-1], dtype=pi.dtype) + (pi - jax.lax.stop_gradient(pi))
        mix[axis] = jnp.where(jnp.asarray(hard), hard_p, pi) if not isinstance(hard, bool) else (
            hard_p if hard else pi)
    gates = None
    if "layers" in mix:
        gates = depth_gates(ecfg, cfg, mix["layers"])
    widths_opts = {a: o for a, o in opts.items() if a != "layers"}      # depth enters as the gates
    sw = SoftWidths.from_options(cfg, widths_opts, {a: mix[a] for a in widths_opts}, layers=gates,
                                 mask_form=ecfg.soft_mask_form or "output")
    return RouterOutput(probs=probs, choice=choice, soft_widths=sw)


def choices_to_widths(cfg: NemotronHConfig, ecfg: ElasticConfig, choice: dict) -> Widths:
    """Concrete argmax choices -> `ej.Widths` (ints; per-layer tuples for heterogeneous axes;
    `layers` the kept layers of the chosen depth)."""
    opts = ecfg.options(cfg)
    kw = {}
    if "layers" in choice:
        n_keep = int(ecfg.depth_counts(cfg)[int(np.asarray(choice["layers"]))])
        kw["layers"] = tuple(bool(r < n_keep) for r in ecfg.layer_rank())
    for axis, o in opts.items():
        c = np.asarray(choice[axis])
        n = _n_layers(cfg, axis)
        if o.ndim == 2:                                   # parent has per-layer sizes
            cc = np.broadcast_to(c, (n,))
            vals = tuple(int(o[j, cc[j]]) for j in range(n))
        else:
            vals = tuple(int(v) for v in np.atleast_1d(o[c]))
        if axis == "hidden":
            kw[axis] = vals[0]
        else:
            kw[axis] = vals[0] if len(set(vals)) == 1 and len(vals) in (1, n) else vals
    return Widths(**kw)


def budget_widths(router_params: dict, cfg: NemotronHConfig, ecfg: ElasticConfig, budget) -> Widths:
    """The submodel a trained router picks for `budget` (METHOD §8, §14.9): no noise, final τ and
    logit scale, argmax per axis (and per layer in heterogeneous mode)."""
    code = budget_code(ecfg, budget)
    out = route(router_params, cfg, ecfg, code, None, ecfg.tau_end, ecfg.scale_end)
    return choices_to_widths(cfg, ecfg, jax.device_get(out.choice))
