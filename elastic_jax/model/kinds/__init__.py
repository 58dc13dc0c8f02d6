"""One module per layer kind; `KINDS` maps the pattern character to its module.

Each kind module declares its pattern character and names (`CHAR`, `NAME`, `KEY`,
`HF_LAYER_TYPE`), its elastic axes (`AXES`: name -> `registry.Axis`), its parameters once (named
dimensions, initializer, dtype role), the dimensions each axis selects, its masks record and
`masks`, its mixer (`apply`), its decode cache, its HF key rules (whose `linear` rows are its
quantizable tensors) and, optionally, auxiliary outputs (`AUX_OUTPUTS`), quantization groups
(`FUSED_LINEARS`, `SAME_PRECISION`, `KV_CACHE_SCALES`, `NANO_HIGH_PRECISION`) and its cost
(`flops`, `weight_bytes`, `state_bytes`; see `base.py`). `register(module)` adds a kind: its
pattern character to config parsing and its axes to `Widths` / `SoftWidths`. The helpers here read
those declarations for one layer of a config; params.py, elastic/, quant/ and hf/ are generic
code over them.
"""
from __future__ import annotations

from ...config import NemotronHConfig
from ...registry import LayerKindEntry, register_layer_kind
from ...widths import full_size, register_axis
from . import attention, mamba, mlp, moe
from .base import Param, quantizable, scale_groups
from .hf_rules import Dims, Rule

KINDS: dict = {}
_LISTENERS: list = []

_REQUIRED = ("CHAR", "NAME", "KEY", "HF_LAYER_TYPE", "AXES", "dims", "params", "select", "masks", "apply",
             "init_cache", "cache_elems", "hf_dims", "HF_RULES")


def register(kind) -> None:
    """Add a layer kind module: its pattern character (config parsing), its axes (`Widths` fields)."""
    missing = [a for a in _REQUIRED if not hasattr(kind, a)]
    if missing:
        raise TypeError(f"layer kind {getattr(kind, '__name__', kind)!r} lacks {missing}")
    if KINDS.get(kind.CHAR, kind) is not kind:
        raise ValueError(f"pattern character {kind.CHAR!r} is already the kind {KINDS[kind.CHAR].NAME}")
    for name, axis in kind.AXES.items():
        if axis.kind != kind.CHAR:
            raise ValueError(f"{kind.NAME}: axis {name!r} is declared for kind {axis.kind!r}, not {kind.CHAR!r}")
    register_layer_kind(LayerKindEntry(kind.CHAR, kind.NAME, kind.KEY, kind.HF_LAYER_TYPE,
                                       tuple(getattr(kind, "HF_LAYER_ALIASES", ()))))
    for name, axis in kind.AXES.items():
        register_axis(name, axis)
    KINDS[kind.CHAR] = kind
    for fn in _LISTENERS:
        fn()


def on_register(fn) -> None:
    """Call `fn()` now and after every kind registered (tables built from every kind's declarations)."""
    _LISTENERS.append(fn)
    fn()


for _kind in (mamba, attention, mlp, moe):
    register(_kind)


def kind_of(cfg: NemotronHConfig, layer: int):
    """The kind module of a layer."""
    return KINDS[cfg.pattern[layer]]


def layers_with_aux(cfg: NemotronHConfig, name: str) -> tuple[int, ...]:
    """Positions of the layers whose kind has the auxiliary output `name` (e.g. "expert_load")."""
    return tuple(i for i, c in enumerate(cfg.pattern) if name in getattr(KINDS[c], "AUX_OUTPUTS", {}))


def layer_widths(cfg: NemotronHConfig, layer: int) -> dict:
    """The layer's (parent) size along each of its kind's elastic axes."""
    k = cfg.kind_index()[layer]
    return {a: full_size(cfg, a, k) for a in kind_of(cfg, layer).AXES}


def layer_sizes(cfg: NemotronHConfig, layer: int, active: bool = False) -> dict:
    """Size of every named dimension of the layer's parameters."""
    return kind_of(cfg, layer).dims(cfg, cfg.hidden_size, layer_widths(cfg, layer), active)


def layer_dims(cfg: NemotronHConfig, layer: int | None) -> Dims:
    """The HF rules' sizes of one layer (None: the backbone-level tensors)."""
    base = dict(D=cfg.hidden_size, V=cfg.vocab_size)
    if layer is None:
        return Dims(**base)
    return Dims(**base, **kind_of(cfg, layer).hf_dims(cfg, cfg.kind_index()[layer]))


__all__ = ["KINDS", "Param", "Rule", "Dims", "register", "on_register", "kind_of", "layers_with_aux", "layer_widths",
           "layer_sizes", "layer_dims", "quantizable", "scale_groups"]
