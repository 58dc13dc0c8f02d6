"""Routed experts per shard under a mesh (expert parallelism), exact and capacity-free.

Runs inside `jax.shard_map` over the context mesh (elastic_jax/sharding.py). Tokens are split by
the `batch` rule, experts by `experts`, the expert FFN width by `expert_mlp`. Routing (group-limited
top-k, correction bias, elastic expert-count weights) is per token, so each device routes its own
tokens exactly as one device would. Then:

  * experts split over mesh axes that also split the tokens (the default: `expert`): every device
    sorts its (token, choice) rows by expert and sends each expert shard its rows with one
    `all_to_all` into a [shards, T_local·k] buffer (room for every row, so nothing is ever dropped:
    exact for any routing), runs the grouped matmul on its local experts, and a second
    `all_to_all` returns the rows;
  * experts split over axes that do not split the tokens: every device runs its local experts on
    the rows routed to them and a `psum` over those axes adds the contributions.

A split expert FFN width (`expert_mlp` -> tensor) gives partial sums, added by a `psum` at the
end. The elastic width mask and the kernel-skipping bound `active_ffn` are taken per shard.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .... import kernels
from ....quant.qweight import QWeight, quantize_activation
from ....sharding import current_rules, mesh_axes_for
from ...layers import relu2
from .routing import MoEMasks, expert_load, over_token_chunks, route, token_chunks

HIGHEST = jax.lax.Precision.HIGHEST


def _linear_index(axes, mesh):
    """This device's index along the product of `axes` (row-major, as PartitionSpec splits)."""
    i = jnp.zeros((), jnp.int32)
    for a in axes:
        i = i * mesh.shape[a] + jax.lax.axis_index(a)
    return i


