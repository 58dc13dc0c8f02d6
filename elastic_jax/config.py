"""`NemotronHConfig`: the hybrid Mamba2 / attention / MLP / MoE decoder, field-for-field with HF.

The layer pattern uses the characters of Megatron / HF `hybrid_override_pattern` (M = Mamba2
mixer, * = attention, - = MLP, E = MoE), each declared by its kind module (`model/kinds/`) and
registered in `registry.PATTERN`; the per-layer size fields are those of `registry.AXES`.
A heterogeneous (sliced) config may carry per-layer sizes (`*_per_layer`, one entry per layer of
that kind in pattern order); HF `NemotronHConfig` cannot express those, so `to_hf` refuses them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from .config_base import ConfigBase
from .errors import decode_json_floats
from .registry import AXES, PATTERN, hf_block_types, per_layer_fields

# Legacy / alternative HF field names -> our field names.
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_state": "ssm_state_size",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_expand": "expand",
    "attention_head_dim": "head_dim",
    "num_local_experts": "n_routed_experts",
    "rms_norm_eps": "layer_norm_epsilon",
}


def _pattern_of(d: dict) -> str | None:
    """The layer pattern an HF dict's `layers_block_type` spells (None if absent or unreadable)."""
    types = d.get("layers_block_type")
    if isinstance(types, str):
        return types
    spell = hf_block_types()
    if isinstance(types, list) and all(t in spell for t in types):
        return "".join(spell[t] for t in types)
    return None


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _check_contradictions(d: dict, overrides: dict) -> None:
    """An HF dict that says two different things is an error, not a silent choice."""
    problems = []
    from_types = _pattern_of(d)
    legacy = d.get("hybrid_override_pattern")
    if from_types is not None and isinstance(legacy, str) and legacy and legacy != from_types:
        problems.append(f"layers_block_type spells the pattern {from_types!r} but hybrid_override_pattern is "
                        f"{legacy!r}")
    pattern = from_types if from_types is not None else (legacy if isinstance(legacy, str) else None)
    n = d.get("num_hidden_layers")
    if pattern and n is not None and n != len(pattern):
        problems.append(f"num_hidden_layers={n!r} but the layer pattern {pattern!r} has {len(pattern)} layers")
    for alias, name in _ALIASES.items():
        if alias in d and name in d and name not in overrides and d[alias] is not None and d[name] is not None \
                and not _same_value(d[alias], d[name]):
            problems.append(f"{alias}={d[alias]!r} and its canonical name {name}={d[name]!r} disagree")
    if problems:
        raise ValueError("contradictory HF config fields: " + "; ".join(problems))


# Runtime knobs that were `NemotronHConfig` fields once and are `ComputePolicy` fields now
# (model/policy.py): constructing a config with one is this error; a saved config's are dropped.
MOVED_TO_POLICY = {
    "kernel_impl": "the kernel implementation is a runtime knob now: "
                   "ej.forward(..., policy=ej.ComputePolicy(kernel_impl=...)) or TrainConfig(policy=...)",
    "remat": "rematerialization is a runtime knob now: "
             "ej.forward(..., policy=ej.ComputePolicy(remat='full')) or TrainConfig(policy=...)",
}


