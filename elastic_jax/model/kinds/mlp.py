"""relu² MLP layer kind (pattern char "-")."""
from __future__ import annotations

import numpy as np

from ...config import NemotronHConfig
from ...registry import Axis
from ...sharding import constrain
from ...widths import prefix_mask
from ..layers import dense, relu2
from .base import Param, masks_record, seq_sumsq, static
from .hf_rules import Rule, _t, _t_inv

CHAR = "-"
NAME = "MLP"
KEY = "mlp"               # its name in config formats (a puzzle `block_type`)
HF_LAYER_TYPE = "mlp"     # its `layers_block_type` entry in an HF config.json
AXES = {"ffn": Axis(CHAR, "intermediate_size", "ffn_per_layer", "neurons", option_field="ffn_options",
                    unit_width=lambda cfg: 1)}       # down_proj rows


@masks_record
class MLPMasks:
    """One MLP layer's masks: [I] neurons; `premask`: the official soft form (mask before relu²)."""

    ffn_mask: object = None
    premask: bool = static(False)


# ----------------------------------------------------------------------- declarations
def dims(cfg: NemotronHConfig, hidden, w: dict, active: bool = False) -> dict:
    return {"embed": hidden, "mlp": w["ffn"]}


def params(cfg: NemotronHConfig) -> dict[str, Param]:
    return {"up_proj": Param(("embed", "mlp")), "down_proj": Param(("mlp", "embed"), "normal_out")}


def select(cfg: NemotronHConfig, sizes: dict, sel: dict) -> dict:
    return {"mlp": sel["ffn"]}


def masks(cfg: NemotronHConfig, sw, k, mixer) -> MLPMasks:
    c, p = sw.ffn[0][k], sw.ffn[1][k]
    return MLPMasks(ffn_mask=prefix_mask(mixer["up_proj"].shape[1], c, p), premask=sw.mask_form == "official")


def init_cache(cfg: NemotronHConfig, sizes: dict, batch: int, max_len: int, dtype):
    return None


def cache_elems(cfg: NemotronHConfig, sizes: dict, batch, context) -> dict:
    return {}


# ---------------------------------------------------------------- importance (METHOD §3.2)
def importance_stats(it: dict, cfg: NemotronHConfig, valid, length: int) -> dict:
    """Σ over sequences of the squared per-sequence mean |relu²(x W_up)| per neuron [I]."""
    return {"neurons": seq_sumsq(it["neurons"], valid)}


def importance_scores(st: dict, cfg: NemotronHConfig, **_) -> dict:
    return {"ffn": np.sqrt(np.asarray(st["neurons"], np.float64))}


# -------------------------------------------------------------------------------- HF keys
def hf_dims(cfg: NemotronHConfig, k: int) -> dict:
    return dict(I=cfg.ffn_at(k))


HF_RULES = (
    Rule("mixer.up_proj.weight", CHAR, ("up_proj",), lambda d: (d.I, d.D), _t, _t_inv, linear=True),
    Rule("mixer.down_proj.weight", CHAR, ("down_proj",), lambda d: (d.D, d.I), _t, _t_inv, linear=True),
)


# ------------------------------------------------------------------------------ MLP
def mlp_mixer(p, x_BLD, cfg, el: MLPMasks | None, ctx, cache):
    h = dense(x_BLD, p["up_proj"], ctx.policy)
    if el is not None and el.premask:     # official soft form: mask before relu²
        h = relu2(h * el.ffn_mask.astype(h.dtype))
    else:
        h = relu2(h)
        if el is not None:
            h = h * el.ffn_mask.astype(h.dtype)
    h = constrain(h, ("batch", "length", "act_mlp"))
    # intermediates: the down_proj input relu²(x W_up) [B, L, I]
    return dense(h, p["down_proj"], ctx.policy), ({"neurons": h} if ctx.collect else None)


apply = mlp_mixer


# ------------------------------------------------------------------------ cost (model/cost.py)
def flops(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    """Forward FLOPs per token: 2 x the up and down projections."""
    return {"weights": 4.0 * sizes["embed"] * sizes["mlp"]}


def weights_read(cfg: NemotronHConfig, sizes: dict, mode) -> float:
    return float(2 * sizes["embed"] * sizes["mlp"])


def state_traffic(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    return {}
