"""`config.json` of an HF NemotronH checkpoint <-> `NemotronHConfig`, with transformers' semantics.

Semantics that transformers fixes and the config does not say (checked against transformers 5.x,
`modeling_nemotron_h.py`):
  * the Mamba2 mixer clamps dt to the config's `time_step_limit` (transformers >= 5.25, as the
    original Nemotron-H code; 5.0-5.24 clamped to `(time_step_min, inf)` instead), so `load_hf`
    reads `time_step_limit`, and `save_hf` writes `time_step_limit = [time_step_min, inf]` with
    `time_step_min = time_step_limit[0]` (the smallest positive f32 when that is 0: HF's init takes
    log(time_step_min), and a clamp at 1e-38 changes no f32 logit), which every 5.x reads the same;
  * the MoE block always has a shared expert; a model without one is written with a zero shared
    expert (relu²(0) = 0, so the output is unchanged).
A heterogeneous model (per-layer MLP / MoE widths) is written as vLLM's `nemotron_h_puzzle`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np

from ..config import NemotronHConfig
from ..errors import HFCheckpointError, read_json
from ..model.kinds import KINDS, moe

_F32_TINY = float(np.finfo(np.float32).tiny)


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


