"""The nested family of a checkpoint beside its HF files (METHOD §8): `elastic_budgets.json` (the
budget table) and the budget router at `elastic/router.safetensors`; and `--widths` parsing.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from ..config import NemotronHConfig
from ..elastic.budgets import check_budget_size, target_of
from ..elastic.slicing import param_count
from ..errors import HFCheckpointError, JSONFileError, json_field, read_json
from ..widths import WIDTH_AXES, Widths

BUDGETS_FILE = "elastic_budgets.json"
# In a subfolder: vLLM and SGLang load every top-level `*.safetensors` of a folder without an index
# (and newer SGLang keeps unindexed ones even with an index), so only model shards live at the top.
ROUTER_FILE = os.path.join("elastic", "router.safetensors")
LEGACY_ROUTER_FILE = "elastic_router.safetensors"    # read only (folders written before issue 28)


def _widths_json(w) -> dict:
    out = {}
    for f in dataclasses.fields(w):
        v = getattr(w, f.name)
        if v is not None:
            a = np.asarray(v)
            out[f.name] = a.tolist() if a.ndim else a.item()
    return out


def budget_table(cfg: NemotronHConfig, budgets, *, fractions: dict | None = None, elastic_cfg=None) -> dict:
    """The nested family of one checkpoint as JSON: {"format": 1, "budgets": [{"name", "widths"
    (axis -> size or per-layer list; a missing axis is full), "params", "active_params", "measured"
    (each size as a fraction of the parent's; a budget missing its `fractions` entry by more than
    `elastic.budgets.DEFAULT_TOLERANCE` in the ElasticConfig's cost warns), and with
    `fractions` the "fraction" of the parent each budget was trained for}], "config": the exact
    elastic_jax config of the parent (config.json is the HF one, whose dt-limit fields differ, see
    the module docstring), "elastic": the ElasticConfig dict when given}."""
    rows = []
    full, full_active = param_count(cfg), param_count(cfg, active=True)
    for name, w in budgets.items():
        if not isinstance(w, Widths):
            raise ValueError(f"budgets[{name!r}] must be a Widths, got {type(w).__name__}")
        w.validate(cfg)
        n, na = int(param_count(cfg, w)), int(param_count(cfg, w, active=True))
        rows.append({"name": str(name), "widths": _widths_json(w), "params": n, "active_params": na,
                     "measured": {"params_fraction": n / full, "active_fraction": na / full_active}})
        if fractions is not None:
            rows[-1]["fraction"] = fractions.get(name)
            if fractions.get(name) is not None:     # a budget whose size misses its target warns
                target = "params" if elastic_cfg is None else target_of(elastic_cfg)
                rows[-1]["measured"][f"{target}_fraction"] = check_budget_size(
                    cfg, w, float(fractions[name]), target, elastic_cfg, name=str(name))
    table = {"format": 1, "budgets": rows, "config": cfg.to_dict()}
    if elastic_cfg is not None:
        table["elastic"] = elastic_cfg.to_dict()
    return table


def read_budget_table(directory: str | os.PathLike, cfg: NemotronHConfig) -> dict:
    """{name: {"widths": Widths, "params", "active_params", "fraction"}} from `elastic_budgets.json`
    ({} when the folder has none: a plain HF checkpoint), each validated against `cfg`; a bad
    table raises `JSONFileError` naming the file and the field."""
    path = os.path.join(os.fspath(directory), BUDGETS_FILE)
    if not os.path.isfile(path):
        return {}
    table = read_json(path, what="nested budget table", required=("budgets",))
    rows = json_field(table, "budgets", list, path)
    if not rows:
        raise JSONFileError(f"{path}: field 'budgets' is empty")
    axes = tuple(WIDTH_AXES) + ("layers",)
    out = {}
    for i, r in enumerate(rows):
        where = f"budgets[{i}]"
        if not isinstance(r, dict):
            raise JSONFileError(f"{path}: field {where!r} must be an object")
        name = json_field(r, "name", str, path, where=where)
        widths = json_field(r, "widths", dict, path, where=where)
        try:
            unknown = sorted(set(widths) - set(axes))
            if unknown:
                raise ValueError(f"unknown width axes {unknown}; known: {list(axes)}")
            w = Widths(**{k: tuple(v) if isinstance(v, list) else v for k, v in widths.items()}).validate(cfg)
        except (ValueError, TypeError) as e:
            raise JSONFileError(f"{path}: field '{where}.widths': {e}") from None
        frac = r.get("fraction")
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))):
            raise JSONFileError(f"{path}: field '{where}.fraction' must be a number or null, got {frac!r}")
        out[name] = {"widths": w, "params": r.get("params"), "active_params": r.get("active_params"),
                     "fraction": frac}
    return out


def read_router(directory: str | os.PathLike):
    """The budget router saved with a nested checkpoint (`elastic/router.safetensors`; the older
    top-level `elastic_router.safetensors` is still read), or None."""
    path = os.path.join(os.fspath(directory), ROUTER_FILE)
    if not os.path.isfile(path):
        path = os.path.join(os.fspath(directory), LEGACY_ROUTER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return unflatten_tree(load_file(path))
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"cannot read {path}", [f"truncated or corrupt safetensors file: {e}"]) from None


def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts / lists of arrays -> {"a.0.b": array} (safetensors keys)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_tree(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten_tree(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = np.asarray(jax.device_get(tree))
    return out


def unflatten_tree(flat: dict[str, np.ndarray]):
    """Inverse of `flatten_tree` (integer path parts become list indices)."""
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


def parse_widths(text: str, cfg: NemotronHConfig):
    """`--widths` JSON ('{"hidden": 48, "mamba_heads": 4}', lists for per-layer) -> validated Widths."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--widths is not valid JSON ({e}): {text!r}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--widths must be a JSON object of axis -> size, got {text!r}")
    fields = {f.name for f in dataclasses.fields(Widths)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"--widths: unknown axes {unknown}; known: {sorted(fields)}")
    w = Widths(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    w.validate(cfg)
    return w
