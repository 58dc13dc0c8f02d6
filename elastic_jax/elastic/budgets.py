"""Budgets that mean what they say (METHOD §8): the widths a trained budget names, their measured
size, and uniform widths for a requested size.

* `trained_widths`: the router's widths for a budget inside the trained range; "100%" (budget 1.0)
  is always the parent itself, and a budget outside [smallest, largest] trained budget is refused
  with the range named (the router only interpolates between the budgets it was trained on).
* `measured_fraction` / `check_budget_size`: a budget's size as a fraction of the parent's, in the
  cost the budgets constrain (`ElasticConfig.budget_target`); a miss beyond `tolerance` warns.
* `widths_for_budget(cfg, 0.5, target=...)`: uniform widths (every layer alike, so the slice is a
  plain `nemotron_h` model vLLM serves) whose measured size is closest to the fraction.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..config import NemotronHConfig
from ..widths import AXES, Widths
from .config import ElasticConfig
from .slicing import param_count

TARGETS = ("params", "active", "memory")
DEFAULT_TOLERANCE = 0.05      # |measured - budget| in fractions of the parent (the budget loss's dead zone)
UNIFORM_AXES = ("hidden", "mamba_heads", "attn_heads", "ffn", "moe_experts", "moe_ffn")


class BudgetSizeWarning(UserWarning):
    """A budget's measured size misses its target fraction by more than the tolerance."""


def _kind(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    return {"params": "total"}.get(target, target)


def size(cfg: NemotronHConfig, widths: Widths | None, target: str = "params",
         ecfg: ElasticConfig | None = None) -> float:
    """The size of the sliced model in `target` units: parameters, active parameters, or
    deployment bytes (weights + decode state, `ElasticConfig`'s memory settings)."""
    kind = _kind(target)
    if kind != "memory":
        return float(param_count(cfg, widths, active=kind == "active"))
    from .cost import cost
    w = Widths() if widths is None else widths
    expected = {a: np.asarray(getattr(w, a), np.float32) for a in ("hidden",) + tuple(AXES)
                if getattr(w, a) is not None}
    if w.layers is not None:
        expected["layers"] = np.asarray(w.layer_mask(cfg), np.float32)
    return float(cost(cfg, ecfg or ElasticConfig(), expected, "memory"))


def measured_fraction(cfg: NemotronHConfig, widths: Widths | None, target: str = "params",
                      ecfg: ElasticConfig | None = None) -> float:
    return size(cfg, widths, target, ecfg) / size(cfg, None, target, ecfg)


def check_budget_size(cfg, widths, budget: float, target: str = "params", ecfg=None,
                      tolerance: float = DEFAULT_TOLERANCE, name: str | None = None) -> float:
    """The measured fraction; warns (`BudgetSizeWarning`) when it misses `budget` by more than
    `tolerance`."""
    got = measured_fraction(cfg, widths, target, ecfg)
    if abs(got - budget) > tolerance:
        warnings.warn(f"budget {name or budget}: the sliced model has {100 * got:.1f}% of the parent's {target} "
                      f"(target {100 * budget:.1f}%, tolerance ±{100 * tolerance:.0f} points); the router has not "
                      "learned this budget's size (train longer, or slice uniform widths with "
                      "ej.widths_for_budget)", BudgetSizeWarning, stacklevel=2)
    return got


def target_of(ecfg: ElasticConfig) -> str:
    """The `TARGETS` name of the cost an ElasticConfig's budgets constrain."""
    return {"total": "params", "params": "params", "active": "active", "memory": "memory"}[ecfg.budget_target]


def trained_widths(router_params, cfg: NemotronHConfig, ecfg: ElasticConfig, budget: float) -> Widths:
    """The widths of a trained budget: the parent for 1.0, the router's choice inside the trained
    range; a budget outside it raises ValueError naming the range."""
    b = float(budget)
    lo, hi = min(ecfg.budgets), max(ecfg.budgets)
    if not (lo - 1e-9 <= b <= hi + 1e-9):
        raise ValueError(f"budget {b:g} is outside the trained range [{lo:g}, {hi:g}] (ElasticConfig.budgets "
                         f"{list(ecfg.budgets)}); the router only knows sizes between its trained budgets, so "
                         "pick one in that range or slice explicit --widths")
    if abs(b - 1.0) < 1e-9:
        return Widths()
    from .router import budget_widths
    return budget_widths(router_params, cfg, ecfg, b)


def budget_family(router_params, cfg: NemotronHConfig, ecfg: ElasticConfig) -> dict[str, Widths]:
    """{"100%": Widths() (the parent), "75%": ..., ...}: every trained budget's widths."""
    return {f"{round(100 * b):d}%": trained_widths(router_params, cfg, ecfg, b) for b in ecfg.budgets}


def _uniform(cfg: NemotronHConfig, s: float) -> Widths:
    kw = {}
    for a in UNIFORM_AXES:
        if a == "hidden":
            full = cfg.hidden_size           # multiples of 16 (NVFP4 blocks) on real models
            g = 16 if cfg.hidden_size % 16 == 0 and cfg.hidden_size >= 256 else 1
        else:
            spec = AXES[a]
            if not cfg.count(spec.kind):
                continue
            full, g = spec.size(cfg, 0), spec.groups(cfg)
            if a == "moe_experts":
                g = max(g, 1)
        v = max(g, int(np.floor(s * full / g)) * g)
        if a == "moe_experts":
            while v < cfg.num_experts_per_tok and v < full:
                v += g
        kw[a] = min(v, full)
    return Widths(**kw)


def widths_for_budget(cfg: NemotronHConfig, fraction: float, target: str = "params",
                      ecfg: ElasticConfig | None = None) -> Widths:
    """Uniform widths (one size per axis for every layer: hidden, Mamba heads, attention heads, MLP,
    experts, expert width, each shrunk by one common factor and rounded down to its group size)
    whose measured `target` size ("params", "active" or "memory") is closest to `fraction` of
    the parent. 1.0 gives the parent; a fraction below the smallest uniform model raises ValueError."""
    f = float(fraction)
    if not (0.0 < f <= 1.0) or not np.isfinite(f):
        raise ValueError(f"fraction={fraction!r}: must be in (0, 1] (a fraction of the parent's {target})")
    _kind(target)
    if cfg.is_heterogeneous:
        raise ValueError("widths_for_budget needs a homogeneous parent config")
    if f == 1.0:
        return Widths()
    full = size(cfg, None, target, ecfg)
    seen: dict = {}
    for s in np.linspace(1.0, 0.0, 401)[:-1]:
        w = _uniform(cfg, float(s))
        key = tuple(getattr(w, a) for a in UNIFORM_AXES)
        if key in seen:
            continue
        try:
            seen[key] = (w, size(cfg, w, target, ecfg) / full)
        except ValueError:        # not a valid slice (e.g. too few experts per routing group)
            seen[key] = None
    seen = {k: v for k, v in seen.items() if v is not None}
    smallest = min(r for _, r in seen.values())
    if f < smallest - DEFAULT_TOLERANCE:
        raise ValueError(f"fraction={f:g}: the smallest uniform slice of this model has {100 * smallest:.1f}% of "
                         f"its {target}")
    return min(seen.values(), key=lambda wr: (abs(wr[1] - f), -wr[1]))[0]
