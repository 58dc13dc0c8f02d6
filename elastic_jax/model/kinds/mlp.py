"""relu² MLP layer kind (pattern char "-")."""
from __future__ import annotations

from ...config import NemotronHConfig
from ...sharding import constrain
from ...widths import prefix_mask
from ..layers import ElasticLayer, dense, relu2
from .base import Param
from .hf_rules import Rule, _t, _t_inv

CHAR = "-"
NAME = "MLP"
HF_LAYER_TYPE = "mlp"     # its `layers_block_type` entry in an HF config.json
AXES = ("ffn",)


# ----------------------------------------------------------------------- declarations
def dims(cfg: NemotronHConfig, hidden, w: dict, active: bool = False) -> dict:
    return {"embed": hidden, "mlp": w["ffn"]}


def params(cfg: NemotronHConfig) -> dict[str, Param]:
    return {"up_proj": Param(("embed", "mlp")), "down_proj": Param(("mlp", "embed"), "normal_out")}


def select(cfg: NemotronHConfig, sizes: dict, sel: dict) -> dict:
    return {"mlp": sel["ffn"]}


def masks(cfg: NemotronHConfig, sw, k, mixer) -> ElasticLayer:
    c, p = sw.ffn[0][k], sw.ffn[1][k]
    return ElasticLayer(ffn_mask=prefix_mask(mixer["up_proj"].shape[1], c, p), premask=sw.mask_form == "official")


def init_cache(cfg: NemotronHConfig, sizes: dict, batch: int, max_len: int, dtype):
    return None


def cache_elems(cfg: NemotronHConfig, sizes: dict, batch, context) -> dict:
    return {}


# -------------------------------------------------------------------------------- HF keys
def hf_dims(cfg: NemotronHConfig, k: int) -> dict:
    return dict(I=cfg.ffn_at(k))


HF_RULES = (
    Rule("mixer.up_proj.weight", "-", ("up_proj",), lambda d: (d.I, d.D), _t, _t_inv),
    Rule("mixer.down_proj.weight", "-", ("down_proj",), lambda d: (d.D, d.I), _t, _t_inv),
)


# ------------------------------------------------------------------------------ MLP
def mlp_mixer(p, x_BLD, cfg, el: ElasticLayer | None, ctx, cache):
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
