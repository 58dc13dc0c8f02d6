"""What a layer kind declares, and the generic code over those declarations.

A kind module (mamba.py, attention.py, mlp.py, moe.py) declares:

* `CHAR` (its pattern character) and `AXES` (its elastic `Widths` axes, see `widths.AXES`);
* `dims(cfg, hidden, w)`: the size of every named dimension of one layer, from the hidden size and
  the layer's size along each of its axes (`w[axis]`: ints, or real-valued arrays for the cost
  model, so the same arithmetic gives shapes, exact counts and the differentiable cost);
* `params(cfg)`: `{name: Param}`, each parameter's dimension names (one name = one size; the name
  is also the logical sharding axis of `elastic_jax.sharding`), initializer and dtype role;
* `select(sizes, sel)`: for components chosen along each axis (`sel[axis]`: indices), the indices
  along each named dimension (slicing keeps prefixes, permutation reorders, both are this);
* `masks`, `apply`, `init_cache` / `cache_elems`, `HF_RULES` / `hf_dims` beside them; optionally
  `SLOT_CACHE`: the cache entries written one slot per position and masked by the entry `valid`.

`Param.init`: "normal" (N(0, initializer_range)), "normal_out" (scaled by 1/√n_layers, the HF
residual-writer init), "zeros", "ones", or a callable (key, shape, cfg, n_layers) -> f32 array.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

Init = Union[str, Callable]


@dataclass(frozen=True)
class Param:
    """One parameter of a layer kind: named dimensions, initializer, dtype role."""

    dims: tuple[str, ...]
    init: Init = "normal"
    f32: bool = False          # kept in float32 whatever the parameter dtype


def shapes(decls: dict, sizes: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(sizes[d]) for d in p.dims) for name, p in decls.items()}


def axes(decls: dict) -> dict[str, tuple[str, ...]]:
    return {name: p.dims for name, p in decls.items()}


def count(decls: dict, sizes: dict):
    """Σ over the parameters of Π of their dimension sizes (ints: exact; arrays: elementwise)."""
    total = 0
    for p in decls.values():
        n = 1
        for d in p.dims:
            n = n * sizes[d]
        total = total + n
    return total


def layer_sizes_of(params: dict, decls: dict) -> dict:
    """The named dimension sizes read off actual parameter arrays."""
    return {d: n for name, x in params.items() if hasattr(x, "shape")
            for d, n in zip(decls[name].dims, x.shape)}


def _initialize(init: Init, key, shape, cfg, n_layers: int):
    if callable(init):
        return init(key, shape, cfg, n_layers)
    if init == "normal":
        return cfg.initializer_range * jax.random.normal(key, shape, jnp.float32)
    if init == "normal_out":
        return cfg.initializer_range / math.sqrt(n_layers) * jax.random.normal(key, shape, jnp.float32)
    if init == "zeros":
        return jnp.zeros(shape, jnp.float32)
    if init == "ones":
        return jnp.ones(shape, jnp.float32)
    raise ValueError(f"unknown initializer {init!r}")


def default_keys(key, names) -> dict:
    """One key per parameter, in declaration order."""
    return dict(zip(names, jax.random.split(key, len(names))))


def init(kind, cfg, sizes: dict, key, dtype, n_layers: int) -> dict:
    """Random parameters of one layer of `kind` from its declarations."""
    decls = kind.params(cfg)
    shp = shapes(decls, sizes)
    keys = getattr(kind, "init_keys", default_keys)(key, list(decls))
    return {name: _initialize(p.init, keys[name], shp[name], cfg, n_layers).astype(jnp.float32 if p.f32 else dtype)
            for name, p in decls.items()}


def take(x, dim: int, idx):
    """x indexed by `idx` (a slice or an index array) along dimension `dim`; numpy stays numpy."""
    return x[(slice(None),) * dim + (idx,)]


def take_dims(params: dict, decls: dict, idx: dict) -> dict:
    """Each parameter indexed along every named dimension that `idx` has an entry for."""
    out = {}
    for name, x in params.items():
        for dim, d in enumerate(decls[name].dims):
            if d in idx:
                x = take(x, dim, idx[d])
        out[name] = x
    return out


def expand(heads, width: int, inner=None) -> np.ndarray:
    """Head indices (and optional within-head indices) -> channel indices of heads of `width`."""
    inner = np.arange(width) if inner is None else np.asarray(inner)
    return (np.asarray(heads)[:, None] * width + inner[None, :]).reshape(-1)


def static(default):
    """A masks-record field that is static (pytree metadata, e.g. the soft-mask form)."""
    return dataclasses.field(default=default, metadata={"static": True})


def masks_record(cls):
    """A kind's masks record (built from `SoftWidths` inside the jitted forward): a frozen
    dataclass, registered as a pytree whose data fields are all fields not declared `static`."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    meta = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]
    jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls) if f.name not in meta],
                                     meta_fields=meta)
    return cls


def quantizable(kind) -> dict[str, str]:
    """{parameter: HF module under `layers.{i}.`} of a kind's quantizable linears, read off its HF
    rules (`Rule.linear`, not kept in float32): fused HF tensors map every piece to one module,
    per-expert tensors to `mixer.experts.*.<proj>`."""
    out = {}
    for rule in kind.HF_RULES:
        if rule.linear and not rule.f32 and rule.experts != "stacked":
            module = rule.hf.removesuffix(".weight").replace("{j}", "*")
            for p in rule.params:
                out.setdefault(p, module)
    return out


def scale_groups(kind) -> tuple[tuple[str, ...], ...]:
    """Parameters that share one weight scale: the pieces of one fused HF tensor (Mamba `in_proj`)
    and the linears the serving stacks fuse (`FUSED_LINEARS`, attention q/k/v)."""
    groups = [r.params for r in kind.HF_RULES if r.linear and len(r.params) > 1]
    return tuple(groups) + tuple(getattr(kind, "FUSED_LINEARS", ()))


# ------------------------------------------------------------- importance (METHOD §3.2)
def rank_within_groups(scores, groups: int = 1) -> np.ndarray:
    """Permutation sorting `scores` descending inside each of `groups` contiguous blocks
    (group-major layout is kept: block g of the output holds block g's components). Ties keep
    their original order."""
    s = np.asarray(scores, np.float64).reshape(-1)
    n = s.size
    if n % groups:
        raise ValueError(f"{n} components cannot be split into {groups} equal groups")
    blocks = rearrange(s, "(g per) -> g per", g=groups)                 # group-major components
    order = np.argsort(-blocks, axis=1, kind="stable")
    return rearrange(order + np.arange(groups)[:, None] * blocks.shape[1], "g per -> (g per)").astype(np.int64)


def seq_mean_abs(act, valid):
    """[B, L, ...] -> [B, ...]: mean over the valid tokens of |act|."""
    a = jnp.abs(act.astype(jnp.float32))
    if valid is None:
        return jnp.mean(a, axis=1)
    w = valid.astype(jnp.float32).reshape(valid.shape + (1,) * (a.ndim - 2))
    return jnp.sum(a * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def seq_sumsq(act, valid):
    """Σ_b (mean_s |act|)² -> [...]  (accumulated over batches, sqrt at the end)."""
    return jnp.sum(jnp.square(seq_mean_abs(act, valid)), axis=0)
