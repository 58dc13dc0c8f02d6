"""Layers under `lax.scan`: parameters stacked by layer kind, one scanned step per layer.

Nemotron-H patterns are irregular (the 30B-A3B's `MEMEM*EMEMEM*E...`), so there is no repeated
block to scan over. Instead the layers of each kind are stacked (`stack_layers`: per kind, every
leaf gets a leading [n_kind] axis) and `scan_blocks` scans over the layer sequence with
xs = (kind id, index within the kind, layer gate) and the residual stream as the carry; the step
dispatches on the kind (`lax.switch`) and dynamic-indexes that kind's stack. The compiled program
then holds one copy of each kind's block whatever the depth, so compile time is flat in depth.
Under remat each branch of the switch is also rematerialized on its own, so the backward pass of
a step holds one kind's activations, not every kind's (see `scan_blocks`).

The public format stays the per-layer list `params["layers"][i]`; convert at the boundary with
`stack_layers` / `unstack_layers` (one copy of the layer parameters each way). A model whose layers
of one kind have different shapes (a heterogeneous sliced submodel) cannot be stacked:
`unstackable_reason` says why and the decoder falls back to the unrolled loop.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..config import NemotronHConfig


def kinds_of(cfg: NemotronHConfig) -> tuple[str, ...]:
    """The layer kinds present in the pattern, in order of first appearance."""
    return tuple(dict.fromkeys(cfg.pattern))


def is_stacked(layers) -> bool:
    """True for the stacked form ({kind char: stacked tree}), False for the per-layer list."""
    return isinstance(layers, dict)


def unstackable_reason(layers, cfg: NemotronHConfig) -> str | None:
    """None if the per-layer list can be stacked by kind, else why not (the first layer whose
    parameter shapes differ from the first layer of its kind)."""
    if is_stacked(layers):
        return None
    first: dict[str, tuple[int, list]] = {}
    for i, c in enumerate(cfg.pattern):
        leaves, tree = jax.tree_util.tree_flatten(layers[i])
        sig = (tree, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves])
        if c not in first:
            first[c] = (i, sig)
        elif first[c][1][0] != tree:
            return (f"layer {i} ('{c}') has a parameter structure different from layer {first[c][0]} of the same "
                    f"kind (e.g. quantized `QWeight` projections in one, high-precision ones in the other: "
                    f"QuantSpec.exclude); layers of one kind must share a structure to be stacked")
        elif first[c][1] != sig:
            return (f"layer {i} ('{c}') has parameter shapes different from layer {first[c][0]} of the same "
                    f"kind (a heterogeneous sliced model); layers of one kind must share shapes to be stacked")
    return None


def stack_layers(params: dict, cfg: NemotronHConfig) -> dict:
    """params with `layers` as {kind char: tree with a leading [n_kind] axis on every leaf}, the
    layers of each kind in pattern order. Raises ValueError if they cannot be stacked."""
    layers = params["layers"]
    if is_stacked(layers):
        return params
    reason = unstackable_reason(layers, cfg)
    if reason is not None:
        raise ValueError(f"stack_layers: {reason}")
    stacked = {c: jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in cfg.layer_indices(c)])
               for c in kinds_of(cfg)}
    return {**params, "layers": stacked}


def unstack_layers(params: dict, cfg: NemotronHConfig) -> dict:
    """Inverse of `stack_layers`: the public per-layer list `params["layers"][i]`."""
    layers = params["layers"]
    if not is_stacked(layers):
        return params
    k_of = cfg.kind_index()
    out = [jax.tree.map(lambda a, k=k_of[i]: a[k], layers[c]) for i, c in enumerate(cfg.pattern)]
    return {**params, "layers": out}


def scan_blocks(h, stacks: dict, cfg: NemotronHConfig, gates, apply: dict[str, Callable], *,
                remat_policy=None, remat: bool = False, return_hidden: bool = False,
                boundary: Callable | None = None, aux_zeros=None):
    """h_{l+1} = h_l + gate_l · apply[kind_l](h_l, stack[kind_l][k_l], k_l) over the pattern, scanned.

    stacks: {kind char: stacked layer tree}; gates: [n_layers] float or None (all layers on);
    apply[c](h, layer_params, k) -> (block output, aux) for the k-th layer of kind c (k is traced).
    aux_zeros: None (aux ignored), or the per-layer auxiliary output's zeros (e.g. {"expert_load":
    [E] f32}); a kind whose aux is None returns these zeros, so every `lax.switch` branch has one
    structure, and the scan stacks it to [n_layers, ...].
    remat: wrap the step in `jax.checkpoint(policy=remat_policy)` (and, with several kinds, each
    kind's branch too). boundary(h): applied to the residual stream after every block (the sharding
    constraint, as the unrolled loop does).
    Returns (h, per-layer residual streams [n_layers, ...] or None, stacked aux or None).
    """
    kinds = kinds_of(cfg)
    kind_id = jnp.asarray([kinds.index(c) for c in cfg.pattern], jnp.int32)
    within = jnp.asarray(cfg.kind_index(), jnp.int32)

    # Several kinds: each branch of the kind switch is rematerialized on its own, inside the
    # rematerialized step. Linearizing a `lax.switch` saves the union of every branch's residuals
    # (zeros for the branches not taken), so without this the recomputed step holds the internal
    # activations of all kinds at once; with it a branch's residuals are its inputs and only the
    # branch taken recomputes its internals in the backward pass.
    branch_remat = remat and len(kinds_of(cfg)) > 1

    def branch(c):
        fn = jax.checkpoint(apply[c], policy=remat_policy, prevent_cse=False) if branch_remat else apply[c]

        def run(h, k):
            lp = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), stacks[c])
            out, aux = fn(h, lp, k)
            if aux_zeros is None:
                aux = None
            elif aux is None:
                aux = jax.tree.map(jnp.zeros_like, aux_zeros)
            return out.astype(h.dtype), aux
        return run

    branches = [branch(c) for c in kinds]

    def step(h, xs):
        kid, k, gate = xs
        out, aux = branches[0](h, k) if len(branches) == 1 else jax.lax.switch(kid, branches, h, k)
        h = h + (out if gate is None else gate.astype(out.dtype) * out).astype(h.dtype)
        if boundary is not None:
            h = boundary(h)
        return h, (h if return_hidden else None, aux)

    if remat:
        step = jax.checkpoint(step, policy=remat_policy, prevent_cse=False)
    h, (hiddens, auxs) = jax.lax.scan(step, h, (kind_id, within, gates))
    return h, hiddens, auxs
