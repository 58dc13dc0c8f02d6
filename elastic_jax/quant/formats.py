"""FP8 / NVFP4 number formats: fake quantization (dynamic or with fixed scales) and packing (METHOD §10).

`quantize_dequantize(x, fmt, axis=-1)` returns x rounded to the format and scaled back (the
"fake quant" of QAD), with a straight-through gradient (identity), so a student trained through it
learns weights that survive real quantization.
  fp8   : E4M3 values (max 448) with one per-tensor FP32 scale  s = amax / 448.
  nvfp4 : E2M1 values (max 6) in blocks of 16 along `axis`, each block with an E4M3 scale
          (block amax / 6, itself quantized against a per-tensor FP32 scale = amax / (6 · 448)).
Nested checkpoints stay sliceable when the elastic widths along the reduction axis are multiples
of the 16-element block (validated by ElasticConfig when quantization is on).

The `*_with_scales` functions quantize with *given* scales (the fixed quantization state of
`elastic_jax.quant.state`), elementwise, so slicing a tensor and its scales commutes with them.
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


# ----------------------------------------------------------------- fixed scales (quantization state)
def _ste(x32, q):
    return x32 + jax.lax.stop_gradient(q - x32)


def fp8_with_scale(x, scale):
    """E4M3 fake quantization with a given scale (broadcastable to x), saturating at ±448·scale."""
    x32 = x.astype(jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    q = _to_e4m3(jnp.clip(x32 / s, -FP8_MAX, FP8_MAX)) * s
    return _ste(x32, q).astype(x.dtype)


def expand_blocks(block_scale, axis: int):
    """[..., n/16, ...] block scales -> [..., n, ...] (each repeated over its 16 elements)."""
    return jnp.repeat(block_scale, NVFP4_BLOCK, axis=axis)


def nvfp4_codes(x32, block_scale, scale2, axis: int = -2):
    """E2M1 values (floats on the grid, |v| <= 6) of x with E4M3 block scales `block_scale` (blocks
    of 16 along `axis`) times the FP32 second-level scale `scale2` (broadcastable)."""
    bs = expand_blocks(block_scale, axis) * scale2
    safe = jnp.where(bs > 0, bs, 1.0)
    return jnp.where(bs > 0, _round_e2m1(jnp.clip(x32 / safe, -FP4_MAX, FP4_MAX)), 0.0), bs


def nvfp4_with_scales(x, block_scale, scale2, axis: int = -2):
    """NVFP4 fake quantization with given block scales (E4M3 values, [.., n/16, ..] along `axis`)
    and second-level scale; straight-through gradient. A zero block scale gives a zero block."""
    x32 = x.astype(jnp.float32)
    codes, bs = nvfp4_codes(x32, block_scale, scale2, axis)
    return _ste(x32, codes * bs).astype(x.dtype)


def nvfp4_scales(x32, axis: int = -2, amax=None):
    """(block scales as E4M3 values [.., n/16, ..], second-level scale) of x, from its amax
    (`amax`: a scalar or, per expert, shaped [E, 1, 1]; default the tensor's)."""
    n = x32.shape[axis]
    if n % NVFP4_BLOCK:
        raise ValueError(f"nvfp4: the quantized axis has {n} elements; it must be a multiple of the "
                         f"block size {NVFP4_BLOCK}")
    amax = jnp.max(jnp.abs(x32)) if amax is None else amax
    scale2 = jnp.where(amax > 0, amax / (FP4_MAX * FP8_MAX), 1.0).astype(jnp.float32)
    shp = list(x32.shape)
    ax = axis % x32.ndim
    shp[ax:ax + 1] = [n // NVFP4_BLOCK, NVFP4_BLOCK]
    block_amax = jnp.max(jnp.abs(x32.reshape(shp)), axis=ax + 1)
    return _to_e4m3(block_amax / FP4_MAX / scale2), scale2


# ------------------------------------------------------------------------------------ packing
def e2m1_to_nibbles(codes) -> np.ndarray:
    """E2M1 values (on the grid) -> 4-bit codes: sign bit 3, magnitude index 0..7 (0, .5, 1, 1.5, 2, 3, 4, 6)."""
    v = np.asarray(codes, np.float32)
    mag = np.argmin(np.abs(np.abs(v)[..., None] - _E2M1_GRID), axis=-1).astype(np.uint8)
    return mag | (np.signbit(v) & (mag > 0)).astype(np.uint8) << 3


def nibbles_to_e2m1(nib) -> np.ndarray:
    nib = np.asarray(nib, np.uint8)
    v = _E2M1_GRID[nib & 7]
    return np.where(nib & 8, -v, v).astype(np.float32)


def pack_e2m1(codes) -> np.ndarray:
    """[..., n] E2M1 values -> uint8 [..., n/2], two per byte, element 2k in the low nibble (ModelOpt)."""
    nib = e2m1_to_nibbles(codes)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_e2m1(packed) -> np.ndarray:
    """uint8 [..., n/2] -> float32 E2M1 values [..., n]."""
    p = np.asarray(packed, np.uint8)
    out = np.stack([nibbles_to_e2m1(p & 15), nibbles_to_e2m1(p >> 4)], axis=-1)
    return out.reshape(*p.shape[:-1], p.shape[-1] * 2)
