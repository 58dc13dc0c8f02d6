"""HF NemotronH checkpoints in and out: `load_hf`, `save_hf`, the CLI `export` / `slice`.

On-disk format (what `transformers.NemotronHForCausalLM.save_pretrained` writes and the Hub holds):
`config.json` plus `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json`. Keys carry a `backbone.` prefix (Hub, `save_pretrained`) or a
`model.` prefix (the in-library module tree); `lm_head.weight` has none. Routed experts are stored
per expert (`mixer.experts.{j}.up_proj.weight`, Hub) or stacked 3-D (`mixer.experts.up_proj`,
in-library). `mtp.*` (multi-token-prediction) tensors are skipped.

The conversion is one declarative table, `RULES`: each `Rule` names an HF key pattern, the
params leaves it fills and the pair of transforms between the two layouts (HF `[out, in]`
matrices, fused `in_proj` / `conv1d`; ours `[in, out]` with the fused tensors split). The layer
rules are declared by their layer kind (`elastic_jax/model/kinds/`); this module adds the
backbone-level ones. Loading, validation and saving all walk that one table.

Semantics that transformers fixes and the config does not say (checked against transformers 5.x,
`modeling_nemotron_h.py`):
  * the Mamba2 mixer clamps dt to the config's `time_step_limit` (transformers >= 5.25, as the
    original Nemotron-H code; 5.0-5.24 clamped to `(time_step_min, inf)` instead), so `load_hf`
    reads `time_step_limit`, and `save_hf` writes `time_step_limit = [time_step_min, inf]` with
    `time_step_min = time_step_limit[0]` (the smallest positive f32 when that is 0: HF's init takes
    log(time_step_min), and a clamp at 1e-38 changes no f32 logit), which every 5.x reads the same;
  * the MoE block always has a shared expert; a model without one is written with a zero shared
    expert (relu²(0) = 0, so the output is unchanged);
  * the router weight and `e_score_correction_bias` are kept in float32 (HF
    `_keep_in_fp32_modules_strict`), whatever the dtype of the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import NemotronHConfig
from .errors import HFCheckpointError, JSONFileError, json_field, read_json
from .fileio import atomic_folder, owned_names
from .model.kinds import KINDS, layer_dims, moe, on_register  # noqa: F401  (layer_dims: part of this module's API)
from .model.kinds.hf_rules import Dims, Rule, _t, _t_inv  # noqa: F401
from .model.params import check_params, param_axes

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_PREFIXES = ("backbone.", "model.")
_F32_TINY = float(np.finfo(np.float32).tiny)


# The top-level names `save_hf` writes: `overwrite` replaces a folder only if it holds nothing else.
HF_EXPORT_FILES = owned_names(r"config\.json", r"generation_config\.json", r"model\.safetensors",
                              r"model\.safetensors\.index\.json", r"model-\d{5}-of-\d{5}\.safetensors",
                              r"hf_quant_config\.json", r"elastic_budgets\.json", r"elastic_router\.safetensors",
                              r"elastic/(router\.safetensors)?",
                              r"tokenizer\.json",
                              r"tokenizer_config\.json", r"special_tokens_map\.json", r"chat_template\.jinja")


# ------------------------------------------------------------------------------------ table
# The backbone-level rules; each layer kind declares its own (elastic_jax/model/kinds/).
_BACKBONE_RULES: tuple[Rule, ...] = (
    Rule("embeddings.weight", "top", ("embed",), lambda d: (d.V, d.D)),
    Rule("norm_f.weight", "top", ("norm_f",), lambda d: (d.D,)),
    Rule("lm_head.weight", "head", ("lm_head",), lambda d: (d.V, d.D), _t, _t_inv),
    Rule("norm.weight", "layer", ("norm",), lambda d: (d.D,)),
)
RULES: tuple[Rule, ...] = _BACKBONE_RULES
_REGEXES: tuple = ()


def _collect_rules() -> None:
    """RULES = the backbone rules + every registered kind's `HF_RULES` (again when a kind registers)."""
    global RULES, _REGEXES
    RULES = _BACKBONE_RULES + tuple(r for kind in KINDS.values() for r in kind.HF_RULES)
    _REGEXES = tuple(r.regex for r in RULES)


on_register(_collect_rules)


def _rules_for(kind: str) -> list[Rule]:
    return [r for r in RULES if r.kind in (kind, "layer")]