@dataclass(frozen=True)
class NemotronHConfig(ConfigBase):
    """Frozen model config. HF field names; `d_inner = mamba_num_heads * mamba_head_dim`."""

    vocab_size: int = 512
    hidden_size: int = 64
    hybrid_override_pattern: str = "MEM*-E"
    # attention
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    attention_bias: bool = False
    # dense MLP
    intermediate_size: int = 128
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba2
    mamba_num_heads: int = 8
    mamba_head_dim: int = 8
    n_groups: int = 2
    ssm_state_size: int = 16
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    moe_shared_expert_intermediate_size: int = 64
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_latent_size: int | None = None
    # misc
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_bias: bool = False
    max_position_embeddings: int = 4096
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # heterogeneous (sliced) sizes: one entry per layer of that kind, in pattern order
    mamba_heads_per_layer: tuple[int, ...] | None = None
    attn_heads_per_layer: tuple[int, ...] | None = None
    ffn_per_layer: tuple[int, ...] | None = None
    moe_experts_per_layer: tuple[int, ...] | None = None
    moe_ffn_per_layer: tuple[int, ...] | None = None

    def __new__(cls, *args, **kw):
        moved = sorted(set(kw) & set(MOVED_TO_POLICY))
        if moved:
            raise ValueError(f"NemotronHConfig({', '.join(f'{k}={kw[k]!r}' for k in moved)}): "
                             + "; ".join(MOVED_TO_POLICY[k] for k in moved))
        return super().__new__(cls)

    def __post_init__(self):
        if isinstance(self.time_step_limit, list):
            object.__setattr__(self, "time_step_limit", tuple(self.time_step_limit))
        for name in per_layer_fields():
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(int(i) for i in v))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def pattern(self) -> str:
        return self.hybrid_override_pattern

    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    def layer_indices(self, char: str) -> tuple[int, ...]:
        """Positions in the pattern of the layers of one kind."""
        return tuple(i for i, c in enumerate(self.pattern) if c == char)

    def kind_index(self) -> tuple[int, ...]:
        """For each layer, its index among the layers of its kind."""
        seen: dict[str, int] = {}
        out = []
        for c in self.pattern:
            out.append(seen.get(c, 0))
            seen[c] = seen.get(c, 0) + 1
        return tuple(out)

    def count(self, char: str) -> int:
        return self.pattern.count(char)

    def layers_of(self, kind) -> tuple[int, ...]:
        """Positions of the layers of a kind (a kind module, or anything with its `CHAR`)."""
        return self.layer_indices(kind.CHAR)

    @property
    def is_heterogeneous(self) -> bool:
        return any(getattr(self, n) is not None for n in per_layer_fields())

    def width_at(self, axis: str, i: int) -> int:
        """The parent size along an elastic axis of the i-th layer of its kind (`registry.AXES`)."""
        return AXES[axis].size(self, i)

    def mamba_heads_at(self, i: int) -> int:
        return self.width_at("mamba_heads", i)

    def attn_heads_at(self, i: int) -> int:
        return self.width_at("attn_heads", i)

    def ffn_at(self, i: int) -> int:
        return self.width_at("ffn", i)

    def moe_experts_at(self, i: int) -> int:
        return self.width_at("moe_experts", i)

    def moe_ffn_at(self, i: int) -> int:
        return self.width_at("moe_ffn", i)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the field and the rule for anything malformed."""
        def bad(field_name, rule, value):
            raise ValueError(f"NemotronHConfig.{field_name}={value!r}: {rule}")

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "mamba_num_heads", "mamba_head_dim",
                     "n_groups", "ssm_state_size", "conv_kernel", "chunk_size", "n_routed_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer", v)
        for name in ("moe_shared_expert_intermediate_size", "n_shared_experts", "pad_token_id", "bos_token_id",
                     "eos_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be an integer >= 0", v)
        if not isinstance(self.max_position_embeddings, int) or isinstance(self.max_position_embeddings, bool) \
                or self.max_position_embeddings <= 0:
            bad("max_position_embeddings", "must be a positive integer", self.max_position_embeddings)
        for name in ("attention_bias", "mlp_bias", "use_conv_bias", "mamba_proj_bias", "norm_topk_prob",
                     "tie_word_embeddings", "use_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool", getattr(self, name))
        for name, positive in (("layer_norm_epsilon", True), ("routed_scaling_factor", True),
                               ("time_step_min", True), ("time_step_max", True), ("time_step_floor", False),
                               ("initializer_range", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number", v)
            if (positive and not v > 0) or v < 0:
                bad(name, "must be > 0" if positive else "must be >= 0", v)
        lim = self.time_step_limit
        if not isinstance(lim, tuple) or len(lim) != 2 or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) for x in lim):
            bad("time_step_limit", "must be a pair of numbers (low, high)", lim)
        if not math.isfinite(lim[0]) or lim[0] < 0 or math.isnan(lim[1]) or lim[1] < lim[0]:
            bad("time_step_limit", "must be (low, high) with 0 <= low <= high, low finite (high may be inf)", lim)
        allowed = ", ".join(f"{e.char} ({e.name})" for e in PATTERN.values())
        if not isinstance(self.hybrid_override_pattern, str) or not self.hybrid_override_pattern:
            bad("hybrid_override_pattern", f"must be a non-empty string of the layer characters {allowed}",
                self.hybrid_override_pattern)
        unknown = sorted(set(self.hybrid_override_pattern) - set(PATTERN))
        if unknown:
            bad("hybrid_override_pattern", f"unknown layer characters {unknown}; allowed: {allowed}",
                self.hybrid_override_pattern)
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"must be divisible by num_key_value_heads={self.num_key_value_heads}",
                self.num_attention_heads)
        if self.mamba_num_heads % self.n_groups:
            bad("mamba_num_heads", f"must be divisible by n_groups={self.n_groups}", self.mamba_num_heads)
        if self.n_routed_experts % self.n_group:
            bad("n_routed_experts", f"must be divisible by n_group={self.n_group}", self.n_routed_experts)
        if self.topk_group > self.n_group:
            bad("topk_group", f"must be <= n_group={self.n_group}", self.topk_group)
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"must be <= n_routed_experts={self.n_routed_experts}",
                self.num_experts_per_tok)
        if self.mlp_hidden_act != "relu2":
            bad("mlp_hidden_act", "only 'relu2' (NemotronH) is supported", self.mlp_hidden_act)
        if self.mamba_hidden_act != "silu":
            bad("mamba_hidden_act", "only 'silu' is supported", self.mamba_hidden_act)
        for flag in ("attention_bias", "mlp_bias", "mamba_proj_bias", "use_bias", "tie_word_embeddings"):
            if getattr(self, flag):
                bad(flag, "is not supported (NemotronH checkpoints use False)", getattr(self, flag))
        if self.moe_latent_size is not None:
            bad("moe_latent_size", "latent MoE (Nemotron Super) is not supported", self.moe_latent_size)
        for axis in AXES.values():
            name, char, div, div_name = axis.per_layer_field, axis.kind, axis.groups(self), axis.group_field
            v = None if name is None else getattr(self, name)
            if v is None:
                continue
            if len(v) != self.count(char):
                bad(name, f"needs one entry per '{char}' layer ({self.count(char)})", v)
            for x in v:
                if not isinstance(x, int) or x <= 0 or x % div:
                    bad(name, "entries must be positive integers" + (f" divisible by {div_name}={div}" if div_name else ""), v)
        if self.moe_experts_per_layer is not None and min(self.moe_experts_per_layer) < self.num_experts_per_tok:
            bad("moe_experts_per_layer", f"entries must be >= num_experts_per_tok={self.num_experts_per_tok}",
                self.moe_experts_per_layer)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_dict(cls, d: dict) -> "NemotronHConfig":
        """A config saved by `to_dict` (run meta, `elastic_budgets.json`). Ones saved before the
        runtime knobs moved to `ComputePolicy` hold `kernel_impl` / `remat`: dropped on reading
        (they never changed what the weights compute)."""
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k not in MOVED_TO_POLICY}
        return super().from_dict(d)

    @classmethod
    def from_hf(cls, src: str | os.PathLike | dict, **overrides) -> "NemotronHConfig":
        """From an HF `config.json` (file, directory or dict), current or legacy field names."""
        if isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no HF config at {path}")
            with open(path) as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from None
        elif isinstance(src, dict):
            d = src
        else:
            raise TypeError(f"from_hf takes a path or a dict, got {type(src).__name__}")
        d = decode_json_floats(d)   # transformers >= 5 writes inf as {"__float__": "Infinity"}
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        _check_contradictions(d, overrides)
        # layer pattern: `layers_block_type` (list) or legacy `hybrid_override_pattern` (string)
        if d.get("layers_block_type") is not None:
            types = d["layers_block_type"]
            if isinstance(types, str):
                kw["hybrid_override_pattern"] = types
            else:
                spell = hf_block_types()
                unknown = [t for t in types if t not in spell]
                if unknown:
                    raise ValueError(f"NemotronHConfig.layers_block_type: unknown block types {unknown}; "
                                     f"known: {sorted(spell)}")
                kw["hybrid_override_pattern"] = "".join(spell[t] for t in types)
        elif d.get("hybrid_override_pattern") is not None:
            kw["hybrid_override_pattern"] = d["hybrid_override_pattern"]
        for k, v in d.items():
            k2 = _ALIASES.get(k, k)
            if k2 in ("hybrid_override_pattern", "layers_block_type"):
                continue
            if k2 in names:
                if k2 == "time_step_limit" and v is not None:
                    if not isinstance(v, (list, tuple)):
                        raise ValueError(f"NemotronHConfig.time_step_limit={v!r}: must be a pair (low, high)")
                    v = tuple(float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v)
                if k2 == "moe_latent_size" and v is None:
                    continue
                if v is None:
                    continue
                kw[k2] = v
            # other keys are HF fields that do not change the math here (dropout, rope, dtype, ...)
        if d.get("tie_word_embeddings"):
            raise ValueError("NemotronHConfig.tie_word_embeddings=True: tied embeddings are not supported")
        if d.get("n_shared_experts", 1) not in (0, 1, None):
            raise ValueError(f"NemotronHConfig.n_shared_experts={d['n_shared_experts']}: only 0 or 1 supported")
        if d.get("n_shared_experts") == 0:
            kw["moe_shared_expert_intermediate_size"] = 0
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """A dict that `transformers.NemotronHConfig(**d)` accepts (homogeneous configs only)."""
        if self.is_heterogeneous:
            raise ValueError(
                "this config has per-layer (heterogeneous) sizes "
                f"({', '.join(n for n in per_layer_fields() if getattr(self, n) is not None)}); "
                "HF NemotronHConfig has one size per kind, so it cannot be written as a plain NemotronH config")
        lim = list(self.time_step_limit)
        d = {
            "model_type": "nemotron_h",
            "architectures": ["NemotronHForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "layers_block_type": [PATTERN[c].hf_layer_type for c in self.pattern],
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "attention_bias": self.attention_bias,
            "intermediate_size": self.intermediate_size,
            "mlp_hidden_act": self.mlp_hidden_act,
            "mlp_bias": self.mlp_bias,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "n_groups": self.n_groups,
            "ssm_state_size": self.ssm_state_size,
            "conv_kernel": self.conv_kernel,
            "chunk_size": self.chunk_size,
            "use_conv_bias": self.use_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias,
            "mamba_hidden_act": self.mamba_hidden_act,
            "time_step_limit": [lim[0], lim[1] if math.isfinite(lim[1]) else float("inf")],
            "time_step_min": self.time_step_min,
            "time_step_max": self.time_step_max,
            "time_step_floor": self.time_step_floor,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size,
            "n_shared_experts": 1 if self.moe_shared_expert_intermediate_size else 0,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "use_bias": self.use_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        return d

