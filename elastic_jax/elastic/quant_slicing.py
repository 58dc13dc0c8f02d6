"""Slicing a quantization state with its model: the nested FP8 / NVFP4 checkpoint of a budget
keeps the parent's scales (docs/METHOD.md, nested quantization)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..quant.formats import NVFP4_BLOCK
from ..quant.state import QuantizationError, QuantState
from ..widths import Widths
from .slicing import slice_params


def _index_views(shape, axis):
    """Read-only broadcast view [shape] of arange along `axis` (no memory): slices like a weight."""
    ar = np.arange(shape[axis], dtype=np.int64).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return np.broadcast_to(ar, shape)


def slice_quant_state(qs: QuantState, params, cfg, widths) -> QuantState:
    """The quantization state of `slice_params(params, cfg, widths)`: the same scales, per-expert
    scales and NVFP4 block scales restricted to the kept experts / output channels / 16-row blocks.
    Raises `QuantizationError` when a kept reduction range is not whole 16-element blocks (NVFP4)."""
    def views(axis_of):   # params-shaped tree of index views (quantized leaves) or zero-size stand-ins
        out = jax.tree.map(lambda x: np.broadcast_to(np.int8(0), np.shape(x)), params)
        for i, layer in enumerate(qs.layers):
            for k in layer:
                shp = np.shape(params["layers"][i]["mixer"][k])
                ax = axis_of(len(shp))
                if ax is not None:
                    out["layers"][i]["mixer"][k] = _index_views(shp, ax)
        return out

    _, rows = slice_params(views(lambda nd: nd - 2), cfg, widths)
    _, cols = slice_params(views(lambda nd: nd - 1), cfg, widths)
    _, exps = slice_params(views(lambda nd: 0 if nd == 3 else None), cfg, widths)
    kept = _kept_layers(cfg, widths)
    layers = []
    for new_i, i in enumerate(kept):
        entry = {}
        for k, e in qs.layers[i].items():
            r = np.asarray(rows["layers"][new_i]["mixer"][k])
            c = np.asarray(cols["layers"][new_i]["mixer"][k])
            r_idx = r[(0,) * (r.ndim - 2)][:, 0]
            c_idx = c[(0,) * (c.ndim - 2)][0]
            ne = {}
            x_idx = None
            if r.ndim == 3:
                x_idx = np.asarray(exps["layers"][new_i]["mixer"][k])[:, 0, 0]
            s = jnp.asarray(e["scale"])
            ne["scale"] = s[x_idx] if (x_idx is not None and s.ndim == 1) else s
            if "input_scale" in e:
                ne["input_scale"] = e["input_scale"]
            if "block_scale" in e:
                blocks = _whole_blocks(r_idx, f"layers.{i}.mixer.{k}")
                b = jnp.asarray(e["block_scale"])
                if x_idx is not None:
                    b = b[x_idx]
                ne["block_scale"] = jnp.take(jnp.take(b, blocks, axis=-2), c_idx, axis=-1)
            entry[k] = ne
        layers.append(entry)
    return QuantState(qs.spec, layers)


def _kept_layers(cfg, widths):
    w = Widths() if widths is None else widths
    return [i for i, k in enumerate(w.layer_mask(cfg)) if k]


def _whole_blocks(r_idx: np.ndarray, name: str) -> np.ndarray:
    """Parent block indices of kept reduction rows that form whole, aligned 16-row blocks."""
    n = len(r_idx)
    blocks = r_idx[::NVFP4_BLOCK] // NVFP4_BLOCK if n else r_idx
    ok = n % NVFP4_BLOCK == 0 and np.array_equal(
        r_idx, (blocks[:, None] * NVFP4_BLOCK + np.arange(NVFP4_BLOCK)[None]).reshape(-1))
    if not ok:
        raise QuantizationError(
            f"nvfp4: {name}: the nested model keeps {n} reduction channels that are not whole 16-element "
            f"blocks of the parent, so its block scales cannot be sliced; use widths whose channel counts "
            f"are multiples of {NVFP4_BLOCK} (ElasticConfig(quantization='nvfp4') enforces this)")
    return blocks
