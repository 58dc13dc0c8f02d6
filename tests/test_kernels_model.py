"""Model-level check: logits with kernel_impl="pallas" (interpret mode on CPU) == "xla", for the
full model and a masked nested submodel (fewer Mamba heads, experts and expert width)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ej = pytest.importorskip("elastic_jax")
if not all(hasattr(ej, a) for a in ("NemotronHConfig", "init_params", "forward", "Widths")):
    pytest.skip("elastic_jax model API not available yet", allow_module_level=True)

CFG = ej.NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="MEM*-E",
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                         ssm_state_size=16, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=24, moe_shared_expert_intermediate_size=16)


def test_model_logits_pallas_equals_xla():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13)), jnp.int32)
    xla_cfg = dataclasses.replace(CFG, kernel_impl="xla")
    pal_cfg = dataclasses.replace(CFG, kernel_impl="pallas")
    # resolved widths: one pytree structure, so each impl compiles once for both budgets
    full = ej.Widths.full(CFG)
    nested = ej.Widths(mamba_heads=2, moe_experts=2, moe_ffn=12).resolve(CFG)
    fwd = jax.jit(lambda p, t, w, cfg: ej.forward(p, t, cfg, w), static_argnums=3)
    for w in (full, nested):
        ref = fwd(params, tokens, w, xla_cfg)
        out = fwd(params, tokens, w, pal_cfg)
        scale = max(float(jnp.abs(ref).max()), 1.0)
        err = float(jnp.abs(out - ref).max()) / scale
        assert err < 1e-5, f"widths={w}: pallas vs xla logits differ by {err:.2e}"
