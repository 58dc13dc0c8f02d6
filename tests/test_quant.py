"""Simulated FP8 / NVFP4 round trips (METHOD §10)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import quant


def test_fp8_matches_e4m3_cast_with_per_tensor_scale():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 48)) * 3.0
    q = quant.quantize_dequantize(x, "fp8")
    scale = float(jnp.abs(x).max()) / 448.0
    ref = (np.asarray(x) / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    np.testing.assert_allclose(np.asarray(q), ref, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(q - x).max()) <= 0.07 * float(jnp.abs(x).max())


def test_nvfp4_block_values_are_e2m1_times_block_scale():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
    q = np.asarray(quant.quantize_dequantize(x, "nvfp4", axis=-1)).reshape(4, 2, 16)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    for row in q.reshape(-1, 16):
        scale = np.abs(row).max() / 6.0
        assert np.all(np.min(np.abs(np.abs(row)[:, None] / scale - grid[None]), axis=1) < 1e-4)
    # the largest element of each block is represented exactly up to the E4M3 scale rounding
    xb = np.asarray(x).reshape(4, 2, 16)
    amax = np.abs(xb).max(-1)
    np.testing.assert_allclose(np.abs(q).max(-1), amax, rtol=0.07)


def test_nvfp4_hand_checked_block():
    # one block whose amax is 6 -> block scale 1 (exact in E4M3): values round to the E2M1 grid
    x = jnp.array([[6.0, 0.2, 0.3, 0.74, 0.76, 1.2, 1.3, 2.4, 2.6, 3.4, 3.6, 4.9, 5.1, -1.0, -2.9, 0.0]])
    q = quant.quantize_dequantize(x, "nvfp4")
    expected = [6.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 3.0, 4.0, 4.0, 6.0, -1.0, -3.0, 0.0]
    np.testing.assert_allclose(np.asarray(q)[0], expected)


def test_straight_through_gradient_and_errors():
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 16))
    g = jax.grad(lambda v: jnp.sum(quant.quantize_dequantize(v, "nvfp4") * 2.0))(x)
    np.testing.assert_allclose(np.asarray(g), 2.0)
    with pytest.raises(ValueError, match="block size"):
        quant.quantize_dequantize(jnp.ones((3, 10)), "nvfp4")
    with pytest.raises(ValueError, match="format"):
        quant.quantize_dequantize(x, "int3")


@pytest.mark.slow
def test_quantized_model_stays_close_and_keeps_vectors():
    cfg = ej.NemotronHConfig(vocab_size=64, hidden_size=64, hybrid_override_pattern="M*E", intermediate_size=64,
                             moe_intermediate_size=32, mamba_head_dim=16, mamba_num_heads=4)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    t = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, 64)
    fwd = jax.jit(ej.forward, static_argnums=2)
    ref = fwd(params, t, cfg)
    for fmt, tol in (("fp8", 0.05), ("nvfp4", 0.3)):
        qp = quant.quantize_params(params, fmt)
        assert qp["layers"][0]["mixer"]["A_log"] is params["layers"][0]["mixer"]["A_log"]
        assert qp["embed"] is params["embed"]
        rel = float(jnp.linalg.norm(fwd(qp, t, cfg) - ref) / jnp.linalg.norm(ref))
        assert 0 < rel < tol, (fmt, rel)


def test_e2m1_rounding_is_round_to_nearest_even_as_ml_dtypes():
    # every midpoint of the grid (ties) and values around them, both signs, beyond 6 saturates
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    v = np.concatenate([mids, mids - 1e-3, mids + 1e-3, [0.0, 6.0, 6.5, 7.0]]).astype(np.float32)
    v = np.concatenate([v, -v])
    got = np.asarray(quant.formats._round_e2m1(jnp.clip(jnp.asarray(v), -6.0, 6.0)))
    np.testing.assert_array_equal(got, v.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def _nvfp4_activation_reference(x, scale2):
    """ModelOpt / cuBLAS NVFP4 activation quantization in numpy + ml_dtypes: per 16 along the last
    axis, E4M3 block scale = e4m3(block amax / 6 / scale2) (saturating at 448), values E2M1."""
    b = x.reshape(*x.shape[:-1], -1, 16).astype(np.float32)
    block = np.minimum(np.abs(b).max(-1, keepdims=True) / 6.0 / scale2, 448.0)
    block = block.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    bs = block * np.float32(scale2)
    safe = np.where(bs > 0, bs, 1.0)
    codes = np.clip(b / safe, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return np.where(bs > 0, codes * bs, 0.0).reshape(x.shape)


def test_nvfp4_activation_matches_reference_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 64)).astype(np.float32)
    x[0, 0, :16] = 0.0                                   # a zero block
    x[0, 1, 16:32] *= 1e-4                               # subnormal E4M3 block scales
    x[1, 2, 32:48] *= 400.0                              # far past the calibrated range: saturates
    x[2, 3, :16] = [6, 0.25, 0.75, 1.75, 3.5, 5, -0.75, -2.5, 1.25, 0, 2, 3, 4, 1, 0.5, -6]   # exact ties
    scale2 = np.float32(6.0 / (6 * 448))                 # calibrated amax 6 -> the ties block has scale 1
    got = np.asarray(quant.formats.nvfp4_activation(jnp.asarray(x), scale2))
    ref = _nvfp4_activation_reference(x, scale2)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert np.all(got[0, 0, :16] == 0) and np.any(got[0, 1, 16:32] != 0)
    np.testing.assert_array_equal(got[2, 3, :16], [6, 0, 1, 2, 4, 4, -1, -2, 1, 0, 2, 3, 4, 1, 0.5, -6])
    assert np.abs(got[1, 2, 32:48]).max() <= 448 * 6 * scale2 + 1e-6     # saturated, not NaN
    g = jax.grad(lambda v: jnp.sum(quant.formats.nvfp4_activation(v, scale2) * 3.0))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), 3.0)                        # straight-through
    with pytest.raises(ValueError, match="block size"):
        quant.formats.nvfp4_activation(jnp.ones((2, 24)), scale2)
