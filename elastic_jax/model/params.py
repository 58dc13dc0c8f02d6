"""Parameter pytree of the Nemotron-H hybrid: shapes, HF-style init and logical axis names, all
read from the layer kinds' declarations (elastic_jax/model/kinds/).

Layout (JAX `[in, out]` matrices; HF stores `[out, in]`): embed [V, D], norm_f [D], lm_head [D, V],
layers[i] = {"norm": [D], "mixer": {...}} with the mixer parameters its kind declares.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig
from .kinds import base, kind_of, layer_sizes


def layer_shapes(cfg: NemotronHConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Mixer parameter shapes of one layer (per-layer sizes honoured)."""
    return base.shapes(kind_of(cfg, layer).params(cfg), layer_sizes(cfg, layer))


def param_shapes(cfg: NemotronHConfig) -> dict:
    """The whole pytree of shapes (tuples), same structure as `init_params`."""
    D, V = cfg.hidden_size, cfg.vocab_size
    return {
        "embed": (V, D),
        "layers": [{"norm": (D,), "mixer": layer_shapes(cfg, i)} for i in range(cfg.num_hidden_layers)],
        "norm_f": (D,),
        "lm_head": (D, V),
    }


def param_axes(cfg: NemotronHConfig) -> dict:
    """Logical axis names for every parameter, same structure as `init_params` (the rules table in
    elastic_jax/sharding.py maps them to mesh axes)."""
    return {
        "embed": ("vocab", "embed"),
        "layers": [{"norm": ("embed",), "mixer": base.axes(kind_of(cfg, i).params(cfg))}
                   for i in range(cfg.num_hidden_layers)],
        "norm_f": ("embed",),
        "lm_head": ("embed", "vocab"),
    }


def init_params(cfg: NemotronHConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters with the HF NemotronH initialization."""
    std = cfg.initializer_range
    n = cfg.num_hidden_layers
    keys = jax.random.split(key, n + 2)
    params = {
        "embed": (std * jax.random.normal(keys[0], (cfg.vocab_size, cfg.hidden_size))).astype(dtype),
        "layers": [],
        "norm_f": jnp.ones((cfg.hidden_size,), dtype),
        "lm_head": (std * jax.random.normal(keys[1], (cfg.hidden_size, cfg.vocab_size))).astype(dtype),
    }
    for i in range(n):
        mixer = base.init(kind_of(cfg, i), cfg, layer_sizes(cfg, i), keys[i + 2], dtype, n)
        params["layers"].append({"norm": jnp.ones((cfg.hidden_size,), dtype), "mixer": mixer})
    return params


def check_params(params: dict, cfg: NemotronHConfig) -> None:
    """Raise ValueError listing every missing, unexpected or mis-shaped parameter."""
    want = param_shapes(cfg)
    problems = []

    def walk(w, p, path):
        if isinstance(w, tuple):
            shape = getattr(p, "shape", None)
            if shape is None:
                problems.append(f"{path}: expected an array of shape {w}, got {type(p).__name__}")
            elif tuple(shape) != w:
                problems.append(f"{path}: shape {tuple(shape)} != expected {w}")
            return
        if isinstance(w, list):
            if not isinstance(p, (list, tuple)) or len(p) != len(w):
                problems.append(f"{path}: expected {len(w)} layers, got "
                                f"{len(p) if isinstance(p, (list, tuple)) else type(p).__name__}")
                return
            for i, (wi, pi) in enumerate(zip(w, p)):
                walk(wi, pi, f"{path}[{i}]")
            return
        if not isinstance(p, dict):
            problems.append(f"{path}: expected a dict, got {type(p).__name__}")
            return
        for k in w:
            if k not in p:
                problems.append(f"{path}.{k}: missing")
            else:
                walk(w[k], p[k], f"{path}.{k}")
        for k in p:
            if k not in w:
                problems.append(f"{path}.{k}: unexpected")

    walk(want, params, "params")
    if problems:
        raise ValueError("parameters do not match the config:\n  " + "\n  ".join(problems))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
