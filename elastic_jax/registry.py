"""The two tables the layer kinds fill when they register (`elastic_jax.model.kinds.register`):
the pattern characters (what each one names, its HF `layers_block_type` spellings) and the
per-layer elastic axes (METHOD §4). Config parsing (`config.py`) and the `Widths` / `SoftWidths`
fields (`widths.py`) are read from them, so a new kind or axis is declared once, in its kind module.

This module sits below `config.py` (it imports nothing of the package): the config and the widths
read the tables, the kind modules write them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class LayerKindEntry:
    """What one pattern character names: the kind's display name (`NAME`), its config key (the
    lowercase name config formats use, e.g. a puzzle `block_type`), the HF `layers_block_type`
    spelling transformers writes and older spellings it reads."""

    char: str
    name: str
    key: str
    hf_layer_type: str
    hf_aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Axis:
    """One per-layer elastic axis: the layer kind it belongs to (pattern character), the config
    fields a (sliced) model records it in, the group structure its prefixes respect and the words
    error messages use for it. The parent size of the i-th layer of the kind is the i-th entry of
    `per_layer_field` when that is set, else `field` (or `size_fn(cfg, i)`)."""

    kind: str
    field: str                          # config field of a uniform size
    per_layer_field: str | None         # config field of per-layer sizes (None: one size per model)
    unit: str                           # what a component is ("heads", "neurons", ...)
    group_field: str | None = None      # config field whose value the width must divide by
    group_name: str | None = None       # what a group is ("Mamba groups", ...)
    size_fn: Callable | None = None     # (cfg, i) -> parent size, when not read off the fields
    full_is_none: bool = False          # SoftWidths: None when not elastic (the mixer skips the work)
    check: Callable | None = None       # (cfg, value, words) -> None: the axis's own extra rules
    option_field: str | None = None     # its `ElasticConfig` option-list field (None: not routable)
    # channels of a matmul reduction dimension per component, (cfg) -> int (the quantization block
    # then constrains the option counts); None: not a reduction dimension (e.g. the expert count)
    unit_width: Callable | None = None

    def size(self, cfg, i: int = 0) -> int:
        if self.size_fn is not None:
            return int(self.size_fn(cfg, i))
        per = getattr(cfg, self.per_layer_field) if self.per_layer_field else None
        return int(getattr(cfg, self.field) if per is None else per[i])

    def groups(self, cfg) -> int:
        return 1 if self.group_field is None else int(getattr(cfg, self.group_field))


PATTERN: dict[str, LayerKindEntry] = {}     # pattern character -> entry, in registration order
AXES: dict[str, Axis] = {}                  # axis name -> Axis, in registration order
_AXIS_LISTENERS: list[Callable[[], None]] = []


def register_layer_kind(entry: LayerKindEntry) -> None:
    """Add a pattern character (again with the same entry: no-op; a different one: ValueError)."""
    old = PATTERN.get(entry.char)
    if old is not None and old != entry:
        raise ValueError(f"layer kind {entry.char!r} is already registered as {old.name}")
    if len(entry.char) != 1:
        raise ValueError(f"a layer kind's pattern character must be one character, got {entry.char!r}")
    PATTERN[entry.char] = entry


def register_axis(name: str, axis: Axis) -> None:
    """Add a per-layer elastic axis (same entry again: no-op) and tell the listeners (the
    `Widths` / `SoftWidths` classes add the field)."""
    old = AXES.get(name)
    if old is not None and old != axis:
        raise ValueError(f"elastic axis {name!r} is already registered for kind {old.kind!r}")
    if name in ("hidden", "layers") or not name.isidentifier():
        raise ValueError(f"elastic axis name {name!r}: must be an identifier other than 'hidden' / 'layers'")
    if old is None:
        AXES[name] = axis
        for fn in _AXIS_LISTENERS:
            fn()


def on_axes_changed(fn: Callable[[], None]) -> None:
    _AXIS_LISTENERS.append(fn)
    fn()


def per_layer_fields() -> tuple[str, ...]:
    """The config fields of per-layer sizes, one per axis that has one."""
    return tuple(a.per_layer_field for a in AXES.values() if a.per_layer_field)


def hf_block_types() -> dict[str, str]:
    """HF `layers_block_type` spelling (current and older) -> pattern character."""
    out = {}
    for e in PATTERN.values():
        for t in (e.hf_layer_type,) + e.hf_aliases:
            out[t] = e.char
    return out
