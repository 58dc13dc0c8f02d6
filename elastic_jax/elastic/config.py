"""`ElasticConfig`: budgets, option lists, router and budget-loss settings (METHOD §4.1, §5, §6.2).

One frozen dataclass, grouped like the official code's `FlextronConfig`:

* **budgets** — fractions of the parent cost (``budget_target``: active params, total params or
  deployment memory), kept sorted descending; 1.0 (the full model) must be one of them.
* **option lists** per elastic axis (``None`` = the axis is not elastic). Each is descending and
  starts with the full size. Entries are either fractions in (0, 1] (floored to the axis' step:
  the group size, and the NVFP4/FP8 block of 16 along reduction dimensions when quantizing) or
  absolute integers (validated, never rounded).
* **router** — hidden width, Gumbel temperature and logit-scale schedules, homogeneous vs
  per-layer (heterogeneous) routing, hard-sample probability.
* **budget loss** — target kind, λ, the 5% dead zone and the full-budget anchor weight.
* **memory** — context, batch and bytes per element of the deployment-memory cost.

`options(cfg)` turns the lists into absolute counts per axis (named as in `ej.Widths`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import NemotronHConfig
from ..config_base import ConfigBase
from ..model import kinds as _kinds  # noqa: F401  (the kinds register the axes OPTION_FIELDS reads)
from ..widths import AXES, PER_LAYER_AXES, Widths, divisor, full_size

OPTION_FIELDS = {      # ElasticConfig option-list field -> axis; the per-layer ones from their kinds' `Axis`
    "hidden_options": "hidden",
    **{spec.option_field: axis for axis, spec in AXES.items() if spec.option_field},
}
AXIS_FIELDS = {v: k for k, v in OPTION_FIELDS.items()}
# axes whose width is a reduction dimension of some matmul, and the channels per unit
# (hidden: in-projections; heads: out_proj / o_proj rows; ffn: down_proj rows). Expert count is not.
QUANT_BLOCK = 16
BUDGET_TARGETS = ("active", "total", "memory")
# budget_targets entry kinds: "params" is an alias of "total" (the issue's / Megatron's name)
TARGET_KINDS = BUDGET_TARGETS + ("params",)
QUANT_FORMATS = ("fp8", "nvfp4")
# bytes per weight element of a quantized deployment (NVFP4: 4 bits + one E4M3 scale per 16)
QUANT_BYTES = {None: 2.0, "fp8": 1.0, "nvfp4": 0.5625}


def _quant_unit(cfg: NemotronHConfig, axis: str) -> int:
    """Smallest count step along `axis` whose channel width is a multiple of QUANT_BLOCK."""
    spec = None if axis == "hidden" else AXES[axis]
    per_unit = 1 if spec is None else (None if spec.unit_width is None else spec.unit_width(cfg))
    if per_unit is None:          # expert count: not a reduction dimension
        return 1
    return QUANT_BLOCK // math.gcd(QUANT_BLOCK, per_unit)


def axis_step(cfg: NemotronHConfig, axis: str, quantization: str | None) -> tuple[int, str]:
    """(step every option count must be a multiple of, human-readable rule)."""
    div, div_name = divisor(cfg, axis)
    step, rules = div, ([f"divisible by {div_name}={div}"] if div_name and div > 1 else [])
    if quantization is not None:
        q = _quant_unit(cfg, axis)
        if q > 1:
            step = step * q // math.gcd(step, q)
            rules.append(f"a multiple of {q} so the channel width is a multiple of the {quantization} "
                         f"block {QUANT_BLOCK}")
    return step, " and ".join(rules) if rules else "a positive integer"


@dataclass(frozen=True)
class BudgetTarget:
    """One cost the budgets constrain: `kind` ("total"/"params", "active" or "memory"), the
    per-budget `ratios` of the parent cost (aligned with `ElasticConfig.budgets` *as given*;
    None = the budgets themselves) and the `weight` of its dead-zoned term in the budget loss."""

    kind: str = "active"
    ratios: tuple[float, ...] | None = None
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"BudgetTarget.kind={self.kind!r}: must be one of {TARGET_KINDS}")
        if self.ratios is not None:
            r = (self.ratios,) if isinstance(self.ratios, (int, float)) else self.ratios
            try:
                r = tuple(float(x) for x in r)
            except (TypeError, ValueError):
                raise ValueError(f"BudgetTarget.ratios={self.ratios!r}: must be numbers in (0, 1]") from None
            if any(not (0.0 < x <= 1.0) or not math.isfinite(x) for x in r):
                raise ValueError(f"BudgetTarget.ratios={self.ratios!r}: every ratio must be in (0, 1]")
            object.__setattr__(self, "ratios", r)
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"BudgetTarget.weight={self.weight!r}: must be >= 0")

    @property
    def cost_kind(self) -> str:
        return "total" if self.kind == "params" else self.kind


@dataclass(frozen=True)
class ElasticConfig(ConfigBase):
    """Elastic training settings. See the module docstring; METHOD §4-§6."""

    # ---- budgets: fractions of the parent cost, descending; 1.0 = the full model
    budgets: tuple[float, ...] = (1.0, 0.75, 0.5)
    # ---- option lists per axis (fractions in (0, 1] or absolute ints; None = not elastic)
    hidden_options: tuple | None = (1.0, 0.875, 0.75)
    mamba_options: tuple | None = (1.0, 0.75, 0.5)
    mamba_channel_options: tuple | None = None  # channels per Mamba head (the exported mamba_head_dim)
    attn_options: tuple | None = None          # Star Elastic routes no attention heads (METHOD §4.1)
    ffn_options: tuple | None = (1.0, 0.75, 0.5)
    moe_expert_options: tuple | None = (1.0, 0.75, 0.5)
    moe_ffn_options: tuple | None = (1.0, 0.75, 0.5)
    heterogeneous: bool = False                # per-layer choices (embedding stays global)
    # ---- router (METHOD §5)
    router_dim: int = 256
    router_std: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.05
    scale_start: float = 1.0
    scale_end: float = 10.0
    normalize_logits: bool = False             # z <- s·z/std(z) (Megatron --normalize-router-logits)
    hard_sample_prob: float = 0.004            # probability of a straight-through hard sample per step
    # where soft masks apply (SoftWidths.mask_form; identical for hard masks): "output" (after the
    # conv+SiLU / relu²) or "official" (Megatron --soft-mask: Mamba x, dt, conv-x; FFN before relu²).
    # None = "output" (a None default keeps older runs resumable)
    soft_mask_form: str | None = None
                                               # (official hard_sample_th = 0.996, METHOD §5.2)
    # ---- depth (Nemotron Elastic): layer-count options (fractions of / absolute layer counts) and the
    # importance ranking of the layers (most important first, `ej.elastic.rank_layers`)
    depth_options: tuple | None = None
    layer_ranking: tuple[int, ...] | None = None
    # ---- budget loss (METHOD §6.2)
    budget_target: str = "active"
    # several costs at once: BudgetTarget entries (or dicts); None = one `budget_target` term
    budget_targets: tuple | None = None
    budget_weight: float = 1.0
    dead_zone: float = 0.05
    anchor_weight: float = 10.0
    # ---- deployment memory (budget_target="memory"), bytes per element
    mem_context: int = 131072
    mem_batch: int = 1
    mem_bytes_param: float | None = None       # None: from `quantization` (bf16 2, fp8 1, nvfp4 0.5625)
    mem_bytes_kv: float = 2.0
    mem_bytes_ssm: float = 4.0                 # Nemotron-H keeps the SSM cache in fp32
    mem_bytes_conv: float | None = None        # None: same as the weights
    # ---- quantized nested checkpoints (METHOD §10)
    quantization: str | None = None

    def __post_init__(self):
        def bad(name, rule, value):
            raise ValueError(f"ElasticConfig.{name}={value!r}: {rule}")

        b = self.budgets
        if isinstance(b, (int, float)):
            b = (b,)
        try:
            b = tuple(float(x) for x in b)
        except (TypeError, ValueError):
            bad("budgets", "must be a sequence of numbers in (0, 1]", self.budgets)
        if not b:
            bad("budgets", "needs at least one budget", self.budgets)
        for x in b:
            if not (0.0 < x <= 1.0) or not math.isfinite(x):
                bad("budgets", f"every budget must be in (0, 1] (a fraction of the parent cost); got {x}",
                    self.budgets)
        if len(set(b)) != len(b):
            bad("budgets", "budgets must be distinct", self.budgets)
        if 1.0 not in b:
            bad("budgets", "must include 1.0 (the full model; its router is anchored to the largest "
                "options, METHOD §6.2)", self.budgets)
        object.__setattr__(self, "budgets", tuple(sorted(b, reverse=True)))

        for name in OPTION_FIELDS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, (int, float, np.integer, np.floating)):
                v = (v,)
            v = tuple(v.tolist() if isinstance(v, np.ndarray) else v)
            if not v:
                bad(name, "must be None (axis not elastic) or a non-empty tuple", getattr(self, name))
            kinds = {isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v}
            if len(kinds) != 1:
                bad(name, "mix fractions (floats in (0, 1]) and absolute sizes (ints); use one kind", v)
            if kinds == {True}:
                v = tuple(int(x) for x in v)
                if any(x <= 0 for x in v):
                    bad(name, "absolute sizes must be positive integers", v)
            else:
                if not all(isinstance(x, (float, np.floating)) for x in v):
                    bad(name, "entries must be floats in (0, 1] or positive ints", v)
                v = tuple(float(x) for x in v)
                if any(not (0.0 < x <= 1.0) for x in v):
                    bad(name, "fractions must be in (0, 1]", v)
                if v[0] != 1.0:
                    bad(name, "index 0 must be the full size (1.0)", v)
            if any(v[i] <= v[i + 1] for i in range(len(v) - 1)):
                bad(name, "options must be strictly descending (index 0 = the full size)", v)
            object.__setattr__(self, name, v)

        if not isinstance(self.router_dim, int) or self.router_dim <= 0:
            bad("router_dim", "must be a positive integer", self.router_dim)
        if not self.router_std > 0:
            bad("router_std", "must be > 0", self.router_std)
        for name in ("tau_start", "tau_end", "scale_start", "scale_end"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0", getattr(self, name))
        if not 0.0 <= self.hard_sample_prob <= 1.0:
            bad("hard_sample_prob", "must be in [0, 1]", self.hard_sample_prob)
        if self.soft_mask_form not in (None, "output", "official"):
            bad("soft_mask_form", "must be None, 'output' or 'official'", self.soft_mask_form)
        if self.budget_target not in BUDGET_TARGETS:
            bad("budget_target", f"must be one of {BUDGET_TARGETS}", self.budget_target)
        if self.budget_weight < 0:
            bad("budget_weight", "must be >= 0", self.budget_weight)
        if not 0.0 <= self.dead_zone < 1.0:
            bad("dead_zone", "must be in [0, 1)", self.dead_zone)
        if self.anchor_weight < 0:
            bad("anchor_weight", "must be >= 0", self.anchor_weight)
        for name in ("mem_context", "mem_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer", v)
        for name in ("mem_bytes_param", "mem_bytes_kv", "mem_bytes_ssm", "mem_bytes_conv"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(name, "must be > 0 bytes per element", v)
        if self.quantization not in (None,) + QUANT_FORMATS:
            bad("quantization", f"must be None or one of {QUANT_FORMATS}", self.quantization)
        self._init_targets(b, bad)
        self._init_depth(bad)

    def _init_targets(self, given_budgets, bad):
        """Normalize `budget_targets` to BudgetTarget entries whose ratios follow the sorted budgets."""
        if self.budget_targets is None:
            return
        ts = self.budget_targets
        if isinstance(ts, (BudgetTarget, dict)):
            ts = (ts,)
        try:
            ts = tuple(t if isinstance(t, BudgetTarget) else BudgetTarget(
                **{k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(t).items()}) for t in ts)
        except TypeError as e:
            bad("budget_targets", f"entries must be BudgetTarget or dicts of its fields ({e})", self.budget_targets)
        if not ts:
            bad("budget_targets", "needs at least one target (or None)", self.budget_targets)
        order = sorted(range(len(given_budgets)), key=lambda i: -given_budgets[i])
        out = []
        for t in ts:
            if t.ratios is not None:
                if len(t.ratios) != len(given_budgets):
                    bad("budget_targets", f"target {t.kind!r} has {len(t.ratios)} ratios; needs one per budget "
                        f"({len(given_budgets)})", self.budget_targets)
                r = tuple(t.ratios[i] for i in order)
                if r[0] != 1.0:
                    bad("budget_targets", f"target {t.kind!r}: the full budget (1.0) must have ratio 1.0", t.ratios)
                t = BudgetTarget(t.kind, r, t.weight)
            out.append(t)
        object.__setattr__(self, "budget_targets", tuple(out))

    def _init_depth(self, bad):
        v = self.depth_options
        if v is not None:
            v = (v,) if isinstance(v, (int, float)) else tuple(v)
            kinds = {isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v}
            if not v or len(kinds) != 1:
                bad("depth_options", "must be a non-empty tuple of fractions in (0, 1] or of layer counts", v)
            v = tuple(int(x) for x in v) if kinds == {True} else tuple(float(x) for x in v)
            if any(x <= 0 for x in v) or (kinds == {False} and (v[0] != 1.0 or max(v) > 1.0)):
                bad("depth_options", "fractions must be in (0, 1] with index 0 = 1.0; counts positive", v)
            if any(v[i] <= v[i + 1] for i in range(len(v) - 1)):
                bad("depth_options", "options must be strictly descending (index 0 = all layers)", v)
            object.__setattr__(self, "depth_options", v)
            if self.layer_ranking is None:
                bad("layer_ranking", "depth_options needs the layer ranking (most important first; "
                    "ej.elastic.rank_layers)", None)
        if self.layer_ranking is not None:
            r = tuple(int(x) for x in self.layer_ranking)
            if sorted(r) != list(range(len(r))):
                bad("layer_ranking", "must be a permutation of range(n_layers)", self.layer_ranking)
            object.__setattr__(self, "layer_ranking", r)

    def targets(self) -> tuple[BudgetTarget, ...]:
        """The budget-loss terms: `budget_targets`, or one `budget_target` term (ratios None = the
        budget value itself is the ratio of that cost)."""
        return self.budget_targets or (BudgetTarget(self.budget_target, None, 1.0),)

    def depth_counts(self, cfg: NemotronHConfig) -> np.ndarray | None:
        """Layer-count options [n_opts] (index 0 = every layer), or None when depth is not elastic."""
        if self.depth_options is None:
            return None
        n = cfg.num_hidden_layers
        if self.layer_ranking is not None and len(self.layer_ranking) != n:
            raise ValueError(f"ElasticConfig.layer_ranking has {len(self.layer_ranking)} entries; the model has "
                             f"{n} layers")
        v = self.depth_options
        c = [n] + [int(math.floor(f * n + 1e-9)) for f in v[1:]] if isinstance(v[0], float) else list(v)
        if c[0] != n or any(x < 1 for x in c) or len(set(c)) != len(c):
            raise ValueError(f"ElasticConfig.depth_options={v!r}: gives layer counts {c}; need distinct counts "
                             f"in [1, {n}] starting with {n}")
        return np.asarray(c, np.int64)

    def layer_rank(self) -> np.ndarray:
        """rank[l] = position of layer l in `layer_ranking` (0 = most important)."""
        r = np.empty(len(self.layer_ranking), np.int64)
        r[np.asarray(self.layer_ranking)] = np.arange(len(self.layer_ranking))
        return r

    # ----------------------------------------------------------------- derived
    @property
    def n_budgets(self) -> int:
        return len(self.budgets)

    @property
    def bytes_per_param(self) -> float:
        return QUANT_BYTES[self.quantization] if self.mem_bytes_param is None else float(self.mem_bytes_param)

    @property
    def bytes_conv(self) -> float:
        return self.bytes_per_param if self.mem_bytes_conv is None else float(self.mem_bytes_conv)

    def budget_index(self, budget: float) -> int:
        """Index of a trained budget; ValueError if `budget` is not one of `budgets`."""
        for i, b in enumerate(self.budgets):
            if abs(float(budget) - b) < 1e-9:
                return i
        raise ValueError(f"budget {budget!r} is not a trained budget; ElasticConfig.budgets={self.budgets}")

    def elastic_axes(self, cfg: NemotronHConfig) -> tuple[str, ...]:
        """Axes (ej.Widths names) that are elastic for this model: an option list is set and the
        pattern has layers of that kind."""
        return tuple(self.options(cfg))

    def options(self, cfg: NemotronHConfig) -> dict[str, np.ndarray]:
        """Absolute integer counts per elastic axis: `hidden` -> [n_opts]; a per-layer axis ->
        [n_opts], or [n_kind, n_opts] when the parent itself has per-layer sizes on that axis.

        Fractions are floored to the axis step (group size; quantization block). Axes whose layer
        kind is absent from the pattern are skipped. Raises ValueError naming the field and rule.
        """
        out: dict[str, np.ndarray] = {}
        for name, axis in OPTION_FIELDS.items():
            opts = getattr(self, name)
            if opts is None:
                continue
            if axis != "hidden" and cfg.count(PER_LAYER_AXES[axis]) == 0:
                continue
            n = 1 if axis == "hidden" else cfg.count(PER_LAYER_AXES[axis])
            fulls = [full_size(cfg, axis, i) for i in range(n)]
            step, rule = axis_step(cfg, axis, self.quantization)
            rows = []
            for full in fulls:
                if isinstance(opts[0], float):
                    row = [int(math.floor(f * full + 1e-9) // step * step) for f in opts]
                    row[0] = full
                    for f, c in zip(opts, row):
                        if c <= 0:
                            raise ValueError(f"ElasticConfig.{name}={opts!r}: fraction {f} of {full} floors "
                                             f"to {c}; counts must be positive and {rule}")
                    if len(set(row)) != len(row):
                        raise ValueError(f"ElasticConfig.{name}={opts!r}: fractions of {full} floored to "
                                         f"multiples of {step} give duplicate counts {row}")
                else:
                    row = list(opts)
                    if row[0] != full:
                        raise ValueError(f"ElasticConfig.{name}={opts!r}: index 0 must be the full size "
                                         f"{full} of axis {axis!r}")
                for c in row:
                    if c > full:
                        raise ValueError(f"ElasticConfig.{name}={opts!r}: {c} exceeds the parent size {full}")
                    if c % step and c != full:
                        raise ValueError(f"ElasticConfig.{name}={opts!r}: {c} must be {rule}")
                    try:
                        Widths(**{axis: c}).validate(cfg if axis == "hidden" else _homog(cfg, axis, full))
                    except ValueError as e:
                        raise ValueError(f"ElasticConfig.{name}={opts!r}: option {c} is invalid: {e}") from None
                rows.append(row)
            arr = np.asarray(rows, np.int64)
            uniform = all(r == rows[0] for r in rows)
            out[axis] = arr[0] if uniform else arr
        return out



def _homog(cfg: NemotronHConfig, axis: str, full: int) -> NemotronHConfig:
    """cfg with one layer's full size on `axis` everywhere (to validate a per-layer option)."""
    if not cfg.is_heterogeneous:
        return cfg
    per_layer = {spec.per_layer_field: None for spec in AXES.values() if spec.per_layer_field}
    return cfg.replace(**{AXES[axis].field: full, **per_layer})
