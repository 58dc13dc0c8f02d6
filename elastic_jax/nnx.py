"""A Flax NNX module around the functional model, for researchers who build in Flax (the `[nnx]`
extra: `pip install "elastic_jax[nnx]"`).

    from flax import nnx
    from elastic_jax.nnx import ElasticLM
    model = ElasticLM(cfg, rngs=nnx.Rngs(0))                 # or ElasticLM.from_params(cfg, params)
    logits = model(tokens, ej.Widths(hidden=48).resolve(cfg))  # == ej.forward(model.to_params(), tokens, cfg, widths)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

Nothing is re-implemented: `__call__` rebuilds the functional parameter tree from the module's
`nnx.Param`s and calls `ej.forward` (METHOD §2: one parent, every nested submodel a width of it).
Each `nnx.Param` carries its logical axis names (`ej.param_axes`: vocab, embed, heads, ...) as
`out_sharding` metadata, so `nnx.get_partition_spec(nnx.state(model))` gives the logical specs
that `elastic_jax.sharding.logical_to_spec` maps onto a mesh; they are not sharded on creation.
The tree layout is the functional one: attributes `embed`, `norm_f`, `lm_head` and `layers[i]`
with `"norm"` and `"mixer"` entries, so `to_params` / `from_params` round-trip exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import NemotronHConfig
from .model import check_params, forward, init_params, param_axes
from .model.policy import ComputePolicy


def _param(value, axes) -> nnx.Param:
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _wrap(tree, axes):
    """Functional subtree -> NNX containers of `nnx.Param`s (dicts -> nnx.Dict, lists -> nnx.List)."""
    if isinstance(tree, dict):
        return nnx.Dict({k: _wrap(v, axes[k]) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return nnx.List([_wrap(v, a) for v, a in zip(tree, axes)])
    return _param(tree, axes)


def _unwrap(node):
    """NNX containers of `nnx.Param`s -> the functional subtree (plain dicts, lists, arrays)."""
    if isinstance(node, nnx.Variable):
        return node.get_value()
    if isinstance(node, (nnx.Dict, dict)):
        return {k: _unwrap(node[k]) for k in node.keys()}
    return [_unwrap(v) for v in node]


class ElasticLM(nnx.Module):
    """The Nemotron-H hybrid as an NNX module: `model(tokens, widths=None)` -> logits f32
    [B, L, vocab] of the nested submodel `widths` (None: the parent). `policy`: the runtime knobs
    (`ej.ComputePolicy`)."""

    def __init__(self, cfg: NemotronHConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None,
                 dtype=jnp.float32, policy: ComputePolicy | None = None):
        if not isinstance(cfg, NemotronHConfig):
            raise TypeError(f"ElasticLM: cfg must be an elastic_jax.NemotronHConfig, got {type(cfg).__name__}")
        if (params is None) == (rngs is None):
            raise ValueError("ElasticLM: give exactly one of rngs= (random HF init) or params= (a functional tree)")
        if params is None:
            params = init_params(cfg, rngs.params(), dtype)
        check_params(params, cfg)
        self.cfg = cfg
        self.policy = policy
        axes = param_axes(cfg)
        self.embed = _param(params["embed"], axes["embed"])
        self.layers = _wrap(list(params["layers"]), axes["layers"])
        self.norm_f = _param(params["norm_f"], axes["norm_f"])
        self.lm_head = _param(params["lm_head"], axes["lm_head"])

    @classmethod
    def from_params(cls, cfg: NemotronHConfig, params: dict, *, policy: ComputePolicy | None = None) -> "ElasticLM":
        """The module holding `params` (a tree of `ej.init_params`' layout, e.g. from `ej.load_hf`)."""
        return cls(cfg, params=params, policy=policy)

    def to_params(self) -> dict:
        """The functional parameter tree (`ej.forward`, `ej.slice_params`, `ej.save_hf` take it)."""
        return {"embed": self.embed.get_value(), "layers": _unwrap(self.layers),
                "norm_f": self.norm_f.get_value(), "lm_head": self.lm_head.get_value()}

    def __call__(self, tokens: jax.Array, widths=None, *, segment_ids=None) -> jax.Array:
        return forward(self.to_params(), tokens, self.cfg, widths, segment_ids=segment_ids, policy=self.policy)


__all__ = ["ElasticLM"]
