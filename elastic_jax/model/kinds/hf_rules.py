"""HF NemotronH tensor rules: `Rule` (one HF key pattern <-> params leaves), the per-layer sizes
`Dims` its shapes read, and the layout transforms. Each layer kind module declares its own
`HF_RULES`; `elastic_jax/hf/` runs them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ...config import NemotronHConfig


@dataclass(frozen=True)
class Dims:
    """Sizes of one layer (per-layer widths honoured) in the names of the HF parameter keys."""

    D: int
    V: int
    H: int = 0      # Mamba heads
    P: int = 0      # Mamba head dim
    G: int = 0      # Mamba groups
    N: int = 0      # SSM state size
    K: int = 0      # conv kernel
    nH: int = 0     # attention query heads
    nKV: int = 0    # attention KV heads
    hd: int = 0     # attention head dim
    I: int = 0      # dense MLP width
    E: int = 0      # routed experts
    Ie: int = 0     # routed-expert width
    Is: int = 0     # shared-expert width

    @property
    def HP(self):
        return self.H * self.P

    @property
    def GN(self):
        return self.G * self.N


def _same(w, d):
    return (w,)


def _same_inv(ws, d):
    return ws[0]


def _t(w, d):
    return (np.ascontiguousarray(np.swapaxes(w, -1, -2)),)


def _t_inv(ws, d):
    return np.ascontiguousarray(np.swapaxes(ws[0], -1, -2))


def _split_rows_t(sizes: Callable[[Dims], Sequence[int]]):
    """HF fused [sum(out), in] -> our [in, out_i] pieces (and back): `in_proj`."""
    def load(w, d):
        cuts = np.cumsum(sizes(d))[:-1]
        return tuple(np.ascontiguousarray(p.T) for p in np.split(w, cuts, axis=0))

    def save(ws, d):
        return np.ascontiguousarray(np.concatenate([w.T for w in ws], axis=0))
    return load, save


def _conv_split(w, d):
    """HF depthwise conv1d [C, 1, K] -> our [K, x | B | C] pieces."""
    wk = w[:, 0, :].T
    return tuple(np.ascontiguousarray(p) for p in np.split(wk, [d.HP, d.HP + d.GN], axis=1))


def _conv_join(ws, d):
    return np.ascontiguousarray(np.concatenate(ws, axis=1).T[:, None, :])


def _bias_split(b, d):
    return tuple(np.ascontiguousarray(p) for p in np.split(b, [d.HP, d.HP + d.GN]))


def _bias_join(ws, d):
    return np.concatenate(ws)


@dataclass(frozen=True)
class Rule:
    """One HF tensor pattern <-> params leaves.

    hf:      the key after the `backbone.` / `model.` prefix; layer rules are relative to
             `layers.{i}.`, `{j}` is a routed expert.
    kind:    "top" (backbone-level), "head" (no prefix: lm_head), "layer" (every layer) or the
             pattern character of the layers that hold it.
    params:  leaves it fills: top-level keys, "norm" (the layer's pre-norm) or mixer keys.
    shape:   the expected HF shape, from the layer's Dims.
    load / save: HF tensor -> tuple of param arrays, and back (per expert when `experts` is
             "per_expert"; the engine stacks experts on axis 0).
    experts: "none", "per_expert" or "stacked" (two spellings of the same leaves).
    f32:     always kept in float32 (HF `_keep_in_fp32_modules_strict`).
    optional: the key may be absent (filled with zeros); a callable of the config.
    when:    the rule applies to this config/layer (e.g. shared expert only if Is > 0).
    linear:  the tensor is a Linear weight (quantizable unless `f32`: `base.quantizable`).
    """

    hf: str
    kind: str
    params: tuple[str, ...]
    shape: Callable[[Dims], tuple[int, ...]]
    load: Callable = _same
    save: Callable = _same_inv
    experts: str = "none"
    f32: bool = False
    optional: Callable[[NemotronHConfig], bool] = lambda cfg: False
    when: Callable[[Dims], bool] = lambda d: True
    linear: bool = False

    @property
    def regex(self) -> re.Pattern:
        pat = re.escape(self.hf).replace(r"\{j\}", r"(?P<j>\d+)")
        if self.kind in ("top", "head"):
            return re.compile(pat + "$")
        return re.compile(r"layers\.(?P<i>\d+)\." + pat + "$")

    def key(self, layer: int | None, expert: int | None = None, prefix: str = "backbone.") -> str:
        k = self.hf.replace("{j}", str(expert)) if expert is not None else self.hf
        if self.kind == "head":
            return k
        if self.kind == "top":
            return prefix + k
        return f"{prefix}layers.{layer}.{k}"
