"""MoE layer kind (pattern char "E")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ... import kernels
from ...config import NemotronHConfig
from ...quant.qweight import QWeight, unwrap
from ...sharding import context_mesh
from ...widths import max_count, prefix_mask
from ..layers import HIGHEST, ElasticLayer, dense, relu2
from .base import Param
from .hf_rules import Rule, _t, _t_inv

CHAR = "E"
NAME = "MoE"
HF_LAYER_TYPE = "moe"     # its `layers_block_type` entry in an HF config.json
AXES = ("moe_experts", "moe_ffn")


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


def masks(cfg: NemotronHConfig, sw, k, mixer) -> ElasticLayer:
    c, p = sw.moe_ffn[0][k], sw.moe_ffn[1][k]
    return ElasticLayer(ffn_mask=prefix_mask(mixer["up_proj"].shape[2], c, p), active_ffn=max_count(c, p),
                        expert_counts=sw.moe_experts[0][k], expert_probs=sw.moe_experts[1][k],
                        premask=sw.mask_form == "official")


def init_cache(cfg: NemotronHConfig, sizes: dict, batch: int, max_len: int, dtype):
    return None


def cache_elems(cfg: NemotronHConfig, sizes: dict, batch, context) -> dict:
    return {}


# -------------------------------------------------------------------------------- HF keys
def hf_dims(cfg: NemotronHConfig, k: int) -> dict:
    return dict(E=cfg.moe_experts_at(k), Ie=cfg.moe_ffn_at(k), Is=cfg.moe_shared_expert_intermediate_size)


# sigmoid router (f32) + per-expert (Hub) or stacked relu² experts + shared expert
HF_RULES = (
    Rule("mixer.gate.weight", "E", ("gate",), lambda d: (d.E, d.D), _t, _t_inv, f32=True),
    Rule("mixer.gate.e_score_correction_bias", "E", ("e_score_correction_bias",), lambda d: (d.E,), f32=True),
    Rule("mixer.experts.{j}.up_proj.weight", "E", ("up_proj",), lambda d: (d.Ie, d.D), _t, _t_inv,
         experts="per_expert"),
    Rule("mixer.experts.{j}.down_proj.weight", "E", ("down_proj",), lambda d: (d.D, d.Ie), _t, _t_inv,
         experts="per_expert"),
    Rule("mixer.experts.up_proj", "E", ("up_proj",), lambda d: (d.E, d.Ie, d.D), _t, _t_inv, experts="stacked"),
    Rule("mixer.experts.down_proj", "E", ("down_proj",), lambda d: (d.E, d.D, d.Ie), _t, _t_inv,
         experts="stacked"),
    Rule("mixer.shared_experts.up_proj.weight", "E", ("shared_up",), lambda d: (d.Is, d.D), _t, _t_inv,
         when=lambda d: d.Is > 0),
    Rule("mixer.shared_experts.down_proj.weight", "E", ("shared_down",), lambda d: (d.D, d.Is), _t, _t_inv,
         when=lambda d: d.Is > 0),
)


# ------------------------------------------------------------------------------ MoE
def route(p, x_TD, cfg: NemotronHConfig, el: ElasticLayer | None):
    """Sigmoid router with correction bias, group-limited top-k (DeepSeek-V3 / HF NemotronH).

    Elastic expert count (METHOD §4.3, soft form): option i keeps the first counts_i / n_group experts
    of every group with weight π_i; an expert's routing score is Σ_i w_i (σ(l) + bias) and its gate
    Σ_i w_i σ(l); experts outside every option get -inf and are never chosen.
    Returns (topk_idx [T, k] int32, topk_weight [T, k] f32).
    """
    E = p["gate"].shape[1]
    logits = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), p["gate"].astype(jnp.float32), precision=HIGHEST)
    scores = jax.nn.sigmoid(logits)
    bias = p["e_score_correction_bias"].astype(jnp.float32)
    per_group = E // cfg.n_group
    if el is None:
        choice = scores + bias
        gate_scores = scores
        active = None
    else:
        within = jnp.arange(E) % per_group
        keep = within[None, :] < (el.expert_counts[:, None] // cfg.n_group)          # [n_opts, E]
        weight = jnp.sum(el.expert_probs[:, None] * keep, axis=0)                     # [E]
        active = jnp.any(keep & (el.expert_probs[:, None] > 0), axis=0)
        # the official hard mode scales the logits by the option probability before the sigmoid, so
        # the expert-count head gets a gradient the top-k renormalization cannot cancel; w/sg(w) is
        # that scale with value exactly 1 (the forward is unchanged in every mode)
        safe_w = jnp.where(weight > 0, weight, 1.0)
        scores = jax.nn.sigmoid(logits * (safe_w / jax.lax.stop_gradient(safe_w)))
        gate_scores = scores * weight
        choice = jnp.where(active, (scores + bias) * weight, -jnp.inf)
    T = x_TD.shape[0]
    if cfg.n_group > 1:
        grouped = choice.reshape(T, cfg.n_group, per_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)                 # [T, n_group]
        _, gidx = jax.lax.top_k(group_scores, cfg.topk_group)
        gmask = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], gidx].set(True)
        # experts of unselected groups can never be picked (HF: masked_fill(-inf))
        choice = jnp.where(jnp.repeat(gmask, per_group, axis=1), choice, -jnp.inf)
        if active is not None:
            choice = jnp.where(active, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    w = jnp.take_along_axis(gate_scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), w * cfg.routed_scaling_factor


def token_chunks(T: int, chunk: int | None) -> int:
    """How many token chunks `ComputePolicy.moe_token_chunk` asks for: 1 when it is None or
    T <= chunk, else ceil(T / chunk) (`over_token_chunks` pads the tokens to a multiple of it)."""
    if chunk is None or T <= chunk:
        return 1
    return -(-T // chunk)


def over_token_chunks(fn, n: int, weights, x_TD, valid_T=None):
    """fn(weights, x [t, D], valid [t] | None) -> (y [t, ...], load [E]) run over `n` equal chunks of
    the tokens (the last padded with invalid zero rows) under `lax.scan`, each chunk rematerialized (`jax.checkpoint`), so forward and
    backward hold one chunk's dispatch buffers at a time; y concatenated, load summed. Routing and
    the expert FFN are per token (row), so the result equals one call on all tokens. `weights` enter
    the scan in f32, so their gradients accumulate over the chunks in f32 and are rounded once
    (`fn` casts them to the compute dtype)."""
    if n == 1:
        return fn(weights, x_TD, valid_T)
    up = lambda w: w.astype(jnp.float32) if jnp.issubdtype(w.dtype, jnp.floating) else w
    w32 = jax.tree.map(up, weights)
    T = x_TD.shape[0]
    size = -(-T // n)
    pad = n * size - T
    if pad:             # zero rows, marked invalid: routed like any row, dropped, never counted in the loads
        x_TD = jnp.concatenate([x_TD, jnp.zeros((pad,) + x_TD.shape[1:], x_TD.dtype)])
        keep = jnp.ones((T,), bool) if valid_T is None else valid_T.astype(bool)
        valid_T = jnp.concatenate([keep, jnp.zeros((pad,), bool)])
    xs = x_TD.reshape((n, size) + x_TD.shape[1:])
    vs = None if valid_T is None else valid_T.reshape(n, size)
    body = jax.checkpoint(fn)

    def step(_, inp):
        x, v = inp
        return None, body(w32, x, v)

    _, (ys, loads) = jax.lax.scan(step, None, (xs, vs))
    return ys.reshape((n * size,) + ys.shape[2:])[:T], jnp.sum(loads, 0)


def _routed_experts(p, x_TD, cfg: NemotronHConfig, el: ElasticLayer | None, policy, valid_T=None,
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


def moe_mixer(p, x_BLD, cfg: NemotronHConfig, el: ElasticLayer | None, ctx, cache):
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
        from ..expert_parallel import routed_experts_sharded
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


def expert_load(idx_TK, E: int, valid_T=None):
    """[E] f32 (token, choice) pairs routed to each expert, padding tokens excluded; no gradient."""
    T, Kk = idx_TK.shape
    tok_w = jnp.ones((T,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.zeros((E,), jnp.float32).at[idx_TK.reshape(-1)].add(jnp.repeat(tok_w, Kk)))


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
