"""MoE layer kind (pattern char "E"): declarations and the one-device mixer; the routing pieces
in `routing.py`, the expert-parallel path in `expert_parallel.py`."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .... import kernels
from ....config import NemotronHConfig
from ....quant.qweight import QWeight, unwrap
from ....sharding import context_mesh
from ....registry import Axis
from ....widths import max_count, prefix_mask
from ...layers import HIGHEST, dense, relu2
from ..base import Param
from ..hf_rules import Rule, _t, _t_inv
from .expert_parallel import routed_experts_sharded
from .routing import MoEMasks, expert_load, moe_stats, over_token_chunks, route, token_chunks

CHAR = "E"
NAME = "MoE"
KEY = "moe"               # its name in config formats (a puzzle `block_type`)
HF_LAYER_TYPE = "moe"     # its `layers_block_type` entry in an HF config.json


def _check_experts(cfg: NemotronHConfig, x: int, words: str) -> None:
    """Routing needs: >= top-k experts, >= 2 per group under group-limited routing, enough in the
    `topk_group` groups for the top-k."""
    if x < cfg.num_experts_per_tok:
        raise ValueError(f"{words}: {x} must be >= num_experts_per_tok={cfg.num_experts_per_tok}")
    per_group = x // cfg.n_group
    if cfg.n_group > 1 and per_group < 2:
        raise ValueError(f"{words}: group-limited routing needs >= 2 experts per group (n_group={cfg.n_group})")
    if per_group * cfg.topk_group < cfg.num_experts_per_tok:
        raise ValueError(f"{words}: {per_group} experts per group x topk_group={cfg.topk_group} < "
                         f"num_experts_per_tok={cfg.num_experts_per_tok}")


AXES = {"moe_experts": Axis(CHAR, "n_routed_experts", "moe_experts_per_layer", "experts", "n_group",
                            "routing groups", check=_check_experts, option_field="moe_expert_options"),
        "moe_ffn": Axis(CHAR, "moe_intermediate_size", "moe_ffn_per_layer", "channels",
                        option_field="moe_ffn_options", unit_width=lambda cfg: 1)}     # expert down_proj rows
# auxiliary outputs (the mixer's second output outside decoding; `decoder.final_hidden`): the
# tokens routed to each expert, for the aux-loss-free balancing update (train/balance.py).
# name -> zeros of one layer's row, from the (stacked or per-layer) mixer parameters
AUX_OUTPUTS = {"expert_load": lambda mixer: jnp.zeros(mixer["gate"].shape[-1:], jnp.float32)}
# quantization (METHOD §10): vLLM's FusedMoE quantizes every routed expert's up and down together
SAME_PRECISION = (("up_proj", "down_proj"),)


# ----------------------------------------------------------------------- declarations
def dims(cfg: NemotronHConfig, hidden, w: dict, active: bool = False) -> dict:
    """`experts_router` = E (router columns), `experts` = the stacked expert axis (E, or the
    `num_experts_per_tok` one token touches when `active`), `expert_mlp` = Ie, `shared_mlp` = Is."""
    E = w["moe_experts"]
    return {"embed": hidden, "experts_router": E, "experts": cfg.num_experts_per_tok if active else E,
            "expert_mlp": w["moe_ffn"], "shared_mlp": cfg.moe_shared_expert_intermediate_size}


def params(cfg: NemotronHConfig) -> dict[str, Param]:
    """Sigmoid router (its correction bias f32), stacked routed experts, the shared expert when
    moe_shared_expert_intermediate_size > 0."""
    decls = {"gate": Param(("embed", "experts_router")),
             "e_score_correction_bias": Param(("experts_router",), "zeros", f32=True),
             "up_proj": Param(("experts", "embed", "expert_mlp")),
             "down_proj": Param(("experts", "expert_mlp", "embed"), "normal_out")}
    if cfg.moe_shared_expert_intermediate_size:
        decls.update(shared_up=Param(("embed", "shared_mlp")), shared_down=Param(("shared_mlp", "embed"), "normal_out"))
    return decls


def select(cfg: NemotronHConfig, sizes: dict, sel: dict) -> dict:
    """Experts (within routing groups) and the routed-expert width (one order for all experts);
    the shared expert is not elastic."""
    ex = sel["moe_experts"]
    return {"experts_router": ex, "experts": ex, "expert_mlp": sel["moe_ffn"]}


def masks(cfg: NemotronHConfig, sw, k, mixer) -> MoEMasks:
    c, p = sw.moe_ffn[0][k], sw.moe_ffn[1][k]
    return MoEMasks(ffn_mask=prefix_mask(mixer["up_proj"].shape[2], c, p), active_ffn=max_count(c, p),
                        expert_counts=sw.moe_experts[0][k], expert_probs=sw.moe_experts[1][k],
                        premask=sw.mask_form == "official")


def init_cache(cfg: NemotronHConfig, sizes: dict, batch: int, max_len: int, dtype):
    return None


def cache_elems(cfg: NemotronHConfig, sizes: dict, batch, context) -> dict:
    return {}


# ---------------------------------------------------------------- importance (METHOD §3.2)
def importance_stats(it: dict, cfg: NemotronHConfig, valid, length: int) -> dict:
    """Additive statistics of one calibration batch from the mixer's intermediates: REAP sums
    (Σ g·‖f‖ and routed-token counts per expert) and the expert-width statistic."""
    sal, cnt, width = moe_stats(it, length, valid, cfg.routed_scaling_factor)
    return {"saliency": sal, "count": cnt, "width": width}


def importance_scores(st: dict, cfg: NemotronHConfig, **_) -> dict:
    """Experts: REAP (mean over routed tokens of g·‖f‖); expert channels: L2 of the per-sequence means."""
    sal, cnt = np.asarray(st["saliency"], np.float64), np.asarray(st["count"], np.float64)
    return {"moe_experts": sal / np.maximum(cnt, 1.0),
            "moe_ffn": np.sqrt(np.asarray(st["width"], np.float64))}


# -------------------------------------------------------------------------------- HF keys
def hf_dims(cfg: NemotronHConfig, k: int) -> dict:
    return dict(E=cfg.moe_experts_at(k), Ie=cfg.moe_ffn_at(k), Is=cfg.moe_shared_expert_intermediate_size)


# sigmoid router (f32) + per-expert (Hub) or stacked relu² experts + shared expert
HF_RULES = (
    Rule("mixer.gate.weight", CHAR, ("gate",), lambda d: (d.E, d.D), _t, _t_inv, f32=True, linear=True),
    Rule("mixer.gate.e_score_correction_bias", CHAR, ("e_score_correction_bias",), lambda d: (d.E,), f32=True),
    Rule("mixer.experts.{j}.up_proj.weight", CHAR, ("up_proj",), lambda d: (d.Ie, d.D), _t, _t_inv,
         experts="per_expert", linear=True),
    Rule("mixer.experts.{j}.down_proj.weight", CHAR, ("down_proj",), lambda d: (d.D, d.Ie), _t, _t_inv,
         experts="per_expert", linear=True),
    Rule("mixer.experts.up_proj", CHAR, ("up_proj",), lambda d: (d.E, d.Ie, d.D), _t, _t_inv, experts="stacked",
         linear=True),
    Rule("mixer.experts.down_proj", CHAR, ("down_proj",), lambda d: (d.E, d.D, d.Ie), _t, _t_inv,
         experts="stacked", linear=True),
    Rule("mixer.shared_experts.up_proj.weight", CHAR, ("shared_up",), lambda d: (d.Is, d.D), _t, _t_inv,
         when=lambda d: d.Is > 0, linear=True),
    Rule("mixer.shared_experts.down_proj.weight", CHAR, ("shared_down",), lambda d: (d.D, d.Is), _t, _t_inv,
         when=lambda d: d.Is > 0, linear=True),
)


# ------------------------------------------------------------------------------ MoE
def _routed_experts(p, x_TD, cfg: NemotronHConfig, el: MoEMasks | None, policy, valid_T=None,
                    collect: bool = False):
    """(Σ_k w_k · expert_k(x) [T, D] f32 (no shared expert), [E] f32 load, intermediates or None) on
    one device: sort by expert + grouped matmul."""
    idx_TK, w_TK = route(p, x_TD, cfg, el)
    T, Kk = idx_TK.shape
    E = p["gate"].shape[1]
    flat = idx_TK.reshape(-1)
    order = jnp.argsort(flat)
    rows = x_TD[order // Kk]                                                      # [T·k, D] sorted by expert
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    active_n = None if el is None else el.active_ffn
    rows, w_up = unwrap(rows, p["up_proj"])
    cdt = policy.dtype_for(w_up.dtype)                # expert matmuls: compute dtype, f32 accumulation
    prec = policy.lax_precision(cdt)
    h = kernels.gmm(rows.astype(cdt), w_up.astype(cdt), group_sizes, active_n=active_n,
                    impl=policy.kernel_impl, preferred_element_type=jnp.float32, precision=prec)
    if el is not None and el.premask:     # official soft form: mask before relu²
        h = relu2(h * el.ffn_mask)
    else:
        h = relu2(h)
        if el is not None:
            h = h * el.ffn_mask
    act = h
    h, w_down = unwrap(h.astype(cdt), p["down_proj"])
    o = kernels.gmm(h.astype(cdt), w_down.astype(cdt), group_sizes, active_k=active_n,
                    impl=policy.kernel_impl, preferred_element_type=jnp.float32, precision=prec)
    unsorted = jnp.zeros_like(o).at[order].set(o).reshape(T, Kk, o.shape[-1])
    y = jnp.einsum("tkd,tk->td", unsorted, w_TK, precision=HIGHEST)
    extra = None
    if collect:
        extra = dict(route_idx=idx_TK, route_weight=w_TK, expert_order=order, expert_act=act, expert_out=o)
    return y, expert_load(idx_TK, E, valid_T), extra


def moe_mixer(p, x_BLD, cfg: NemotronHConfig, el: MoEMasks | None, ctx, cache):
    """Routed relu² experts dispatched by sort + grouped matmul, plus the shared expert. Under a
    mesh in context the routed experts run per shard (expert_parallel.py). With
    `ctx.policy.moe_token_chunk` the routed experts run over token chunks (`over_token_chunks`).
    Second output: None when decoding, else {"expert_load": [E] f32 tokens routed to each expert
    (padding excluded)} for the aux-loss-free balancing update (train/balance.py); with
    `ctx.collect` also the intermediates: "route_idx" / "route_weight" [T, k] (the top-k choices and
    their gates), "expert_order" [T·k] (the (token, choice) pair of each expert-sorted row),
    "expert_act" [T·k, Ie] (relu² of the up projection, f32) and "expert_out" [T·k, D] (f32)."""
    B, L, D = x_BLD.shape
    x_TD = x_BLD.reshape(B * L, D)
    valid_T = None if ctx.decoding or ctx.valid is None else ctx.valid.reshape(B * L)
    mesh = context_mesh()
    if mesh is not None and not ctx.collect:
        y, load = routed_experts_sharded(p, x_TD, cfg, el, ctx.policy, mesh, valid_T)
        aux = None if ctx.decoding else {"expert_load": load}
        return _add_shared_expert(p, x_TD, y, ctx.policy).reshape(B, L, D).astype(x_BLD.dtype), aux
    quantized = any(isinstance(p[k], QWeight) for k in ("up_proj", "down_proj"))
    n = 1 if ctx.collect or quantized else token_chunks(B * L, ctx.policy.moe_token_chunk)
    if n == 1:
        y, load, extra = _routed_experts(p, x_TD, cfg, el, ctx.policy, valid_T, collect=ctx.collect)
    else:
        routed = {k: p[k] for k in ("gate", "e_score_correction_bias", "up_proj", "down_proj")}
        y, load = over_token_chunks(lambda w, x, v: _routed_experts(w, x, cfg, el, ctx.policy, v)[:2],
                                    n, routed, x_TD, valid_T)
        extra = None
    aux = None if ctx.decoding else {"expert_load": load}
    if ctx.collect:
        aux.update(extra)
    return _add_shared_expert(p, x_TD, y, ctx.policy).reshape(B, L, D).astype(x_BLD.dtype), aux


def _add_shared_expert(p, x_TD, y_TD, policy):
    if "shared_up" in p:
        y_TD = y_TD + dense(relu2(dense(x_TD, p["shared_up"], policy)), p["shared_down"], policy).astype(jnp.float32)
    return y_TD


apply = moe_mixer


# ------------------------------------------------------------------------ cost (model/cost.py)
def flops(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    """Forward FLOPs per token: the router (D·E), the top-k routed experts' up and down
    projections and the shared expert, 2 per multiply-add; the gate-weighted sum of the k expert
    outputs (2·k·D)."""
    D, E = sizes["embed"], sizes["experts_router"]
    k = cfg.num_experts_per_tok
    return {"weights": 2.0 * D * E + 4.0 * k * D * sizes["expert_mlp"] + 4.0 * D * sizes["shared_mlp"],
            "mixing": 2.0 * k * D}


def weights_read(cfg: NemotronHConfig, sizes: dict, mode) -> float:
    """Router and shared expert, and the routed experts the call's tokens can hit: at most
    min(E, tokens x top-k) (every expert once a batch saturates them)."""
    D, E = sizes["embed"], sizes["experts_router"]
    hit = min(E, mode.tokens * cfg.num_experts_per_tok)
    return float(D * E + E + 2 * D * sizes["shared_mlp"] + hit * 2 * D * sizes["expert_mlp"])


def state_traffic(cfg: NemotronHConfig, sizes: dict, mode) -> dict:
    return {}