def _spec(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _local_experts(rows_RD, local_e_R, up_EDI, down_EID, ffn_mask, active_n, impl, precision, down_scale=None,
                   premask=False, act_fmt="fp8"):
    """relu² FFN of each row with its local expert (id E_local = padding row -> zero output), in the
    dtype of the operands (the compute dtype) with f32 accumulation at `precision`; `down_scale`:
    the input scale of a fake-quantized down projection in `act_fmt` (elastic_jax.quant)."""
    E = up_EDI.shape[0]
    order = jnp.argsort(local_e_R)
    group_sizes = jnp.bincount(local_e_R, length=E + 1)[:E].astype(jnp.int32)
    rows = rows_RD[order]
    h = kernels.gmm(rows, up_EDI, group_sizes, active_n=active_n, impl=impl, preferred_element_type=jnp.float32,
                    precision=precision)
    if ffn_mask is not None and premask:     # official soft form: mask before relu²
        h = relu2(h * ffn_mask)
    else:
        h = relu2(h)
        if ffn_mask is not None:
            h = h * ffn_mask
    h = h.astype(down_EID.dtype)
    h = quantize_activation(h, down_scale, act_fmt)
    o = kernels.gmm(h, down_EID, group_sizes, active_k=active_n, impl=impl, preferred_element_type=jnp.float32,
                    precision=precision)
    return jnp.zeros_like(o).at[order].set(o), jnp.max(jnp.abs(h.astype(jnp.float32)))


def routed_experts_sharded(p, x_TD, cfg, el: MoEMasks | None, policy, mesh, valid_T=None):
    """(Σ_k w_k · expert_k(x) [T, D] f32 of the routed experts (no shared expert), per shard;
    [E] f32 tokens routed to each expert, `valid_T` False excluded, as routing.expert_load).
    The expert matmuls run in the policy's compute dtype at its precision (ComputePolicy)."""
    impl = policy.kernel_impl
    rules = current_rules()
    T, D = x_TD.shape
    E, _, I = p["up_proj"].shape
    # fake-quantized experts (QWeight): the per-tensor FP8 input scale of the up projection is
    # elementwise, so it applies to the tokens before dispatch; the down one inside, per shard
    up_q, down_q = (w if isinstance(w, QWeight) else None for w in (p["up_proj"], p["down_proj"]))
    w_up = p["up_proj"] if up_q is None else up_q.w
    w_down = p["down_proj"] if down_q is None else down_q.w
    observing = down_q is not None and down_q.observe is not None
    # as QWeight.quantize_input: calibration (observe) measures the inputs and quantizes nothing;
    # routing always sees the unquantized tokens
    if up_q is not None and up_q.observe is not None:
        up_q.observe(x_TD)              # every token is dispatched k times: same amax as the rows
    up_scale = None if up_q is None or up_q.observe is not None else up_q.input_scale
    down_scale = None if down_q is None or down_q.observe is not None else down_q.input_scale
    act_fmt = next((q.fmt for q in (up_q, down_q) if q is not None), "fp8")
    tok_axes = mesh_axes_for("batch", T, mesh, rules)
    ex_axes = tuple(a for a in mesh_axes_for("experts", E, mesh, rules))
    mlp_axes = tuple(a for a in mesh_axes_for("expert_mlp", I, mesh, rules) if a not in tok_axes + ex_axes)
    a2a_axes = tuple(a for a in ex_axes if a in tok_axes)
    sum_axes = tuple(a for a in ex_axes if a not in tok_axes)
    if a2a_axes and sum_axes:
        raise ValueError(f"expert-parallel MoE: the experts are split over mesh axes {ex_axes}, of which "
                         f"{a2a_axes} also split the {T} tokens and {sum_axes} do not; map `experts` to axes "
                         "that all split the tokens (the `batch` rule) or none of them")
    n_ex = math.prod(mesh.shape[a] for a in ex_axes)
    n_mlp = math.prod(mesh.shape[a] for a in mlp_axes)
    E_loc, I_loc = E // n_ex, I // n_mlp
    Kk = cfg.num_experts_per_tok
    cdt = policy.dtype_for(w_up.dtype)                # expert matmuls: compute dtype, f32 accumulation
    prec = policy.lax_precision(cdt)

    def one_chunk(w, x, valid, up_scale, down_scale, el_loc):
        """(y [t, D] f32 before the reduction over `red`, [E] load on this token shard, amax of the
        down inputs) of t local tokens."""
        gate, bias, up, down = w
        T_loc = x.shape[0]
        idx_TK, w_TK = route({"gate": gate, "e_score_correction_bias": bias}, x, cfg, el_loc)
        # routing counts before dispatch, on this token shard
        load = expert_load(idx_TK, E, valid)
        up, down = up.astype(cdt), down.astype(cdt)
        flat = idx_TK.reshape(-1)
        order = jnp.argsort(flat)
        sorted_e = flat[order]
        rows = x[order // Kk]                                               # [C, D], C = T_loc·k
        if up_scale is not None:
            rows = quantize_activation(rows, up_scale, act_fmt)
        rows = rows.astype(cdt)
        C = rows.shape[0]
        ffn_mask = active_n = None
        premask = el_loc is not None and el_loc.premask
        if el_loc is not None:
            ffn_mask = el_loc.ffn_mask
            off = _linear_index(mlp_axes, mesh) * I_loc
            active_n = jnp.clip(el_loc.active_ffn - off, 0, I_loc).astype(jnp.int32)
        if a2a_axes:
            # rows sorted by expert are sorted by destination shard: slot = rank within that shard
            dest = sorted_e // E_loc
            counts = jnp.bincount(dest, length=n_ex)
            pos = jnp.arange(C) - (jnp.cumsum(counts) - counts)[dest]
            send = jnp.zeros((n_ex, C, D), rows.dtype).at[dest, pos].set(rows)
            send_e = jnp.full((n_ex, C), E_loc, jnp.int32).at[dest, pos].set(sorted_e % E_loc)
            name = _spec(a2a_axes)
            recv = jax.lax.all_to_all(send, name, 0, 0)
            recv_e = jax.lax.all_to_all(send_e, name, 0, 0)
            out, h_amax = _local_experts(recv.reshape(n_ex * C, D), recv_e.reshape(-1), up, down, ffn_mask,
                                         active_n, impl, prec, down_scale, premask, act_fmt)
            back = jax.lax.all_to_all(out.reshape(n_ex, C, D), name, 0, 0)
            out_sorted = back[dest, pos]
        else:
            e0 = _linear_index(sum_axes, mesh) * E_loc
            local = sorted_e - e0
            local = jnp.where((local >= 0) & (local < E_loc), local, E_loc)
            out_sorted, h_amax = _local_experts(rows, local, up, down, ffn_mask, active_n, impl, prec, down_scale,
                                                premask, act_fmt)
        unsorted = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(T_loc, Kk, D)
        return jnp.einsum("tkd,tk->td", unsorted, w_TK, precision=HIGHEST), load, h_amax

    def body(x, gate, bias, up, down, el_loc, valid, up_scale, down_scale):
        # token chunks (ComputePolicy.moe_token_chunk), not while quantizing (scales, calibration)
        plain = up_scale is None and down_scale is None and not observing
        n = token_chunks(x.shape[0], policy.moe_token_chunk) if plain else 1
        w = (gate, bias, up, down)
        if n == 1:
            y, load, h_amax = one_chunk(w, x, valid, up_scale, down_scale, el_loc)
        else:
            y, load = over_token_chunks(lambda w, x, v: one_chunk(w, x, v, None, None, el_loc)[:2], n, w, x, valid)
        load = jax.lax.psum(load, tok_axes) if tok_axes else load        # summed over the token shards
        red = sum_axes + mlp_axes
        y = jax.lax.psum(y, red) if red else y
        if not observing:
            return y, load, jnp.zeros((), jnp.float32)
        return y, load, jax.lax.pmax(jax.lax.stop_gradient(h_amax), tuple(mesh.axis_names))   # calibration only

    el_spec = None
    if el is not None:
        el_spec = MoEMasks(ffn_mask=P(_spec(mlp_axes)), active_ffn=P(), expert_counts=P(), expert_probs=P(),
                           premask=el.premask)
    in_specs = (P(_spec(tok_axes), None), P(), P(),
                P(_spec(ex_axes), None, _spec(mlp_axes)), P(_spec(ex_axes), _spec(mlp_axes), None), el_spec,
                None if valid_T is None else P(_spec(tok_axes)))
    in_specs = in_specs + tuple(None if v is None else P() for v in (up_scale, down_scale))
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P(_spec(tok_axes), None), P(), P()),
                       check_vma=False)
    y, load, h_amax = fn(x_TD, p["gate"], p["e_score_correction_bias"], w_up, w_down, el, valid_T, up_scale,
                         down_scale)
    if observing:                     # calibration: amax of the down inputs
        down_q.observe(h_amax)
    return y, load
