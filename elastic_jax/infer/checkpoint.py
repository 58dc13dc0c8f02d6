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
from safetensors.numpy import load_file

from ..config import NemotronHConfig
from ..errors import HFCheckpointError, JSONFileError, json_field, read_json
from ..fileio import atomic_folder, owned_names, save_safetensors
from ..widths import WIDTH_AXES, Widths

AXES = tuple(WIDTH_AXES) + ("layers",)
# what save_nested / save_standalone write: re-saving replaces a folder only if it holds nothing else
NESTED_FILES = owned_names(r"config\.json", r"model\.safetensors", r"budgets\.json", r"router\.safetensors",
                           r"tokenizer\.json", r"tokenizer_config\.json")


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
    """Write the nested checkpoint (atomically, `elastic_jax.fileio.atomic_folder`; an existing
    folder is replaced only if it holds nothing but these files); returns {file: bytes}."""
    with atomic_folder(directory, owned=NESTED_FILES, overwrite=True, what="save_nested") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        save_safetensors(flatten(params), os.path.join(tmp, "model.safetensors"))
        meta = {"budgets": [{"name": n, "fraction": None if fractions is None else fractions.get(n),
                             "widths": widths_to_dict(w)} for n, w in budgets.items()],
                "elastic": None if elastic_cfg is None else elastic_cfg.to_dict()}
        with open(os.path.join(tmp, "budgets.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if router_params:
            save_safetensors(flatten(router_params), os.path.join(tmp, "router.safetensors"))
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            if hasattr(tokenizer, "save_config"):     # the chat template, for `elastic-jax generate`
                tokenizer.save_config(tmp)
    return {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}


def save_standalone(directory: str, cfg: NemotronHConfig, params) -> int:
    """One standalone (sliced or independent) model: config.json + model.safetensors, written
    atomically like `save_nested`. Returns bytes."""
    with atomic_folder(directory, owned=NESTED_FILES, overwrite=True, what="save_standalone") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
        save_safetensors(flatten(params), os.path.join(tmp, "model.safetensors"))
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def load_standalone(directory: str):
    """(cfg, params) of a folder written by `save_standalone` / `save_nested`, validated: the
    JSON and safetensors errors name the file, the params are checked against the config."""
    from ..model.params import check_params
    path = os.path.join(directory, "config.json")
    raw = read_json(path, what="model config")
    try:
        cfg = NemotronHConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (ValueError, TypeError) as e:
        raise JSONFileError(f"{path}: {e}") from None
    st = os.path.join(directory, "model.safetensors")
    try:
        flat = load_file(st)
    except FileNotFoundError:
        raise
    except Exception as e:              # safetensors raises its own SafetensorError
        raise HFCheckpointError(f"cannot read {st}", [f"truncated or corrupt safetensors file: {e}"]) from None
    try:
        params = unflatten(flat)
        check_params(params, cfg)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise HFCheckpointError(f"{st} does not match {path}", [str(e)]) from None
    return cfg, jax.tree_util.tree_map(jax.numpy.asarray, params)


def load_nested(directory: str):
    """-> (cfg, params, budgets {name: Widths}, fractions {name: float|None})."""
    for f in ("config.json", "model.safetensors", "budgets.json"):
        if not os.path.isfile(os.path.join(directory, f)):
            raise FileNotFoundError(f"{directory} is not a nested checkpoint: missing {f}")
    cfg, params = load_standalone(directory)
    path = os.path.join(directory, "budgets.json")
    meta = read_json(path, what="nested budgets", required=("budgets",))
    entries = json_field(meta, "budgets", list, path)
    if not entries:
        raise JSONFileError(f"{path}: field 'budgets' is empty")
    budgets, fractions = {}, {}
    for i, b in enumerate(entries):
        if not isinstance(b, dict):
            raise JSONFileError(f"{path}: field 'budgets[{i}]' must be an object")
        name = json_field(b, "name", str, path, where=f"budgets[{i}]")
        w = json_field(b, "widths", dict, path, where=f"budgets[{i}]")
        try:
            budgets[name] = widths_from_dict(w).validate(cfg)
        except (ValueError, TypeError) as e:
            raise JSONFileError(f"{path}: field 'budgets[{i}].widths': {e}") from None
        frac = b.get("fraction")
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))):
            raise JSONFileError(f"{path}: field 'budgets[{i}].fraction' must be a number or null, got {frac!r}")
        fractions[name] = frac
    return cfg, params, budgets, fractions
