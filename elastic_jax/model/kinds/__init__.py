"""One module per layer kind; `KINDS` maps the pattern character to its module.

Each kind module declares its parameters once (named dimensions, initializer, dtype role), its
elastic axes and the dimensions they select, its masks, its mixer (`apply`), its decode cache and
its HF key rules (see `base.py`). The helpers here read those declarations for one layer of a
config; params.py, elastic/ and hf.py are generic code over them.
"""
from __future__ import annotations

from ...config import NemotronHConfig
from ...widths import full_size
from . import attention, mamba, mlp, moe
from .base import Param
from .hf_rules import Dims, Rule

KINDS = {m.CHAR: m for m in (mamba, attention, mlp, moe)}


def kind_of(cfg: NemotronHConfig, layer: int):
    """The kind module of a layer."""
    return KINDS[cfg.pattern[layer]]


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


__all__ = ["KINDS", "Param", "Rule", "Dims", "kind_of", "layer_widths", "layer_sizes", "layer_dims"]
