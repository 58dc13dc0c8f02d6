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
