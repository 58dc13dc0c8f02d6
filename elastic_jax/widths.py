"""Nested submodels: `Widths` (hard sizes) and `SoftWidths` (probability mixes of prefix masks).

METHOD §4. Every elastic axis keeps a *prefix* of importance-sorted components:
  hidden       first d channels of the residual stream (RMSNorm corrected with eps·ρ and √ρ);
  mamba_heads  first k/g heads of every Mamba group (B and C never masked);
  mamba_channels first p channels of every Mamba head (the head dim; exported as mamba_head_dim);
  attn_heads   first k/kv query heads of every KV group;
  ffn          first n neurons of each dense MLP;
  moe_experts  first e/n_group experts of every routing group (router logits -inf beyond);
  moe_ffn      first w intermediate channels of every routed expert;
  layers       per-layer gates (a dropped layer is the identity).

`SoftWidths` holds, per axis, option counts and their probabilities (`[..., n_opts]`); the mask
is Σ_i π_i · prefix(count_i). A `Widths` is the one-option, probability-1 case, so the hard and
soft forms run the same code and one compiled program serves every budget.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import NemotronHConfig
from .registry import AXES, Axis, on_axes_changed
from .registry import register_axis as _register_axis

# The one table of the per-layer elastic axes: each kind module declares its axes (`AXES`) and
# `model.kinds.register` adds them here (and the `Widths` / `SoftWidths` field with them).
PER_LAYER_AXES: dict[str, str] = {}      # axis name -> pattern character (kept equal to AXES)


class _WidthAxes(Sequence):
    """("hidden",) + the registered axes, read live (a module that imported it before an axis was
    registered still sees that axis)."""

    def _names(self) -> tuple[str, ...]:
        return ("hidden",) + tuple(AXES)

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return 1 + len(AXES)

    def __add__(self, other):
        return self._names() + tuple(other)

    def __radd__(self, other):
        return tuple(other) + self._names()

    def __eq__(self, other):
        return self._names() == tuple(other) if isinstance(other, (tuple, list, Sequence)) else NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._names())


WIDTH_AXES = _WidthAxes()


def register_axis(name: str, axis: Axis) -> None:
    """Declare a per-layer elastic axis: `Widths.<name>` / `SoftWidths.<name>` exist from then on."""
    _register_axis(name, axis)


def full_size(cfg: NemotronHConfig, axis: str, i: int = 0) -> int:
    """The parent size along `axis` for the i-th layer of that kind."""
    if axis == "hidden":
        return cfg.hidden_size
    return AXES[axis].size(cfg, i)


def divisor(cfg: NemotronHConfig, axis: str) -> tuple[int, str | None]:
    """Group divisibility each axis must respect (value, name of the rule's field)."""
    if axis == "hidden":
        return 1, None
    spec = AXES[axis]
    return spec.groups(cfg), spec.group_field


def _is_concrete(v) -> bool:
    try:
        np.asarray(v)
        return not isinstance(v, jax.core.Tracer)
    except Exception:
        return False


class Widths:
    """Active sizes of one nested submodel. `None` = full along that axis. See module docstring.

    A frozen dataclass with the fields `hidden`, one per registered axis (`AXES`, in order) and
    `layers` (`_declare_fields`)."""

    @classmethod
    def full(cls, cfg: NemotronHConfig) -> "Widths":
        """The full model, every field filled (as arrays)."""
        return cls().resolve(cfg)

    def per_layer(self, cfg: NemotronHConfig, axis: str) -> tuple[int, ...]:
        """Concrete per-layer values of one axis (validated)."""
        self.validate(cfg)
        char = PER_LAYER_AXES[axis]
        n = cfg.count(char)
        v = getattr(self, axis)
        if v is None:
            return tuple(full_size(cfg, axis, i) for i in range(n))
        arr = np.asarray(v).reshape(-1)
        if arr.size == 1:
            return (int(arr[0]),) * n
        return tuple(int(x) for x in arr)

    def layer_mask(self, cfg: NemotronHConfig) -> tuple[bool, ...]:
        if self.layers is None:
            return (True,) * cfg.num_hidden_layers
        return tuple(bool(x) for x in np.asarray(self.layers).reshape(-1))

    def hidden_size(self, cfg: NemotronHConfig) -> int:
        return cfg.hidden_size if self.hidden is None else int(np.asarray(self.hidden))

    # ------------------------------------------------------------- validation
    def validate(self, cfg: NemotronHConfig) -> "Widths":
        """Raise ValueError naming the axis, the value and the rule. Traced values are skipped."""
        for axis in WIDTH_AXES:
            v = getattr(self, axis)
            if v is None or not _is_concrete(v):
                continue
            try:
                arr = np.asarray(v)
            except (ValueError, TypeError):
                raise ValueError(f"Widths.{axis}={v!r}: must be an int or a sequence of ints") from None
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise ValueError(f"Widths.{axis}={v!r}: must be finite integers (a size, not inf / nan)")
            if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
                raise ValueError(f"Widths.{axis}={v!r}: must be integers")
            if not np.issubdtype(arr.dtype, np.integer):
                if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
                    arr = arr.astype(np.int64)
                else:
                    raise ValueError(f"Widths.{axis}={v!r}: must be integers")
            if axis == "hidden":
                if arr.ndim != 0:
                    raise ValueError(f"Widths.hidden={v!r}: must be a single int (the embedding axis is global)")
                values = [(int(arr), cfg.hidden_size)]
            else:
                n = cfg.count(PER_LAYER_AXES[axis])
                if n == 0 and arr.shape == (0,):
                    continue   # a resolved width of a kind the pattern lacks: one value per layer, none
                if n == 0:
                    raise ValueError(f"Widths.{axis}={v!r}: the pattern {cfg.pattern!r} has no "
                                     f"'{PER_LAYER_AXES[axis]}' layer")
                flat = arr.reshape(-1)
                if arr.ndim > 1 or (arr.ndim == 1 and flat.size != n):
                    raise ValueError(f"Widths.{axis}={v!r}: a tuple needs one value per "
                                     f"'{PER_LAYER_AXES[axis]}' layer ({n}), got {flat.size}")
                vals = [int(flat[0])] * n if arr.ndim == 0 else [int(x) for x in flat]
                values = [(x, full_size(cfg, axis, i)) for i, x in enumerate(vals)]
            div, div_name = divisor(cfg, axis)
            for x, full in values:
                if x <= 0:
                    raise ValueError(f"Widths.{axis}={v!r}: must be > 0 (got {x})")
                if x > full:
                    raise ValueError(f"Widths.{axis}={v!r}: {x} exceeds the parent size {full}")
                if x % div:
                    raise ValueError(f"Widths.{axis}={v!r}: {x} must be divisible by {div_name}={div}")
                if axis != "hidden" and AXES[axis].check is not None:
                    AXES[axis].check(cfg, x, f"Widths.{axis}={v!r}")
        if self.layers is not None and _is_concrete(self.layers):
            arr = np.asarray(self.layers).reshape(-1)
            if arr.size != cfg.num_hidden_layers:
                raise ValueError(f"Widths.layers has {arr.size} entries; the pattern has "
                                 f"{cfg.num_hidden_layers} layers")
            if not np.all((arr == 0) | (arr == 1)):
                raise ValueError(f"Widths.layers={self.layers!r}: entries must be booleans")
            if not np.any(arr):
                raise ValueError(f"Widths.layers={self.layers!r}: drops every layer; keep at least one")
        return self

    # ---------------------------------------------------------------- arrays
    def resolve(self, cfg: NemotronHConfig) -> "Widths":
        """Validated, every field an array: hidden [], per-kind [n_kind] int32, layers [n_layers] bool.

        Pass resolved widths to a jitted forward: every budget then has the same pytree structure
        and dtypes, so a new width never recompiles.
        """
        self.validate(cfg)
        out = {}
        for axis in WIDTH_AXES:
            v = getattr(self, axis)
            if axis == "hidden":
                out[axis] = jnp.asarray(cfg.hidden_size if v is None else v, jnp.int32).reshape(())
                continue
            n = cfg.count(PER_LAYER_AXES[axis])
            if v is None:
                out[axis] = jnp.asarray([full_size(cfg, axis, i) for i in range(n)], jnp.int32).reshape(n)
            else:
                out[axis] = jnp.broadcast_to(jnp.asarray(v, jnp.int32), (n,))
        out["layers"] = (jnp.ones((cfg.num_hidden_layers,), bool) if self.layers is None
                         else jnp.asarray(self.layers, bool).reshape(cfg.num_hidden_layers))
        return Widths(**out)

    def to_soft(self, cfg: NemotronHConfig) -> "SoftWidths":
        r = self.resolve(cfg)
        one = lambda c: (c[..., None], jnp.ones(c.shape + (1,), jnp.float32))
        return SoftWidths(**{a: one(getattr(r, a)) for a in WIDTH_AXES},
                          layers=r.layers.astype(jnp.float32))


class SoftWidths:
    """Per axis a pair (counts int32 [..., n_opts], probs float [..., n_opts]); hidden has no layer
    axis, per-layer axes are [n_kind, n_opts]; `layers` is a float gate per layer [n_layers].

    The mask of an axis is Σ_i probs_i · prefix(counts_i) (group-aware where the axis has groups).
    Probabilities need not sum to 1 (a user mix may be partial). An axis declared `full_is_none`
    (`mamba_channels`) is None when not elastic: the mixer skips that masking work.

    A frozen dataclass with the fields `hidden`, one per registered axis, `layers` and the static
    `mask_form`: where soft masks apply (equal for hard masks). "output": after conv+SiLU (Mamba x)
    and after relu² (FFN), so a soft FFN is the π-mixture of the nested FFNs. "official": the
    Megatron --soft-mask form: Mamba z, x, dt at the projection output and the conv-x weights/bias;
    the FFN before relu² (relu²(m·h) = m²·relu²(h) for a soft m).
    """

    @classmethod
    def from_options(cls, cfg: NemotronHConfig, options: dict, probs: dict, layers=None,
                     mask_form: str = "output") -> "SoftWidths":
        """Build from option lists (`options[axis]`: counts [n_opts] or [n_kind, n_opts]) and router
        probabilities (`probs[axis]`: [n_opts] homogeneous or [n_kind, n_opts] per layer).
        Axes missing from `options` are full. Concrete inputs are validated like `Widths`
        (`check_options`); traced ones (inside jit) are not."""
        check_options(cfg, options, probs, layers)
        out = {}
        for axis in WIDTH_AXES:
            n = None if axis == "hidden" else cfg.count(PER_LAYER_AXES[axis])
            if axis in options and options[axis] is not None:
                c = jnp.asarray(options[axis], jnp.int32)
                p = jnp.asarray(probs[axis], jnp.float32)
                if n is not None:
                    c = jnp.broadcast_to(c, (n, c.shape[-1]))
                    p = jnp.broadcast_to(p, (n, p.shape[-1]))
                out[axis] = (c, p)
            elif axis != "hidden" and AXES[axis].full_is_none:
                out[axis] = None                  # not elastic: no masking work (e.g. the full head dim)
            else:
                if axis == "hidden":
                    out[axis] = (jnp.asarray([cfg.hidden_size], jnp.int32), jnp.ones((1,), jnp.float32))
                else:
                    full = [full_size(cfg, axis, i) for i in range(n)]
                    out[axis] = (jnp.asarray(full, jnp.int32).reshape(n, 1), jnp.ones((n, 1), jnp.float32))
        gates = jnp.ones((cfg.num_hidden_layers,), jnp.float32) if layers is None else jnp.asarray(layers, jnp.float32)
        if mask_form not in MASK_FORMS:
            raise ValueError(f"SoftWidths.from_options: mask_form={mask_form!r}; must be one of {MASK_FORMS}")
        return cls(**out, layers=gates, mask_form=mask_form)


def check_options(cfg: NemotronHConfig, options: dict, probs: dict, layers=None) -> None:
    """ValueError naming the axis for concrete `SoftWidths.from_options` inputs that are wrong:
    unknown axes, counts out of range or not divisible (as `Widths.validate`), probabilities
    missing, non-finite or negative, shapes of counts and probabilities that differ."""
    if not isinstance(options, dict) or not isinstance(probs, dict):
        raise TypeError("SoftWidths.from_options: options and probs must be dicts of axis -> array")
    unknown = sorted(set(options) - set(WIDTH_AXES))
    if unknown:
        raise ValueError(f"SoftWidths.from_options: unknown axes {unknown}; known: {list(WIDTH_AXES)}")
    for axis, c in options.items():
        if c is None:
            continue
        if axis not in probs or probs[axis] is None:
            raise ValueError(f"SoftWidths.from_options: options[{axis!r}] given but no probs[{axis!r}]")
        p = probs[axis]
        if not (_is_concrete(c) and _is_concrete(p)):
            continue
        ca, pa = np.asarray(c), np.asarray(p, np.float64)
        n = None if axis == "hidden" else cfg.count(PER_LAYER_AXES[axis])
        if ca.ndim == 0 or ca.ndim > (1 if n is None else 2) or (ca.ndim == 2 and ca.shape[0] != n):
            raise ValueError(f"SoftWidths.from_options: options[{axis!r}] has shape {ca.shape}; expected [n_opts]"
                             + ("" if n is None else f" or [{n}, n_opts]"))
        if pa.shape[-1:] != ca.shape[-1:] or pa.ndim > (1 if n is None else 2) or (pa.ndim == 2 and pa.shape[0] != n):
            raise ValueError(f"SoftWidths.from_options: probs[{axis!r}] has shape {pa.shape}, options[{axis!r}] "
                             f"{ca.shape}; one probability per option")
        if not np.all(np.isfinite(pa)) or np.any(pa < 0):
            raise ValueError(f"SoftWidths.from_options: probs[{axis!r}] must be finite and >= 0, got {pa.tolist()}")
        if axis == "hidden":
            for x in ca.reshape(-1):
                Widths(hidden=x).validate(cfg)
        else:
            rows = ca if ca.ndim == 2 else np.broadcast_to(ca, (n, ca.shape[-1]))
            for j in range(rows.shape[1]):
                Widths(**{axis: tuple(rows[:, j].tolist())}).validate(cfg)
    if layers is not None and _is_concrete(layers):
        g = np.asarray(layers, np.float64).reshape(-1)
        if g.size != cfg.num_hidden_layers:
            raise ValueError(f"SoftWidths.from_options: layers has {g.size} gates; the pattern has "
                             f"{cfg.num_hidden_layers} layers")
        if not np.all(np.isfinite(g)) or np.any(g < 0):
            raise ValueError(f"SoftWidths.from_options: layer gates must be finite and >= 0, got {g.tolist()}")
        if not np.any(g > 0):
            raise ValueError("SoftWidths.from_options: every layer gate is 0 (every layer dropped); keep at least one")


MASK_FORMS = ("output", "official")

_META = {SoftWidths: {"mask_form": "output"}, Widths: {}}


def _declare_fields(cls) -> None:
    """(Re)make `cls` a frozen dataclass whose fields are `hidden`, every registered axis and
    `layers` (all default None), then its static fields; called again when an axis is registered."""
    names = list(WIDTH_AXES) + ["layers"]
    for attr in ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "__match_args__",
                 "__dataclass_fields__", "__dataclass_params__"):
        if attr in cls.__dict__:
            delattr(cls, attr)
    cls.__annotations__ = {n: Any for n in names} | {m: str for m in _META[cls]}
    for n in names:
        setattr(cls, n, None)
    for m, default in _META[cls].items():
        setattr(cls, m, default)
    dataclasses.dataclass(frozen=True)(cls)


