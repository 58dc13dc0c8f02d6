"""`load_hf`: an HF NemotronH checkpoint folder -> (cfg, params), streamed tensor by tensor.

Per-expert (`mixer.experts.{j}.up_proj.weight`, Hub) and stacked 3-D (`mixer.experts.up_proj`,
transformers' module tree) routed experts are both read; `mtp.*` (multi-token prediction) tensors
are skipped. The router weight and `e_score_correction_bias` stay float32 (HF
`_keep_in_fp32_modules_strict`). A ModelOpt FP8 / NVFP4 checkpoint is read dequantized
(`hf.modelopt.DequantizedFiles`). Every problem is reported together in one `HFCheckpointError`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ..config import NemotronHConfig
from ..errors import HFCheckpointError
from ..finite import check_finite
from ..model.kinds import KINDS
from ..model.params import check_params, param_axes
from ..sharding import DEFAULT_RULES, logical_to_spec
from .config_json import read_hf_config
from .io import CheckpointFiles, progress_bar
from . import keys
from .keys import Rule, layer_dims, match, split_prefix
from .modelopt import DequantizedFiles, spec_from_config

_ST_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16, "F64": jnp.float64}


@dataclass
class _Plan:
    """Where every params leaf comes from: (layer or None, leaf group) -> (rule, keys)."""

    sources: dict = dataclasses.field(default_factory=dict)   # (layer, rule index) -> key or {j: key}
    skipped: list = dataclasses.field(default_factory=list)


def _plan(cfg: NemotronHConfig, files) -> _Plan:
    """Match every key against keys.RULES; collect missing / unexpected / mis-shaped keys together."""
    if files.problems:   # unreadable files first: every key in them would otherwise read as missing
        raise HFCheckpointError(f"checkpoint {files.directory} has unreadable files", files.problems)
    problems: list[str] = []
    plan = _Plan()
    n_layers = cfg.num_hidden_layers
    for key in sorted(files.key_file):
        prefix, rel = split_prefix(key)
        if rel.startswith("mtp.") or key.startswith("mtp."):
            plan.skipped.append(key)
            continue
        hit = match(rel)
        if hit is None or (keys.RULES[hit[0]].kind == "head" and prefix):
            problems.append(f"{key}: unexpected (no NemotronH tensor has this name)")
            continue
        n, m = hit
        rule = keys.RULES[n]
        layer = None
        if rule.kind not in ("top", "head"):
            layer = int(m.group("i"))
            if layer >= n_layers:
                problems.append(f"{key}: unexpected (layer {layer}, but the config has {n_layers} layers)")
                continue
            c = cfg.pattern[layer]
            if rule.kind != "layer" and rule.kind != c:
                problems.append(f"{key}: unexpected (a {KINDS[rule.kind].NAME} tensor, but layer {layer} is "
                                f"{KINDS[c].NAME} in the pattern {cfg.pattern!r})")
                continue
        d = layer_dims(cfg, layer)
        if not rule.when(d):
            problems.append(f"{key}: unexpected for this config (e.g. a shared expert while "
                            "moe_shared_expert_intermediate_size is 0)")
            continue
        want = rule.shape(d)
        got = files.shape(key)
        slot = (layer, n)
        if got != want:   # present but wrong: reported here, not again as missing
            problems.append(f"{key}: shape {got} != expected {want} (from config.json)")
            if rule.experts == "per_expert":
                plan.sources.setdefault(slot, {})[int(m.group("j"))] = key
            else:
                plan.sources[slot] = key
            continue
        if files.dtype(key) not in _ST_DTYPES:
            problems.append(f"{key}: dtype {files.dtype(key)} is not a float type this loader reads")
            continue
        if rule.experts == "per_expert":
            j = int(m.group("j"))
            if j >= d.E:
                problems.append(f"{key}: unexpected (expert {j}, but the config has {d.E} routed experts)")
                continue
            plan.sources.setdefault(slot, {})[j] = key
        else:
            plan.sources[slot] = key
    # coverage: every leaf of every layer filled exactly once
    for layer in [None] + list(range(n_layers)):
        kinds = ("top", "head") if layer is None else ("layer", cfg.pattern[layer])
        d = layer_dims(cfg, layer)
        for n, rule in enumerate(keys.RULES):
            if rule.kind not in kinds or not rule.when(d) or rule.experts == "stacked":
                continue
            if rule.experts == "per_expert":
                alt = next(i for i, r in enumerate(keys.RULES) if r.experts == "stacked" and r.params == rule.params)
                per = plan.sources.get((layer, n), {})
                stacked = plan.sources.get((layer, alt))
                if stacked is not None and per:
                    problems.append(f"{keys.RULES[alt].key(layer)}: given both stacked and per-expert "
                                    f"({len(per)} tensors); keep one form")
                elif stacked is None:
                    if not per:
                        problems.append(f"{rule.key(layer, None).replace('{j}', '*')} (or stacked "
                                        f"{keys.RULES[alt].key(layer)}): missing")
                    else:
                        for j in range(d.E):
                            if j not in per:
                                problems.append(f"{rule.key(layer, j)}: missing")
                continue
            if (layer, n) not in plan.sources and not rule.optional(cfg):
                problems.append(f"{rule.key(layer)}: missing")
    if problems:
        raise HFCheckpointError(f"checkpoint {files.directory} does not match its config.json", problems)
    return plan


def _target_dtype(raw: dict, files, dtype) -> Any:
    if dtype is not None:
        try:
            dt = jnp.dtype(dtype)
        except TypeError:
            raise ValueError(f"load_hf dtype={dtype!r}: not a dtype; expected float32, bfloat16 or float16") from None
        if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"load_hf dtype={dtype!r}: parameters must be float32, bfloat16 or float16")
        return dt
    name = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(name, str) and name in ("float32", "bfloat16", "float16"):
        return jnp.dtype(name)
    emb = next((k for k in files.key_file if k.endswith("embeddings.weight")), None)
    return jnp.dtype(_ST_DTYPES[files.dtype(emb)]) if emb else jnp.dtype(jnp.float32)


def load_hf(directory: str | os.PathLike, *, dtype=None, mesh=None, rules=None,
            progress: bool = False, with_quant: bool = False,
            allow_nonfinite: bool = False) -> tuple[NemotronHConfig, dict]:
    """Read an HF NemotronH checkpoint directory into (cfg, params).

    `directory` holds `config.json` (current or legacy field names) and `model.safetensors` or
    shards listed in `model.safetensors.index.json`. Tensors are streamed one at a time
    (per-expert tensors into one stacked buffer per layer) and converted by `RULES`.
    `dtype`: parameter dtype (None: the checkpoint's `dtype` / `torch_dtype`, else that of the
    embedding on disk); the router weight and correction bias stay float32.
    `mesh`: place each parameter on `NamedSharding(mesh, spec)` as soon as it is read, with the
    spec from its logical axes (`ej.param_axes`) and `rules` (default: the logical-axis rules table,
    `elastic_jax.sharding.DEFAULT_RULES`). Raises `HFCheckpointError` listing every missing,
    unexpected or mis-shaped tensor and every unsupported config option at once.
    A ModelOpt FP8 / NVFP4 checkpoint (`quantization_config` in config.json) is read dequantized;
    `with_quant=True` returns (cfg, params, QuantState or None) for the simulated-quantization
    forward (`forward(quant.qweight_params(params, state), ...)`). A tensor holding NaN / inf is refused
    (`NonFiniteError` naming it) unless `allow_nonfinite` (debugging: a warning instead)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    if dtype is not None:
        _target_dtype({}, None, dtype)          # refuse a non-float dtype before reading anything
    cfg, raw = read_hf_config(directory)
    files = CheckpointFiles(directory)
    qspec = spec_from_config(raw, directory)
    if qspec is not None:
        files = DequantizedFiles(files, qspec)
    qstate = None
    try:
        plan = _plan(cfg, files)
        target = _target_dtype(raw, files, dtype)
        place = _placer(cfg, mesh, rules)
        params: dict = {"layers": [{"mixer": {}} for _ in range(cfg.num_hidden_layers)]}
        n_tensors = sum(len(v) if isinstance(v, dict) else 1 for v in plan.sources.values())
        bar = progress_bar(progress, n_tensors, "load_hf", "tensor")
        for layer in [None] + list(range(cfg.num_hidden_layers)):
            d = layer_dims(cfg, layer)
            kinds = ("top", "head") if layer is None else ("layer", cfg.pattern[layer])
            for n, rule in enumerate(keys.RULES):
                if rule.kind not in kinds or not rule.when(d):
                    continue
                src = plan.sources.get((layer, n))
                if src is None:
                    if rule.optional(cfg) and rule.experts == "none":  # absent optional tensor: zeros
                        zeros = rule.load(np.zeros(rule.shape(d), np.float32), d)
                        _put(params, layer, rule, zeros, target, place)
                    continue
                if isinstance(src, dict):   # per expert: stack into one buffer
                    bufs = None
                    for j in range(d.E):
                        parts = rule.load(files.read(src[j]), d)
                        if bufs is None:
                            bufs = [np.empty((d.E,) + p.shape, p.dtype) for p in parts]
                        for b, p in zip(bufs, parts):
                            b[j] = p
                        bar.update(1)
                    _put(params, layer, rule, tuple(bufs), target, place)
                else:
                    _put(params, layer, rule, rule.load(files.read(src), d), target, place)
                    bar.update(1)
        bar.close()
        if qspec is not None:
            qstate = files.quant_state(cfg)
    finally:
        files.close()
    check_params(params, cfg)
    check_finite(params, f"{directory}: the weights", allow=allow_nonfinite,
                 hint="refusing to compute on them (allow_nonfinite=True / --allow-nonfinite to load anyway)")
    return (cfg, params, qstate) if with_quant else (cfg, params)


def _put(params, layer, rule: Rule, arrays, target, place):
    for name, arr in zip(rule.params, arrays):
        dt = jnp.float32 if rule.f32 else target
        arr = np.asarray(arr).astype(dt, copy=False)
        if layer is None:
            params[name] = place(arr, (name,))
        elif name == "norm" and rule.kind == "layer":
            params["layers"][layer]["norm"] = place(arr, ("layers", layer, "norm"))
        else:
            params["layers"][layer]["mixer"][name] = place(arr, ("layers", layer, "mixer", name))


def _placer(cfg: NemotronHConfig, mesh, rules):
    """arr, path -> device array (sharded by the logical-axis rules when a mesh is given)."""
    if mesh is None:
        return lambda arr, path: jnp.asarray(arr)
    axes = param_axes(cfg)
    rules = DEFAULT_RULES if rules is None else rules

    def place(arr, path):
        a = axes
        for p in path:
            a = a[p]
        return jax.device_put(arr, NamedSharding(mesh, logical_to_spec(a, arr.shape, mesh, rules)))
    return place