# ----------------------------------------------------------------------------------- config
def _encode_float(x: float):
    return x if math.isfinite(x) else {"__float__": "Infinity" if x > 0 else ("-Infinity" if x < 0 else "NaN")}


# HF options this implementation cannot represent: field -> (is it unsupported?, explanation)
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tie_word_embeddings": (bool, "tied embeddings (NemotronH unties lm_head)"),
    "use_bias": (bool, "biases on in_proj/out_proj"),
    "mamba_proj_bias": (bool, "biases on the Mamba projections"),
    "attention_bias": (bool, "attention projection biases"),
    "mlp_bias": (bool, "MLP / expert biases"),
    "moe_latent_size": (lambda v: v is not None, "latent MoE (fc1/fc2_latent_proj, Nemotron Super)"),
    "n_shared_experts": (lambda v: v not in (None, 0, 1), "more than one shared expert"),
    "mlp_hidden_act": (lambda v: v not in (None, "relu2"), "MLP activation other than relu2"),
    "mamba_hidden_act": (lambda v: v not in (None, "silu"), "Mamba activation other than silu"),
    "sliding_window": (lambda v: v is not None, "sliding-window attention"),
}


def read_hf_config(directory: str | os.PathLike) -> tuple[NemotronHConfig, dict]:
    """(cfg, raw config dict) from an HF directory's `config.json`, with transformers' semantics
    (dt clamped to `time_step_limit`). Unsupported options are all listed in one error."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json (not an HF checkpoint directory)")
    raw = read_json(path, what="HF config")
    problems = []
    mt = raw.get("model_type")
    if mt not in (None, "nemotron_h", PUZZLE_MODEL_TYPE):
        problems.append(f"model_type={mt!r}: only 'nemotron_h' and '{PUZZLE_MODEL_TYPE}' checkpoints are supported")
    if mt == PUZZLE_MODEL_TYPE:
        raw = dict(raw, **_from_puzzle(raw, problems))
    for name, (bad, what) in _UNSUPPORTED.items():
        if name in raw and bad(raw[name]):
            problems.append(f"{name}={raw[name]!r}: {what} is not supported")
    qc = raw.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        problems.append(f"quantization_config={qc!r:.80}: must be an object (ModelOpt's quant_method / quant_algo)")
    if raw.get("layers_block_type") is None and raw.get("layer_types") is None and not raw.get("hybrid_override_pattern"):
        problems.append("no layer layout: config.json needs layers_block_type (or hybrid_override_pattern)")
    if problems:
        raise HFCheckpointError(f"unsupported HF config {path}", problems)
    d = dict(raw)
    if d.get("layers_block_type") is None and d.get("layer_types") is not None:
        d["layers_block_type"] = d["layer_types"]
    try:
        cfg = NemotronHConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise HFCheckpointError(f"invalid HF config {path}", [str(e)]) from None
    return cfg, raw


# ------------------------------------------------------------------ nemotron_h_puzzle (per layer)
PUZZLE_MODEL_TYPE = "nemotron_h_puzzle"
_PUZZLE_MOE_KEYS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "moe_shared_expert_intermediate_size")
# per-layer axes vLLM's NemotronH cannot take per layer: Mamba layers are built from the global config,
# and NVIDIA's puzzle block dataclasses have no head-count keys (unknown keys fail them)
_GLOBAL_ONLY = {"mamba_heads_per_layer": "mamba_heads", "attn_heads_per_layer": "attn_heads"}


def _puzzle_config(d: dict, cfg: NemotronHConfig) -> dict:
    """A plain `nemotron_h` config dict `d` of the max widths -> `nemotron_h_puzzle` with one
    `block_configs` entry per layer (MLP `intermediate_size`; MoE `n_routed_experts`,
    `num_experts_per_tok`, `moe_intermediate_size`, `moe_shared_expert_intermediate_size`), the
    per-block keys removed from the top level as NVIDIA's `NemotronHPuzzleConfig.to_dict` does; the
    pattern is written explicitly too (SGLang takes it from the top level)."""
    blocks = []
    for c, k in zip(cfg.pattern, cfg.kind_index()):
        t = KINDS[c].KEY                        # the block type: the kind's config name
        b = {"block_type": t}
        if t == "mlp":
            b["intermediate_size"] = cfg.ffn_at(k)
        elif t == "moe":
            b.update(n_routed_experts=cfg.moe_experts_at(k), num_experts_per_tok=cfg.num_experts_per_tok,
                     moe_intermediate_size=cfg.moe_ffn_at(k),
                     moe_shared_expert_intermediate_size=d["moe_shared_expert_intermediate_size"])
        blocks.append(b)
    out = {k: v for k, v in d.items() if k not in {key for b in blocks for key in b if key != "block_type"}}
    out.update(model_type=PUZZLE_MODEL_TYPE, architectures=["NemotronHPuzzleForCausalLM"], block_configs=blocks,
               mtp_block_configs=[], num_nextn_predict_layers=0)
    return out


def _from_puzzle(raw: dict, problems: list) -> dict:
    """The NemotronHConfig fields (per-layer tuples where the layers differ) of a
    `nemotron_h_puzzle` config.json; what this implementation cannot hold goes to `problems`."""
    blocks = raw.get("block_configs")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        problems.append("block_configs: a nemotron_h_puzzle config needs a list of one object per layer")
        return {}
    letters = {k.KEY: c for c, k in KINDS.items()}      # block type (a kind's config name) -> character
    pattern = ""
    per: dict[str, list] = {"mlp": [], "moe": []}
    glob: dict[str, set] = {"num_experts_per_tok": set(), "moe_shared_expert_intermediate_size": set()}
    allowed = {"mamba": {"ssm_state_size"}, "attention": {"sliding_window"}, "mlp": {"intermediate_size"},
               "moe": set(_PUZZLE_MOE_KEYS) | {"routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob"}}
    for i, b in enumerate(blocks):
        t = b.get("block_type")
        if t not in letters or t not in allowed:
            problems.append(f"block_configs[{i}].block_type={t!r}: expected one of {sorted(allowed)}")
            continue
        pattern += letters[t]
        for k, v in b.items():
            if k == "block_type" or v is None:
                continue
            if k not in allowed[t]:
                problems.append(f"block_configs[{i}].{k}: not a {t} block key")
            elif t == "attention" or (k not in _PUZZLE_MOE_KEYS and k != "intermediate_size" and raw.get(k, v) != v):
                problems.append(f"block_configs[{i}].{k}={v!r}: per-layer {k} is not supported")
        if t == "mlp":
            per["mlp"].append(b.get("intermediate_size", raw.get("intermediate_size")))
        elif t == "moe":
            per["moe"].append((b.get("n_routed_experts", raw.get("n_routed_experts")),
                             b.get("moe_intermediate_size", raw.get("moe_intermediate_size"))))
            for k in glob:
                glob[k].add(b.get(k, raw.get(k)))
    top = raw.get("hybrid_override_pattern")
    if isinstance(top, str) and top and top != pattern:
        problems.append(f"hybrid_override_pattern={top!r} disagrees with block_configs ({pattern!r})")
    for k, vals in glob.items():
        if len(vals) > 1:
            problems.append(f"block_configs: per-layer {k} {sorted(map(str, vals))} is not supported (one value per model)")
    d: dict = {"hybrid_override_pattern": pattern, "layers_block_type": None, "layer_types": None,
               "num_hidden_layers": len(blocks)}
    for k, vals in glob.items():
        if len(vals) == 1 and None not in vals:
            d[k] = vals.pop()
    if per["mlp"]:
        d["intermediate_size"] = max(per["mlp"])
        d["ffn_per_layer"] = tuple(per["mlp"]) if len(set(per["mlp"])) > 1 else None
    if per["moe"]:
        ex, ff = [e for e, _ in per["moe"]], [f for _, f in per["moe"]]
        d["n_routed_experts"], d["moe_intermediate_size"] = max(ex), max(ff)
        d["moe_experts_per_layer"] = tuple(ex) if len(set(ex)) > 1 else None
        d["moe_ffn_per_layer"] = tuple(ff) if len(set(ff)) > 1 else None
    return d


def hf_config_dict(cfg: NemotronHConfig, dtype: str = "float32") -> dict:
    """The `config.json` `save_hf` writes (transformers NemotronHConfig fields, both the current
    `layers_block_type` and the legacy `hybrid_override_pattern` that other stacks read). A
    heterogeneous config (per-layer MLP / MoE widths) is written as vLLM's `nemotron_h_puzzle`
    (`_puzzle_config`); per-layer Mamba or attention heads cannot be served and are refused."""
    problems = []
    hetero = cfg if cfg.is_heterogeneous else None
    if hetero is not None:
        for name, axis in _GLOBAL_ONLY.items():
            if getattr(cfg, name) is not None:
                problems.append(f"{name}={getattr(cfg, name)}: vLLM builds every {'Mamba' if 'mamba' in name else 'attention'} "
                                f"layer of a nemotron_h_puzzle model from the global config, so the layers cannot differ "
                                f"in {axis.replace('_', ' ')}; slice with one Widths.{axis} for every layer")
        cfg = cfg.replace(ffn_per_layer=None, moe_experts_per_layer=None, moe_ffn_per_layer=None,
                          **{n: None for n in _GLOBAL_ONLY})
    lo, hi = cfg.time_step_limit
    if math.isfinite(hi):
        problems.append(f"time_step_limit={cfg.time_step_limit}: transformers NemotronH never clamps dt from above, "
                        "so a finite upper limit cannot be exported")
    if problems:
        raise HFCheckpointError("cannot write this model as an HF NemotronH checkpoint", problems)
    d = cfg.to_hf()
    d["layers_block_type"] = [KINDS[c].HF_LAYER_TYPE for c in cfg.pattern]
    d["hybrid_override_pattern"] = cfg.pattern
    d["num_hidden_layers"] = cfg.num_hidden_layers
    tmin = lo if lo > 0 else _F32_TINY
    d["time_step_min"] = tmin
    d["time_step_max"] = max(cfg.time_step_max, tmin)
    d["time_step_floor"] = min(cfg.time_step_floor, d["time_step_max"])
    d["time_step_limit"] = [tmin, _encode_float(float("inf"))]
    if not cfg.moe_shared_expert_intermediate_size and cfg.layers_of(moe):
        # HF always builds a shared expert; we write a zero one of width 1 (contributes exactly 0)
        d["moe_shared_expert_intermediate_size"] = 1
        d["n_shared_experts"] = 1
    d["dtype"] = dtype
    d["use_cache"] = True
    d["num_nextn_predict_layers"] = 0
    return _puzzle_config(d, hetero) if hetero is not None else d


# ------------------------------------------------------------------------------- checkpoint
class _Files:
    """The safetensors files of a checkpoint (headers read, tensors memory-mapped and read one at a
    time) and which file holds each key. Unreadable files are collected in `problems`."""

    def __init__(self, directory: str):
        self.directory = directory
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.key_file: dict[str, str] = {}
        self.problems: list[str] = []
        index = os.path.join(directory, SAFE_INDEX)
        single = os.path.join(directory, SAFE_SINGLE)
        if os.path.isfile(index):
            try:
                wmap = read_json(index, what="safetensors index", required=("weight_map",))["weight_map"]
            except JSONFileError as e:
                raise HFCheckpointError(f"corrupt index {index}", [str(e)]) from None
            if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in wmap.items()):
                raise HFCheckpointError(f"corrupt index {index}",
                                        ["field 'weight_map' must be an object of tensor name -> file name"])
            files = sorted(set(wmap.values()))
            unsafe = [f"{f!r}: {why}" for f in files for why in [_unsafe_shard_name(directory, f)] if why]
            if unsafe:
                raise HFCheckpointError(f"unsafe shard names in {index} (never opened)", unsafe)
            listed: dict[str, set] = {}
            for fname in files:
                keys = self._keys(fname)
                if keys is not None:
                    listed[fname] = keys
            for k, fname in wmap.items():
                if fname not in listed:
                    continue
                if k not in listed[fname]:
                    self.problems.append(f"{k}: the index puts it in {fname}, which does not contain it")
                else:
                    self.key_file[k] = fname
        elif os.path.isfile(single):
            keys = self._keys(SAFE_SINGLE)
            if keys is not None:
                self.key_file = {k: SAFE_SINGLE for k in keys}
        else:
            others = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if len(others) == 1:
                keys = self._keys(others[0])
                if keys is not None:
                    self.key_file = {k: others[0] for k in keys}
            elif others:
                raise HFCheckpointError(f"no {SAFE_INDEX} in {directory}",
                                        [f"{len(others)} safetensors files ({', '.join(others[:4])}, ...) but no "
                                         "index saying which holds which tensor"])
            else:
                raise FileNotFoundError(f"{directory}: no {SAFE_SINGLE} and no {SAFE_INDEX}")

    def _keys(self, fname: str) -> set | None:
        why = _unsafe_shard_name(self.directory, fname)
        if why:
            raise HFCheckpointError(f"unsafe safetensors file in {self.directory} (never opened)", [f"{fname!r}: {why}"])
        from safetensors import SafetensorError, safe_open
        path = os.path.join(self.directory, fname)
        if not os.path.isfile(path):
            self.problems.append(f"{fname}: listed in the index but missing from {self.directory}")
            return None
        try:
            h = self._stack.enter_context(safe_open(path, framework="np"))
        except (SafetensorError, OSError) as e:
            self.problems.append(f"{fname}: truncated or corrupt safetensors file ({os.path.getsize(path)} bytes): {e}")
            return None
        self._handles[fname] = h
        return set(h.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.key_file[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handles[self.key_file[key]].get_slice(key).get_dtype()

    def read(self, key: str) -> np.ndarray:
        from safetensors import SafetensorError
        fname = self.key_file[key]
        try:
            return self._handles[fname].get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise HFCheckpointError(f"cannot read {key}", [f"{fname}: {e}"]) from None

    def close(self):
        self._stack.close()


def _unsafe_shard_name(directory: str, fname: str) -> str | None:
    """Why `fname` is not a plain file name inside `directory` (None when it is)."""
    if not fname or fname in (".", "..") or os.path.isabs(fname) or "/" in fname or "\\" in fname \
            or os.path.basename(fname) != fname or "\0" in fname:
        return "a shard must be a plain file name inside the checkpoint folder (no '..', '/', absolute paths)"
    path = os.path.join(directory, fname)
    if os.path.islink(path):
        real, root = os.path.realpath(path), os.path.realpath(directory)
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            return f"a symlink that leaves the checkpoint folder (-> {real})"
    return None


_ST_DTYPES = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16, "F64": jnp.float64}


@dataclass
class _Plan:
    """Where every params leaf comes from: (layer or None, leaf group) -> (rule, keys)."""

    sources: dict = dataclasses.field(default_factory=dict)   # (layer, rule index) -> key or {j: key}
    skipped: list = dataclasses.field(default_factory=list)


def _match(rel: str) -> tuple[int, re.Match] | None:
    for n, rx in enumerate(_REGEXES):
        m = rx.match(rel)
        if m is not None:
            return n, m
    return None


def _plan(cfg: NemotronHConfig, files: _Files) -> _Plan:
    """Match every key against RULES; collect missing / unexpected / mis-shaped keys together."""
    if files.problems:   # unreadable files first: every key in them would otherwise read as missing
        raise HFCheckpointError(f"checkpoint {files.directory} has unreadable files", files.problems)
    problems: list[str] = []
    plan = _Plan()
    n_layers = cfg.num_hidden_layers
    for key in sorted(files.key_file):
        prefix = next((p for p in _PREFIXES if key.startswith(p)), "")
        rel = key[len(prefix):]
        if rel.startswith("mtp.") or key.startswith("mtp."):
            plan.skipped.append(key)
            continue
        hit = _match(rel)
        if hit is None or (RULES[hit[0]].kind == "head" and prefix):
            problems.append(f"{key}: unexpected (no NemotronH tensor has this name)")
            continue
        n, m = hit
        rule = RULES[n]
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
        for n, rule in enumerate(RULES):
            if rule.kind not in kinds or not rule.when(d) or rule.experts == "stacked":
                continue
            if rule.experts == "per_expert":
                alt = next(i for i, r in enumerate(RULES) if r.experts == "stacked" and r.params == rule.params)
                per = plan.sources.get((layer, n), {})
                stacked = plan.sources.get((layer, alt))
                if stacked is not None and per:
                    problems.append(f"{RULES[alt].key(layer)}: given both stacked and per-expert "
                                    f"({len(per)} tensors); keep one form")
                elif stacked is None:
                    if not per:
                        problems.append(f"{rule.key(layer, None).replace('{j}', '*')} (or stacked "
                                        f"{RULES[alt].key(layer)}): missing")
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


def _target_dtype(raw: dict, files: _Files, dtype) -> Any:
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
    forward (`forward(..., quant=state)`). A tensor holding NaN / inf is refused
    (`NonFiniteError` naming it) unless `allow_nonfinite` (debugging: a warning instead)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    if dtype is not None:
        _target_dtype({}, None, dtype)          # refuse a non-float dtype before reading anything
    cfg, raw = read_hf_config(directory)
    files = _Files(directory)
    from .quant import export as qexport
    qspec = qexport.spec_from_config(raw, directory)
    if qspec is not None:
        files = qexport.DequantizedFiles(files, qspec)
    qstate = None
    try:
        plan = _plan(cfg, files)
        target = _target_dtype(raw, files, dtype)
        place = _placer(cfg, mesh, rules)
        params: dict = {"layers": [{"mixer": {}} for _ in range(cfg.num_hidden_layers)]}
        n_tensors = sum(len(v) if isinstance(v, dict) else 1 for v in plan.sources.values())
        bar = _bar(progress, n_tensors, "load_hf", "tensor")
        for layer in [None] + list(range(cfg.num_hidden_layers)):
            d = layer_dims(cfg, layer)
            kinds = ("top", "head") if layer is None else ("layer", cfg.pattern[layer])
            for n, rule in enumerate(RULES):
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
    from .finite import check_finite
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
    from jax.sharding import NamedSharding
    from .sharding import DEFAULT_RULES, logical_to_spec
    axes = param_axes(cfg)
    rules = DEFAULT_RULES if rules is None else rules

    def place(arr, path):
        a = axes
        for p in path:
            a = a[p]
        return jax.device_put(arr, NamedSharding(mesh, logical_to_spec(a, arr.shape, mesh, rules)))
    return place


def _bar(enabled: bool, total: int, desc: str, unit: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------- save
def _hf_tensors(cfg: NemotronHConfig, params: dict, dtype) -> Iterable[tuple[str, tuple, Callable[[], np.ndarray]]]:
    """(key, shape, thunk) for every HF tensor, in file order; thunks convert lazily."""
    hd = dtype

    def host(x, f32):
        return np.asarray(jax.device_get(x)).astype(np.float32 if f32 else hd, copy=False)

    for layer in [None] + list(range(cfg.num_hidden_layers)):
        d = layer_dims(cfg, layer)
        kinds = ("top", "head") if layer is None else ("layer", cfg.pattern[layer])
        for rule in RULES:
            if rule.kind not in kinds or rule.experts == "stacked":
                continue
            if layer is None:
                src = params
            elif rule.params == ("norm",) and rule.kind == "layer":
                src = params["layers"][layer]
            else:
                src = params["layers"][layer]["mixer"]
            if not rule.when(d):
                if rule.params in (("shared_up",), ("shared_down",)) and d.E:   # zero shared expert
                    shp = (1, d.D) if rule.params == ("shared_up",) else (d.D, 1)
                    yield rule.key(layer), shp, (lambda shp=shp, f=rule.f32: np.zeros(shp, np.float32 if f else hd))
                continue
            if rule.optional(cfg):   # e.g. conv bias with use_conv_bias=False: written only if nonzero
                vals = [np.asarray(src[p]) for p in rule.params]
                if all(not v.any() for v in vals):
                    continue
                raise HFCheckpointError("cannot write this model", [
                    f"{rule.key(layer)}: nonzero values but the config says it is absent ({rule.params})"])
            if rule.experts == "per_expert":
                # one host copy of the stacked [E, ...] leaf, sliced per expert, dropped after the last
                held: dict = {}

                def expert(j, r=rule, s=src, d=d, held=held):
                    if not held:
                        held.update({p: np.asarray(jax.device_get(s[p])) for p in r.params})
                    out = host(r.save(tuple(held[p][j] for p in r.params), d), r.f32)
                    if j == d.E - 1:
                        held.clear()
                    return out

                for j in range(d.E):
                    yield rule.key(layer, j), rule.shape(d), (lambda j=j, f=expert: f(j))
            else:
                yield (rule.key(layer), rule.shape(d),
                       lambda r=rule, s=src, d=d: host(r.save(tuple(s[p] for p in r.params), d), r.f32))


def _parse_size(s) -> int:
    if isinstance(s, bool):
        raise ValueError(f"max_shard_size={s!r}: expected bytes (int) or a size like '5GB' / '500MB'")
    if isinstance(s, int):
        n = s
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", str(s), re.I)
        if not m:
            raise ValueError(f"max_shard_size={s!r}: expected bytes (int) or a size like '5GB' / '500MB'")
        mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
        n = int(float(m.group(1)) * mult[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size={s!r}: must be > 0 bytes")
    return n


def save_hf(directory: str | os.PathLike, cfg: NemotronHConfig, params: dict, *, dtype=None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = False,
            quantization: str | None = None, quant_state=None, kv_scales: dict | None = None,
            protect: Sequence[str | os.PathLike] = (), budgets=None, fractions: dict | None = None,
            elastic_cfg=None, router_params=None, tokenizer_dir: str | os.PathLike | None = None,
            allow_nonfinite: bool = False) -> str:
    """Write (cfg, params) as an HF NemotronH checkpoint that
    `transformers.NemotronHForCausalLM.from_pretrained(directory)` loads with the same logits.

    Keys are written as on the Hub (`backbone.` prefix, per-expert tensors), `config.json` with
    `layers_block_type` and the legacy `hybrid_override_pattern`, shards of at most
    `max_shard_size` with `model.safetensors.index.json` when there is more than one.
    `dtype`: on-disk dtype (None: the embedding's); router weight and bias are float32.
    The folder is written by `elastic_jax.fileio.atomic_folder`: into a temporary folder swapped
    in only when complete, so a failed export leaves nothing behind and the previous one intact.
    An existing empty folder is a valid target; `overwrite` replaces a folder only when it holds
    nothing but what save_hf writes (`HF_EXPORT_FILES`), else FileExistsError lists the rest. An
    empty path, a target containing the current directory or a `protect`ed path (the source of
    an export) is refused. A heterogeneous (per-layer width) config cannot be expressed as an HF
    NemotronH config and raises `HFCheckpointError`.
    `quantization` "fp8" | "nvfp4" (or a `quant_state`, `elastic_jax.quant.QuantState`): the
    projections are written packed with their scales in the ModelOpt layout
    (`elastic_jax.quant.export`); without a state the weight scales come from these params;
    `kv_scales` ({attention layer: {"k_scale", "v_scale"}}, `elastic_jax.quant.calibrate_kv_cache`)
    adds FP8 KV-cache scales.
    `budgets` ({name: Widths}, nested submodels of this model) is written as `elastic_budgets.json`
    (see `budget_table`, with the optional per-budget `fractions` and the `elastic_cfg`), the
    budget router's `router_params` as `elastic/router.safetensors`: together the nested
    checkpoint (`elastic_jax.infer.checkpoint`). `tokenizer_dir`: a folder whose tokenizer files
    (`TOKENIZER_FILES`) are copied in, so `elastic-jax generate` works on the export.
    Every tensor is checked finite as written (after the dtype cast: float16 overflows to inf),
    and the router's before anything is written; a NaN / inf is `NonFiniteError` naming the
    tensor, nothing written (unless `allow_nonfinite`: a warning)."""
    from .fileio import check_target
    table = None if not budgets else budget_table(cfg, budgets, fractions=fractions, elastic_cfg=elastic_cfg)
    tok_files = _tokenizer_files(tokenizer_dir)
    check_target(directory, owned=HF_EXPORT_FILES, overwrite=overwrite, protect=protect, what="save_hf")
    try:
        out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else params["embed"].dtype))
    except TypeError:
        raise ValueError(f"save_hf dtype={dtype!r}: expected float32, bfloat16 or float16") from None
    if out_dtype not in (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        raise ValueError(f"save_hf dtype={out_dtype}: expected float32, bfloat16 or float16")
    limit = _parse_size(max_shard_size)
    config = hf_config_dict(cfg, dtype=str(out_dtype))
    check_params(params, cfg)
    if router_params:
        from .finite import check_finite
        check_finite(router_params, f"save_hf {os.fspath(directory)}: the budget router", allow=allow_nonfinite,
                     hint="nothing written (allow_nonfinite=True / --allow-nonfinite to write anyway)")
    tensors = list(_hf_tensors(cfg, params, out_dtype))
    qconfig, writer = None, None
    if quantization is not None or quant_state is not None:   # ModelOpt FP8 / NVFP4 layout (METHOD §10)
        from .quant import export as qexport
        fmt = quantization if quantization is not None else quant_state.spec.fmt
        tensors, qconfig = qexport.quantize_tensors(cfg, params, tensors, fmt, quant_state, kv_scales=kv_scales)
        config["quantization_config"] = qconfig
        writer = qexport.write_safetensors
    shards: list[list] = [[]]
    size = 0
    for key, shape, thunk in tensors:
        nbytes = int(np.prod(shape)) * (4 if "gate." in key else out_dtype.itemsize)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, shape, thunk))
        size += nbytes
    with atomic_folder(directory, owned=HF_EXPORT_FILES, overwrite=overwrite, protect=protect,
                       what="save_hf") as tmp:
        _write_hf_files(tmp, cfg, config, shards, len(tensors), progress, writer,
                        finite_what=f"save_hf {os.fspath(directory)}", allow_nonfinite=allow_nonfinite)
        if qconfig is not None:
            qexport.write_quant_config(tmp, qconfig)
        if table is not None:
            with open(os.path.join(tmp, BUDGETS_FILE), "w") as f:
                json.dump(table, f, indent=1)
        if router_params:
            from .fileio import save_safetensors
            os.makedirs(os.path.join(tmp, os.path.dirname(ROUTER_FILE)), exist_ok=True)
            save_safetensors(flatten_tree(router_params), os.path.join(tmp, ROUTER_FILE))
        for src in tok_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
    return os.path.abspath(os.fspath(directory))


def _write_hf_files(tmp: str, cfg: NemotronHConfig, config: dict, shards: list, n_tensors: int,
                    progress: bool, writer=None, finite_what: str | None = None,
                    allow_nonfinite: bool = False) -> None:
    """The files of an HF checkpoint into the (empty, temporary) folder `tmp`; `writer`: the
    safetensors writer (quantized exports write float8 tensors with their own). `finite_what`:
    check each tensor finite (`NonFiniteError` naming it, prefixed by this; a warning with
    `allow_nonfinite`)."""
    from .finite import check_finite
    from .fileio import save_safetensors
    names = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    bar = _bar(progress, n_tensors, "save_hf", "tensor")
    for name, shard in zip(names, shards):
        arrays = {}
        for key, shape, thunk in shard:
            a = thunk()
            if tuple(a.shape) != tuple(shape):
                raise HFCheckpointError("internal shape error", [f"{key}: {a.shape} != {shape}"])
            if finite_what is not None:
                check_finite({key: a}, finite_what, allow=allow_nonfinite, hint="nothing written (allow_nonfinite=True / "
                             "--allow-nonfinite to write anyway)")
            arrays[key] = a
            weight_map[key] = name
            total += a.nbytes
            bar.update(1)
        (writer or save_safetensors)(arrays, os.path.join(tmp, name), metadata={"format": "pt"})
        del arrays
    bar.close()
    if len(shards) > 1:
        with open(os.path.join(tmp, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
                   "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}, f, indent=2)


# ------------------------------------------------------------------------ nested budget table
BUDGETS_FILE = "elastic_budgets.json"
# In a subfolder: vLLM and SGLang load every top-level `*.safetensors` of a folder without an index
# (and newer SGLang keeps unindexed ones even with an index), so only model shards live at the top.
ROUTER_FILE = os.path.join("elastic", "router.safetensors")
LEGACY_ROUTER_FILE = "elastic_router.safetensors"    # read only (folders written before issue 28)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _tokenizer_files(tokenizer_dir) -> list[str]:
    if tokenizer_dir is None:
        return []
    tokenizer_dir = os.fspath(tokenizer_dir)
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} has no tokenizer.json")
    return [os.path.join(tokenizer_dir, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]


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
    from .elastic.slicing import param_count
    from .widths import Widths
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
                from .elastic.budgets import check_budget_size, target_of
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
    from .widths import WIDTH_AXES, Widths
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
    from safetensors.numpy import load_file
    try:
        return unflatten_tree(load_file(path))
    except Exception as e:              # safetensors raises its own SafetensorError
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


# ---------------------------------------------------------------------------------------- CLI
def parse_widths(text: str, cfg: NemotronHConfig):
    """`--widths` JSON ('{"hidden": 48, "mamba_heads": 4}', lists for per-layer) -> validated Widths."""
    from .widths import Widths
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
