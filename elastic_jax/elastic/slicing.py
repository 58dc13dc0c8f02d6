"""Zero-shot extraction (spec §8): keep the prefix of every importance-sorted axis.

`slice_params(params, cfg, widths)` returns a standalone smaller model whose logits equal the
masked parent's at those widths; `param_count` is the exact size of that model.
"""
from __future__ import annotations

import numpy as np

from ..config import NemotronHConfig
from ..model.params import param_shapes
from ..widths import Widths


def group_prefix(total: int, groups: int, keep: int) -> np.ndarray:
    """Indices of the first keep/groups components of each of `groups` group-major blocks."""
    per = total // groups
    k = keep // groups
    return np.concatenate([np.arange(g * per, g * per + k) for g in range(groups)]).astype(np.int64)


def _expand(idx: np.ndarray, width: int) -> np.ndarray:
    """Head indices -> channel indices for heads of `width` channels."""
    return (idx[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def sliced_config(cfg: NemotronHConfig, widths: Widths | None) -> NemotronHConfig:
    """The config of the standalone model that `slice_params` produces."""
    widths = Widths() if widths is None else widths
    widths.validate(cfg)
    keep = widths.layer_mask(cfg)
    kinds = cfg.kind_index()
    per_axis = {a: widths.per_layer(cfg, a) if cfg.count(c) else ()
                for a, c in (("mamba_heads", "M"), ("attn_heads", "*"), ("ffn", "-"),
                             ("moe_experts", "E"), ("moe_ffn", "E"))}
    pattern = "".join(c for c, k in zip(cfg.pattern, keep) if k)
    kw = {"hidden_size": widths.hidden_size(cfg), "hybrid_override_pattern": pattern}
    if cfg.count("M"):        # one head dim for the whole model (HF `mamba_head_dim`)
        chans = {p for p, k in zip(widths.per_layer(cfg, "mamba_channels"),
                                   [keep[i] for i in cfg.layer_indices("M")]) if k}
        if len(chans) > 1:
            raise ValueError(f"Widths.mamba_channels={widths.mamba_channels!r}: a sliced model has one "
                             f"mamba_head_dim, so every kept Mamba layer needs the same channel count")
        if chans:
            kw["mamba_head_dim"] = chans.pop()
    kept = {a: [] for a in per_axis}
    for i, c in enumerate(cfg.pattern):
        if not keep[i]:
            continue
        for a, ch in (("mamba_heads", "M"), ("attn_heads", "*"), ("ffn", "-"), ("moe_experts", "E"), ("moe_ffn", "E")):
            if c == ch:
                kept[a].append(per_axis[a][kinds[i]])
    base = {"mamba_heads": ("mamba_num_heads", "mamba_heads_per_layer"),
            "attn_heads": ("num_attention_heads", "attn_heads_per_layer"),
            "ffn": ("intermediate_size", "ffn_per_layer"),
            "moe_experts": ("n_routed_experts", "moe_experts_per_layer"),
            "moe_ffn": ("moe_intermediate_size", "moe_ffn_per_layer")}
    for a, (field, per_field) in base.items():
        vals = kept[a]
        kw[per_field] = None
        if not vals:
            continue
        if len(set(vals)) == 1:
            kw[field] = vals[0]
        else:
            kw[field] = max(vals)
            kw[per_field] = tuple(vals)
    if not pattern:
        raise ValueError("Widths.layers drops every layer; a model needs at least one layer")
    return cfg.replace(**kw)


def slice_params(params, cfg: NemotronHConfig, widths: Widths | None):
    """(sub_cfg, sub_params): real, smaller arrays such that
    forward(sub_params, t, sub_cfg) == forward(params, t, cfg, widths)."""
    widths = Widths() if widths is None else widths
    sub_cfg = sliced_config(cfg, widths)
    d = widths.hidden_size(cfg)
    keep = widths.layer_mask(cfg)
    kinds = cfg.kind_index()
    per = {a: widths.per_layer(cfg, a) if cfg.count(c) else ()
           for a, c in (("mamba_heads", "M"), ("mamba_channels", "M"), ("attn_heads", "*"), ("ffn", "-"),
                        ("moe_experts", "E"), ("moe_ffn", "E"))}
    out = {"embed": params["embed"][:, :d], "norm_f": params["norm_f"][:d],
           "lm_head": params["lm_head"][:d], "layers": []}
    for i, c in enumerate(cfg.pattern):
        if not keep[i]:
            continue
        lp = params["layers"][i]
        m = lp["mixer"]
        k = kinds[i]
        if c == "M":
            H = m["A_log"].shape[0]
            P = cfg.mamba_head_dim
            heads = group_prefix(H, cfg.n_groups, per["mamba_heads"][k])
            p = per["mamba_channels"][k]                   # the first p channels of every kept head
            ch = (heads[:, None] * P + np.arange(p)[None, :]).reshape(-1)
            new = {"z_proj": m["z_proj"][:d, ch], "x_proj": m["x_proj"][:d, ch],
                   "B_proj": m["B_proj"][:d], "C_proj": m["C_proj"][:d], "dt_proj": m["dt_proj"][:d, heads],
                   "conv_x": m["conv_x"][:, ch], "conv_x_bias": m["conv_x_bias"][ch],
                   "conv_B": m["conv_B"], "conv_B_bias": m["conv_B_bias"],
                   "conv_C": m["conv_C"], "conv_C_bias": m["conv_C_bias"],
                   "A_log": m["A_log"][heads], "D": m["D"][heads], "dt_bias": m["dt_bias"][heads],
                   "norm": m["norm"][ch], "out_proj": m["out_proj"][ch, :d]}
        elif c == "*":
            hd = cfg.head_dim
            nH = m["q_proj"].shape[1] // hd
            heads = group_prefix(nH, cfg.num_key_value_heads, per["attn_heads"][k])
            ch = _expand(heads, hd)
            new = {"q_proj": m["q_proj"][:d, ch], "k_proj": m["k_proj"][:d], "v_proj": m["v_proj"][:d],
                   "o_proj": m["o_proj"][ch, :d]}
        elif c == "-":
            n = per["ffn"][k]
            new = {"up_proj": m["up_proj"][:d, :n], "down_proj": m["down_proj"][:n, :d]}
        else:
            E = m["gate"].shape[1]
            experts = group_prefix(E, cfg.n_group, per["moe_experts"][k])
            w = per["moe_ffn"][k]
            new = {"gate": m["gate"][:d, experts], "e_score_correction_bias": m["e_score_correction_bias"][experts],
                   "up_proj": m["up_proj"][experts][:, :d, :w], "down_proj": m["down_proj"][experts][:, :w, :d]}
            if "shared_up" in m:
                new["shared_up"] = m["shared_up"][:d]
                new["shared_down"] = m["shared_down"][:, :d]
        out["layers"].append({"norm": lp["norm"][:d], "mixer": new})
    return sub_cfg, out


def param_count(cfg: NemotronHConfig, widths: Widths | None = None, active: bool = False) -> int:
    """Exact parameter count of the (sliced) model. `active`: only `num_experts_per_tok` routed
    experts per MoE layer counted (what one token touches)."""
    sub = sliced_config(cfg, widths)
    shapes = param_shapes(sub)
    total = int(np.prod(shapes["embed"]) + np.prod(shapes["norm_f"]) + np.prod(shapes["lm_head"]))
    for i, layer in enumerate(shapes["layers"]):
        total += int(np.prod(layer["norm"]))
        for name, shp in layer["mixer"].items():
            n = int(np.prod(shp))
            if active and sub.pattern[i] == "E" and name in ("up_proj", "down_proj"):
                n = n // shp[0] * sub.num_experts_per_tok
            total += n
    return total
