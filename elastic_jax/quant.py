"""Simulated FP8 / NVFP4 quantization for quantization-aware distillation (spec §10).

`quantize_dequantize(x, fmt, axis=-1)` returns x rounded to the format and scaled back (the
"fake quant" of QAD), with a straight-through gradient (identity), so a student trained through it
learns weights that survive real quantization.
  fp8   : E4M3 values (max 448) with one per-tensor FP32 scale  s = amax / 448.
  nvfp4 : E2M1 values (max 6) in blocks of 16 along `axis`, each block with an E4M3 scale
          (block amax / 6, itself quantized against a per-tensor FP32 scale = amax / (6 · 448)).
Nested checkpoints stay sliceable when the elastic widths along the reduction axis are multiples
of the 16-element block (validated by ElasticConfig when quantization is on).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16
FORMATS = ("fp8", "nvfp4")
# numpy, not jnp: importing the package must not initialise the XLA backend (jax.distributed)
_E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _to_e4m3(x):
    return x.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def _round_e2m1(x):
    """Round |x| <= 6 to the nearest E2M1 value (ties to the even grid point)."""
    mag = jnp.abs(x)
    grid = jnp.asarray(_E2M1_GRID)
    idx = jnp.argmin(jnp.abs(mag[..., None] - grid), axis=-1)
    return jnp.sign(x) * grid[idx]


def _fp8_qdq(x32):
    amax = jnp.max(jnp.abs(x32))
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return _to_e4m3(x32 / scale) * scale


def _nvfp4_qdq(x32, axis):
    x_moved = jnp.moveaxis(x32, axis, -1)
    n = x_moved.shape[-1]
    if n % NVFP4_BLOCK:
        raise ValueError(f"nvfp4: the quantized axis has {n} elements; it must be a multiple of the "
                         f"block size {NVFP4_BLOCK}")
    blocks = x_moved.reshape(*x_moved.shape[:-1], n // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = jnp.max(jnp.abs(x32))
    tensor_scale = jnp.where(amax > 0, amax / (FP4_MAX * FP8_MAX), 1.0)
    block_amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    block_scale = _to_e4m3(block_amax / FP4_MAX / tensor_scale) * tensor_scale
    safe = jnp.where(block_scale > 0, block_scale, 1.0)
    q = _round_e2m1(jnp.clip(blocks / safe, -FP4_MAX, FP4_MAX)) * jnp.where(block_scale > 0, block_scale, 0.0)
    return jnp.moveaxis(q.reshape(x_moved.shape), -1, axis)


def quantize_dequantize(x, fmt: str, axis: int = -1):
    """Fake-quantize `x` to `fmt` ("fp8" | "nvfp4") and back, straight-through gradient."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {FORMATS}, got {fmt!r}")
    x32 = x.astype(jnp.float32)
    q = _fp8_qdq(x32) if fmt == "fp8" else _nvfp4_qdq(x32, axis)
    q = x32 + jax.lax.stop_gradient(q - x32)
    return q.astype(x.dtype)


def quantize_params(params, fmt: str):
    """Fake-quantize every projection matrix of a params pytree along its reduction (input) axis.

    Kept in full precision, as in the released FP8 / NVFP4 checkpoints: the embedding table, the
    depthwise conv kernels and every vector (norms, biases, A_log, D, dt_bias, correction bias).
    """
    def qdq(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim < 2 or "embed" in name or "conv_" in name:
            return x
        axis = x.ndim - 2  # JAX [..., in, out] layout: the reduction axis is the second to last
        if fmt == "nvfp4" and x.shape[axis] % NVFP4_BLOCK:
            raise ValueError(f"nvfp4: {name} has reduction size {x.shape[axis]}, not a multiple of the "
                             f"block size {NVFP4_BLOCK}")
        return quantize_dequantize(x, fmt, axis=axis)
    return jax.tree_util.tree_map_with_path(qdq, params)
