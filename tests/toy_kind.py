"""A test-only layer kind with its own elastic axis, written as a newcomer would write
`elastic_jax/model/kinds/<kind>.py`: a gated ReLU unit (pattern char "T"),
y = (relu(x W_gate) ⊙ (x W_up) ⊙ m) W_down, elastic in its units (axis `toy_units`).

Its config field (`toy_units`) lives on `ToyConfig`, the config-parsing side of adding a kind.
`tests/test_toy_kind.py` registers it (`kinds.register`) in a subprocess and checks forward,
masked == sliced, its cost declarations and its HF rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from elastic_jax.config import NemotronHConfig
from elastic_jax.model.kinds.base import Param, masks_record
from elastic_jax.model.kinds.hf_rules import Rule, _t, _t_inv
from elastic_jax.model.layers import dense
from elastic_jax.registry import Axis
from elastic_jax.widths import prefix_mask


@dataclass(frozen=True)
class ToyConfig(NemotronHConfig):
    """The config field of the toy kind's width (config parsing: a new kind's sizes)."""

    toy_units: int = 48


CHAR = "T"
NAME = "toy gated unit"
KEY = "toy"
HF_LAYER_TYPE = "toy"
AXES = {"toy_units": Axis(CHAR, "toy_units", None, "units")}


@masks_record
class ToyMasks:
    unit_mask: object = None


def dims(cfg, hidden, w: dict, active: bool = False) -> dict:
    return {"embed": hidden, "mlp": w["toy_units"]}


def params(cfg) -> dict:
    return {"gate_proj": Param(("embed", "mlp")), "up_proj": Param(("embed", "mlp")),
            "down_proj": Param(("mlp", "embed"), "normal_out")}


def select(cfg, sizes: dict, sel: dict) -> dict:
    return {"mlp": sel["toy_units"]}


def masks(cfg, sw, k, mixer) -> ToyMasks:
    c, p = sw.toy_units[0][k], sw.toy_units[1][k]
    return ToyMasks(unit_mask=prefix_mask(mixer["up_proj"].shape[1], c, p))


def init_cache(cfg, sizes: dict, batch: int, max_len: int, dtype):
    return None


def cache_elems(cfg, sizes: dict, batch, context) -> dict:
    return {}


def hf_dims(cfg, k: int) -> dict:
    return dict(I=cfg.toy_units)


HF_RULES = (
    Rule("mixer.gate_proj.weight", CHAR, ("gate_proj",), lambda d: (d.I, d.D), _t, _t_inv, linear=True),
    Rule("mixer.up_proj.weight", CHAR, ("up_proj",), lambda d: (d.I, d.D), _t, _t_inv, linear=True),
    Rule("mixer.down_proj.weight", CHAR, ("down_proj",), lambda d: (d.D, d.I), _t, _t_inv, linear=True),
)


# ------------------------------------------------------------------------ cost (model/cost.py)
def flops(cfg, sizes: dict, mode) -> dict:
    """Forward FLOPs per token: 2 x the three projections' weights."""
    return {"weights": 2.0 * 3 * sizes["embed"] * sizes["mlp"]}


def weights_read(cfg, sizes: dict, mode) -> float:
    return float(3 * sizes["embed"] * sizes["mlp"])


def state_traffic(cfg, sizes: dict, mode) -> dict:
    return {}                   # no decode state


def apply(p, x_BLD, cfg, el: ToyMasks | None, ctx, cache):
    h = jax.nn.relu(dense(x_BLD, p["gate_proj"], ctx.policy)) * dense(x_BLD, p["up_proj"], ctx.policy)
    if el is not None:
        h = h * el.unit_mask.astype(h.dtype)
    return dense(h, p["down_proj"], ctx.policy), ({"units": h} if ctx.collect else None)


def reference(p, x, keep: int):
    """Independent numpy-free reference of one toy layer at `keep` units (a plain slice)."""
    g, u, d = p["gate_proj"][:, :keep], p["up_proj"][:, :keep], p["down_proj"][:keep]
    hp = jax.lax.Precision.HIGHEST
    return jnp.dot(jax.nn.relu(jnp.dot(x, g, precision=hp)) * jnp.dot(x, u, precision=hp), d, precision=hp)
