"""Zero-shot extraction (METHOD §8): keep the prefix of every importance-sorted axis.

`slice_params(params, cfg, widths)` returns a standalone smaller model whose logits equal the
masked parent's at those widths; `embed_params` is its transpose (a smaller model placed back into
the parent's shapes, zeros elsewhere); `param_count` is the exact size of that model.
"""
from __future__ import annotations

import jax
import numpy as np
from einops import rearrange

from ..config import NemotronHConfig
from ..model.cost import CostModel
from ..model.kinds import kind_of, layer_sizes
from ..model.kinds.base import take_dims
from ..widths import AXES, Widths, full_size


def group_prefix(total: int, groups: int, keep: int) -> np.ndarray:
    """Indices of the first keep/groups components of each of `groups` group-major blocks
    (`total` and `keep` must divide by `groups`: einops checks the first, this the second)."""
    if keep % groups:
        raise ValueError(f"group_prefix: keeping {keep} of {total} components in {groups} groups: "
                         f"{keep} is not divisible by {groups}")
    blocks = rearrange(np.arange(total, dtype=np.int64), "(g per) -> g per", g=groups)
    return rearrange(blocks[:, :keep // groups], "g k -> (g k)")


def sliced_config(cfg: NemotronHConfig, widths: Widths | None) -> NemotronHConfig:
    """The config of the standalone model that `slice_params` produces."""
    widths = Widths() if widths is None else widths
    widths.validate(cfg)
    keep = widths.layer_mask(cfg)
    pattern = "".join(c for c, k in zip(cfg.pattern, keep) if k)
    if not pattern:
        raise ValueError("Widths.layers drops every layer; a model needs at least one layer")
    kw = {"hidden_size": widths.hidden_size(cfg), "hybrid_override_pattern": pattern}
    for a, spec in AXES.items():
        if not cfg.count(spec.kind):
            continue
        vals = [v for v, i in zip(widths.per_layer(cfg, a), cfg.layer_indices(spec.kind)) if keep[i]]
        if spec.per_layer_field is None:          # one size for the whole model (HF `mamba_head_dim`)
            if len(set(vals)) > 1:
                raise ValueError(f"Widths.{a}={getattr(widths, a)!r}: a sliced model has one {spec.field}, so "
                                 f"every kept '{spec.kind}' layer needs the same number of {spec.unit}")
            if vals:
                kw[spec.field] = vals[0]
            continue
        kw[spec.per_layer_field] = None
        if not vals:
            continue
        if len(set(vals)) == 1:
            kw[spec.field] = vals[0]
        else:
            kw[spec.field] = max(vals)
            kw[spec.per_layer_field] = tuple(vals)
    return cfg.replace(**kw)


def slice_params(params, cfg: NemotronHConfig, widths: Widths | None):
    """(sub_cfg, sub_params): real, smaller arrays such that
    forward(sub_params, t, sub_cfg) == forward(params, t, cfg, widths). Every parameter keeps,
    along each named dimension, what its kind's `select` maps the kept prefix of each axis to."""
    widths = Widths() if widths is None else widths
    sub_cfg = sliced_config(cfg, widths)
    d = widths.hidden_size(cfg)
    keep = widths.layer_mask(cfg)
    kinds = cfg.kind_index()
    per = {a: widths.per_layer(cfg, a) for a, spec in AXES.items() if cfg.count(spec.kind)}
    out = {"embed": params["embed"][:, :d], "norm_f": params["norm_f"][:d],
           "lm_head": params["lm_head"][:d], "layers": []}
    for i in range(cfg.num_hidden_layers):
        if not keep[i]:
            continue
        kind, k, lp = kind_of(cfg, i), kinds[i], params["layers"][i]
        sizes = layer_sizes(cfg, i)
        sel = {a: group_prefix(full_size(cfg, a, k), AXES[a].groups(cfg), per[a][k]) for a in kind.AXES}
        idx = dict(kind.select(cfg, sizes, sel), embed=slice(0, d))
        out["layers"].append({"norm": lp["norm"][:d], "mixer": take_dims(lp["mixer"], kind.params(cfg), idx)})
    return sub_cfg, out


def embed_params(sub_params, cfg: NemotronHConfig, widths: Widths | None):
    """Parent-shaped params (`cfg`) holding `sub_params` (a model of `sliced_config(cfg, widths)`)
    where `slice_params` takes them from, zeros elsewhere: `slice_params(embed_params(p, cfg, w), cfg,
    w)[1] == p`, so the masked forward at `widths` runs the smaller model at the parent's shapes (one
    compiled program for models of every size). The transpose of `slice_params`'s gathers, read from
    the same index rules: slicing a tree of flat positions says where each sub element came from."""
    from ..model.params import param_shapes
    widths = Widths() if widths is None else widths
    shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
    if shapes(sub_params) != param_shapes(sliced_config(cfg, widths)):
        raise ValueError(f"embed_params: the params do not have the shapes of the model sliced at {widths}")
    is_shape = lambda x: isinstance(x, tuple)
    positions = jax.tree_util.tree_map(lambda s: np.arange(int(np.prod(s))).reshape(s), param_shapes(cfg),
                                       is_leaf=is_shape)
    source = slice_params(positions, cfg, widths)[1]
    dtype = np.result_type(*jax.tree_util.tree_leaves(sub_params))
    out = jax.tree_util.tree_map(lambda s: np.zeros(int(np.prod(s)), dtype), param_shapes(cfg), is_leaf=is_shape)

    def put(flat, idx, x):
        flat[np.asarray(idx).reshape(-1)] = np.asarray(x).reshape(-1)
    # a layer that depth drops has no counterpart: it stays zeros (the masked forward skips it)
    kept = [i for i, k in enumerate(widths.layer_mask(cfg)) if k]
    for name in ("embed", "norm_f", "lm_head"):
        put(out[name], source[name], sub_params[name])
    for i, src, x in zip(kept, source["layers"], sub_params["layers"]):
        jax.tree_util.tree_map(put, out["layers"][i], src, x)
    return jax.device_put(jax.tree_util.tree_map(lambda f, s: f.reshape(s), out, param_shapes(cfg),
                                                 is_leaf=is_shape))


def param_count(cfg: NemotronHConfig, widths: Widths | None = None, active: bool = False) -> int:
    """Exact parameter count of the (sliced) model. `active`: only `num_experts_per_tok` routed
    experts per MoE layer counted (what one token touches). The one cost model's count
    (`model.cost.CostModel.param_count`)."""
    return CostModel(cfg, widths).param_count(active)
