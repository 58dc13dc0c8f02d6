"""The MoE kind's routing pieces, shared by its one-device mixer (`__init__.py`) and the
expert-parallel path (`expert_parallel.py`): the masks record, the sigmoid group-limited router,
the per-expert load, the token chunking and the importance statistics of the routing."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ....config import NemotronHConfig
from ...layers import HIGHEST
from ..base import masks_record, static


@masks_record
class MoEMasks:
    """One MoE layer's masks: [Ie] routed-expert channels, the union of the active expert widths
    (kernel skipping), the expert-count options and their probabilities [n_opts]; `premask`: the
    official soft form."""

    ffn_mask: object = None
    active_ffn: object = None
    expert_counts: object = None
    expert_probs: object = None
    premask: bool = static(False)



def route(p, x_TD, cfg: NemotronHConfig, el: MoEMasks | None):
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


def expert_load(idx_TK, E: int, valid_T=None):
    """[E] f32 (token, choice) pairs routed to each expert, padding tokens excluded; no gradient."""
    T, Kk = idx_TK.shape
    tok_w = jnp.ones((T,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.zeros((E,), jnp.float32).at[idx_TK.reshape(-1)].add(jnp.repeat(tok_w, Kk)))


def moe_stats(it: dict, L: int, valid, routed_scaling_factor: float):
    """REAP sums (Σ g·‖f‖ and routed-token counts per expert) and the expert-width statistic, from
    the MoE mixer's intermediates (its rows sorted by expert)."""
    idx, w, order = it["route_idx"], it["route_weight"], it["expert_order"]      # [T, k], [T, k], [T·k]
    h, o = it["expert_act"], it["expert_out"]                                     # [T·k, Ie], [T·k, D]
    T, k = idx.shape
    E = it["expert_load"].shape[0]
    B = T // L
    flat = idx.reshape(-1)
    tok_valid = jnp.ones((T,), jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    gate = (w / routed_scaling_factor).reshape(-1)[order]                        # top-k renormalized g_j
    rv = tok_valid[order // k]
    expert = flat[order]
    sal = jax.ops.segment_sum(gate * jnp.linalg.norm(o, axis=-1) * rv, expert, num_segments=E)
    cnt = jax.ops.segment_sum(rv, expert, num_segments=E)
    # expert width: per sequence, mean over its routed (token, expert) rows of |h|; L2 over sequences
    seq = (order // k) // L
    hsum = jax.ops.segment_sum(jnp.abs(h) * rv[:, None], seq, num_segments=B)
    hcnt = jax.ops.segment_sum(rv, seq, num_segments=B)
    width = jnp.sum(jnp.square(hsum / jnp.maximum(hcnt, 1.0)[:, None]), axis=0)
    return sal, cnt, width
