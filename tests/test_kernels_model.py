"""Model-level check: logits with ComputePolicy(kernel_impl="pallas") (interpret mode on CPU) == "xla", for the
full model and a masked nested submodel (fewer Mamba heads, experts and expert width)."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from conftest import tiny_config

CFG = tiny_config("MEM*-E", num_attention_heads=2, num_key_value_heads=1, head_dim=16, ssm_state_size=16,
                  moe_intermediate_size=24)


@pytest.mark.slow
def test_model_logits_pallas_equals_xla():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13)), jnp.int32)
    # resolved widths: one pytree structure, so each impl compiles once for both budgets
    full = ej.Widths.full(CFG)
    nested = ej.Widths(mamba_heads=2, moe_experts=2, moe_ffn=12).resolve(CFG)

    @functools.partial(jax.jit, static_argnums=3)
    @chex.assert_max_traces(n=2)       # one trace per impl: both widths run the same program
    def fwd(p, t, w, impl):
        return ej.forward(p, t, CFG, w, policy=ej.ComputePolicy(kernel_impl=impl))

    for w in (full, nested):
        ref = fwd(params, tokens, w, "xla")
        out = fwd(params, tokens, w, "pallas")
        scale = max(float(jnp.abs(ref).max()), 1.0)
        err = float(jnp.abs(out - ref).max()) / scale
        assert err < 1e-5, f"widths={w}: pallas vs xla logits differ by {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_cpu_weight_gradient_equals_the_plain_transpose(dtype):
    """`dense(..., token_major_grad=True)` on CPU without remat takes its weight gradient as dot(x, ct)
    over the token axes (layers.py, `_matmul_cpu`); traced for TPU it is the plain einsum with JAX's own
    transpose. Same gradients (x and w, 2-D and 3-D inputs, under vmap as the student forward runs),
    same dtypes."""
    from elastic_jax.kernels import compile_target
    from elastic_jax.model.layers import dense
    pol = ej.ComputePolicy(compute_dtype=dtype)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k[0], (24, 40))
    for shape in ((3, 7, 24), (11, 24)):
        x = jax.random.normal(k[1], shape)
        ct = jax.random.normal(k[2], shape[:-1] + (40,))
        loss = lambda x, w: jnp.sum(dense(x, w, pol, token_major_grad=True).astype(jnp.float32) * ct)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
        cpu = grads(x, w)
        with compile_target("tpu"):
            plain = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
        assert [g.dtype for g in cpu] == [g.dtype for g in plain] == [jnp.float32, jnp.float32]
        chex.assert_trees_all_close(cpu, plain, atol=1e-5, rtol=1e-5)
    xs = jax.random.normal(k[1], (2, 5, 24))          # vmapped over a leading axis with per-row weights
    ws = jnp.stack([w, 2 * w])
    vdense = jax.vmap(lambda x, w: dense(x, w, pol, token_major_grad=True))
    vloss = lambda xs, ws: jnp.sum(vdense(xs, ws).astype(jnp.float32) ** 2)
    cpu = jax.jit(jax.grad(vloss, argnums=(0, 1)))(xs, ws)
    with compile_target("tpu"):
        plain = jax.jit(jax.grad(vloss, argnums=(0, 1)))(xs, ws)
    chex.assert_trees_all_close(cpu, plain, atol=1e-4, rtol=1e-5)
    # the rule is taken when asked, on CPU, without remat: there the weight gradient needs no transpose
    jaxpr = lambda policy, tm=True: str(jax.make_jaxpr(
        jax.grad(lambda w: jnp.sum(dense(xs[0], w, policy, token_major_grad=tm))))(w))
    assert "transpose[" not in jaxpr(pol)
    assert "transpose[" in jaxpr(pol, tm=False)
    assert "transpose[" in jaxpr(ej.ComputePolicy(compute_dtype=dtype, remat="full"))
