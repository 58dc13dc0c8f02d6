"""The nested checkpoint: ONE parameter set from which every trained budget is sliced zero-shot.

Folder layout (what `elastic-jax eval` reads):
  config.json          NemotronHConfig.to_dict()
  model.safetensors    the permuted, elastically distilled parameters (flattened "layers.3.mixer.x_proj")
  budgets.json         {"budgets": [{"name", "fraction", "widths": {axis: value}}], "elastic": ElasticConfig dict}
  router.safetensors   the budget router (optional; a few KiB, the spec's epsilon_router)
  tokenizer.json       the task tokenizer (optional), with tokenizer_config.json (its chat template)
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ..config import NemotronHConfig
from ..widths import WIDTH_AXES, Widths

AXES = tuple(WIDTH_AXES) + ("layers",)


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts / lists of arrays -> {"a.0.b": array}."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = np.asarray(jax.device_get(tree))
    return out


def unflatten(flat: dict[str, np.ndarray]):
    """Inverse of `flatten` (integer path parts become list indices)."""
    root: dict = {}
    for key, v in flat.items():
        node = root
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v

    def fix(n):
        if isinstance(n, dict):
            n = {k: fix(v) for k, v in n.items()}
            if n and all(k.isdigit() for k in n):
                return [n[str(i)] for i in range(len(n))]
        return n
    return fix(root)


def widths_to_dict(w: Widths) -> dict:
    return {a: (None if getattr(w, a) is None else np.asarray(getattr(w, a)).tolist()) for a in AXES}


def widths_from_dict(d: dict) -> Widths:
    unknown = sorted(set(d) - set(AXES))
    if unknown:
        raise ValueError(f"unknown width axes {unknown}; known: {list(AXES)}")
    conv = {}
    for a, v in d.items():
        if v is None:
            conv[a] = None
        elif isinstance(v, list):
            conv[a] = tuple(bool(x) for x in v) if a == "layers" else tuple(int(x) for x in v)
        else:
            conv[a] = int(v)
    return Widths(**conv)


def save_nested(directory: str, cfg: NemotronHConfig, params, budgets: dict[str, Widths], *,
                fractions: dict[str, float] | None = None, router_params=None, elastic_cfg=None,
                tokenizer=None) -> dict[str, int]:
    """Write the nested checkpoint; returns {file: bytes}."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    save_file(flatten(params), os.path.join(directory, "model.safetensors"))
    meta = {"budgets": [{"name": n, "fraction": None if fractions is None else fractions.get(n),
                         "widths": widths_to_dict(w)} for n, w in budgets.items()],
            "elastic": None if elastic_cfg is None else elastic_cfg.to_dict()}
    with open(os.path.join(directory, "budgets.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if router_params:
        save_file(flatten(router_params), os.path.join(directory, "router.safetensors"))
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
        if hasattr(tokenizer, "save_config"):     # the chat template, for `elastic-jax generate`
            tokenizer.save_config(directory)
    return {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}


def save_standalone(directory: str, cfg: NemotronHConfig, params) -> int:
    """One standalone (sliced or independent) model: config.json + model.safetensors. Returns bytes."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    save_file(flatten(params), os.path.join(directory, "model.safetensors"))
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def load_standalone(directory: str):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = NemotronHConfig.from_dict(json.load(f))
    params = unflatten(load_file(os.path.join(directory, "model.safetensors")))
    return cfg, jax.tree_util.tree_map(jax.numpy.asarray, params)


def load_nested(directory: str):
    """-> (cfg, params, budgets {name: Widths}, fractions {name: float|None})."""
    for f in ("config.json", "model.safetensors", "budgets.json"):
        if not os.path.isfile(os.path.join(directory, f)):
            raise FileNotFoundError(f"{directory} is not a nested checkpoint: missing {f}")
    cfg, params = load_standalone(directory)
    with open(os.path.join(directory, "budgets.json")) as f:
        meta = json.load(f)
    budgets = {b["name"]: widths_from_dict(b["widths"]) for b in meta["budgets"]}
    fractions = {b["name"]: b.get("fraction") for b in meta["budgets"]}
    return cfg, params, budgets, fractions