def _flatten_with_keys(x):
    data = tuple(f.name for f in dataclasses.fields(x) if f.name not in _META[type(x)])
    meta = tuple((m, getattr(x, m)) for m in _META[type(x)])
    return [(jax.tree_util.GetAttrKey(n), getattr(x, n)) for n in data], (data, meta)


def _flatten(x):
    children, aux = _flatten_with_keys(x)
    return [c for _, c in children], aux


def _unflatten(cls):
    return lambda aux, children: cls(**dict(zip(aux[0], children)), **dict(aux[1]))


def _axes_changed() -> None:
    PER_LAYER_AXES.clear()
    PER_LAYER_AXES.update({a: spec.kind for a, spec in AXES.items()})
    for cls in (Widths, SoftWidths):
        _declare_fields(cls)


for _cls in (Widths, SoftWidths):
    jax.tree_util.register_pytree_with_keys(_cls, _flatten_with_keys, _unflatten(_cls), _flatten)
on_axes_changed(_axes_changed)


def as_soft(cfg: NemotronHConfig, widths) -> SoftWidths | None:
    """None -> None (full model, no masking work); Widths -> one-option SoftWidths; SoftWidths as is."""
    if widths is None:
        return None
    if isinstance(widths, SoftWidths):
        return widths
    if isinstance(widths, Widths):
        return widths.to_soft(cfg)
    raise TypeError(f"widths must be None, ej.Widths or ej.SoftWidths, got {type(widths).__name__}")


# ----------------------------------------------------------------- mask algebra
def prefix_mask(dim: int, counts, probs, groups: int = 1) -> jax.Array:
    """Σ_i probs_i · [index within its group < counts_i / groups]  -> [dim] f32.

    Components are laid out group-major (group j owns [j·dim/g, (j+1)·dim/g)).
    """
    per_group = dim // groups
    within = jnp.arange(dim) % per_group
    keep = within[None, :] < (counts[:, None] // groups)
    return jnp.sum(probs[:, None] * keep.astype(jnp.float32), axis=0)


def norm_correction(dim: int, counts, probs):
    """(eps factor, output scale) of the masked RMSNorm, METHOD §4.3: eps·ρ and √ρ, ρ = count/dim,
    mixed by probability (normalized so a hard mask scaled by max π keeps the exact norm)."""
    rho = counts.astype(jnp.float32) / dim
    total = jnp.maximum(jnp.sum(probs), 1e-20)
    return jnp.sum(probs * rho) / total, jnp.sum(probs * jnp.sqrt(rho)) / total


def max_count(counts, probs):
    """Largest count with nonzero probability (the union of all active prefixes)."""
    return jnp.max(jnp.where(probs > 0, counts, 0))
