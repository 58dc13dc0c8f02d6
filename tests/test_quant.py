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
