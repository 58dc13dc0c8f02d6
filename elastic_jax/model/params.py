"""Parameter pytree of the Nemotron-H hybrid: shapes, HF-style init and logical axis names.

Layout (JAX `[in, out]` matrices; HF stores `[out, in]`):
  embed [V, D], norm_f [D], lm_head [D, V],
  layers[i] = {"norm": [D], "mixer": {...}} with the mixer keys of its kind:
    M: z_proj [D, H·P], x_proj [D, H·P], B_proj [D, G·N], C_proj [D, G·N], dt_proj [D, H],
       conv_x [K, H·P], conv_x_bias [H·P], conv_B [K, G·N], conv_B_bias, conv_C [K, G·N],
       conv_C_bias, A_log [H], D [H], dt_bias [H], norm [H·P], out_proj [H·P, D]
    *: q_proj [D, nH·hd], k_proj [D, nKV·hd], v_proj [D, nKV·hd], o_proj [nH·hd, D]
    -: up_proj [D, I], down_proj [I, D]
    E: gate [D, E], e_score_correction_bias [E] (f32), up_proj [E, D, Ie], down_proj [E, Ie, D],
       shared_up [D, Is], shared_down [Is, D]   (shared keys absent when Is = 0)
Mamba heads are group-major: head h belongs to group h // (H / G), as in HF.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig

# Logical axis names (the rules table in elastic_jax/train/sharding.py maps them to mesh axes).
MIXER_AXES = {
    "M": {
        "z_proj": ("embed", "ssm_heads"), "x_proj": ("embed", "ssm_heads"),
        "B_proj": ("embed", "ssm_groups"), "C_proj": ("embed", "ssm_groups"),
        "dt_proj": ("embed", "ssm_heads"),
        "conv_x": ("conv", "ssm_heads"), "conv_x_bias": ("ssm_heads",),
        "conv_B": ("conv", "ssm_groups"), "conv_B_bias": ("ssm_groups",),
        "conv_C": ("conv", "ssm_groups"), "conv_C_bias": ("ssm_groups",),
        "A_log": ("ssm_heads",), "D": ("ssm_heads",), "dt_bias": ("ssm_heads",),
        "norm": ("ssm_heads",), "out_proj": ("ssm_heads", "embed"),
    },
    "*": {
        "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
        "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed"),
    },
    "-": {"up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")},
    "E": {
        "gate": ("embed", "experts_router"), "e_score_correction_bias": ("experts_router",),
        "up_proj": ("experts", "embed", "expert_mlp"), "down_proj": ("experts", "expert_mlp", "embed"),
        "shared_up": ("embed", "mlp"), "shared_down": ("mlp", "embed"),
    },
}


def layer_shapes(cfg: NemotronHConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Mixer parameter shapes of one layer (per-layer sizes honoured)."""
    char = cfg.pattern[layer]
    k = cfg.kind_index()[layer]
    D = cfg.hidden_size
    if char == "M":
        H, P, G, N, K = cfg.mamba_heads_at(k), cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
        return {"z_proj": (D, H * P), "x_proj": (D, H * P), "B_proj": (D, G * N), "C_proj": (D, G * N),
                "dt_proj": (D, H), "conv_x": (K, H * P), "conv_x_bias": (H * P,), "conv_B": (K, G * N),
                "conv_B_bias": (G * N,), "conv_C": (K, G * N), "conv_C_bias": (G * N,),
                "A_log": (H,), "D": (H,), "dt_bias": (H,), "norm": (H * P,), "out_proj": (H * P, D)}
    if char == "*":
        nH, nKV, hd = cfg.attn_heads_at(k), cfg.num_key_value_heads, cfg.head_dim
        return {"q_proj": (D, nH * hd), "k_proj": (D, nKV * hd), "v_proj": (D, nKV * hd), "o_proj": (nH * hd, D)}
    if char == "-":
        I = cfg.ffn_at(k)
        return {"up_proj": (D, I), "down_proj": (I, D)}
    E, Ie, Is = cfg.moe_experts_at(k), cfg.moe_ffn_at(k), cfg.moe_shared_expert_intermediate_size
    shapes = {"gate": (D, E), "e_score_correction_bias": (E,), "up_proj": (E, D, Ie), "down_proj": (E, Ie, D)}
    if Is:
        shapes.update({"shared_up": (D, Is), "shared_down": (Is, D)})
    return shapes


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
    """Logical axis names for every parameter, same structure as `init_params`."""
    return {
        "embed": ("vocab", "embed"),
        "layers": [{"norm": ("embed",), "mixer": {k: MIXER_AXES[c][k] for k in layer_shapes(cfg, i)}}
                   for i, c in enumerate(cfg.pattern)],
        "norm_f": ("embed",),
        "lm_head": ("embed", "vocab"),
    }


def _mamba_init(cfg, shapes, key, dtype, n_layers):
    ks = jax.random.split(key, 8)
    std = cfg.initializer_range
    H = shapes["A_log"][0]
    K = cfg.conv_kernel
    p = {}
    for i, name in enumerate(("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj")):
        p[name] = std * jax.random.normal(ks[i], shapes[name], jnp.float32)
    bound = 1.0 / math.sqrt(K)  # PyTorch Conv1d default (fan_in = K for a depthwise conv)
    ck = jax.random.split(ks[5], 6)
    for j, name in enumerate(("conv_x", "conv_B", "conv_C")):
        p[name] = jax.random.uniform(ck[2 * j], shapes[name], jnp.float32, -bound, bound)
        p[name + "_bias"] = jax.random.uniform(ck[2 * j + 1], shapes[name + "_bias"], jnp.float32, -bound, bound)
    p["A_log"] = jnp.log(jnp.arange(1, H + 1, dtype=jnp.float32))
    p["D"] = jnp.ones((H,), jnp.float32)
    dt = jnp.exp(jax.random.uniform(ks[6], (H,), jnp.float32)
                 * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min)) + math.log(cfg.time_step_min))
    dt = jnp.maximum(dt, cfg.time_step_floor)
    p["dt_bias"] = dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    p["norm"] = jnp.ones(shapes["norm"], jnp.float32)
    p["out_proj"] = std / math.sqrt(n_layers) * jax.random.normal(ks[7], shapes["out_proj"], jnp.float32)
    return {k: v.astype(dtype) for k, v in p.items()}


def init_params(cfg: NemotronHConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters with the HF NemotronH initialization (spec ANCHORS §5.2)."""
    std = cfg.initializer_range
    n = cfg.num_hidden_layers
    keys = jax.random.split(key, n + 2)
    params = {
        "embed": (std * jax.random.normal(keys[0], (cfg.vocab_size, cfg.hidden_size))).astype(dtype),
        "layers": [],
        "norm_f": jnp.ones((cfg.hidden_size,), dtype),
        "lm_head": (std * jax.random.normal(keys[1], (cfg.hidden_size, cfg.vocab_size))).astype(dtype),
    }
    for i, c in enumerate(cfg.pattern):
        shapes = layer_shapes(cfg, i)
        k = keys[i + 2]
        if c == "M":
            mixer = _mamba_init(cfg, shapes, k, dtype, n)
        else:
            ks = jax.random.split(k, len(shapes))
            mixer = {}
            for kk, (name, shp) in zip(ks, shapes.items()):
                if name == "e_score_correction_bias":
                    mixer[name] = jnp.zeros(shp, jnp.float32)
                    continue
                scale = std / math.sqrt(n) if name in ("o_proj", "down_proj", "shared_down") else std
                mixer[name] = (scale * jax.random.normal(kk, shp, jnp.float32)).astype(dtype)
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
