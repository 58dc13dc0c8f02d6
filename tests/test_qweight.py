"""Quantized projections as `QWeight` leaves of the params (METHOD §10): `forward` takes no
`quant=`; `quant.qweight_params(params, state)` gives the params it runs fake-quantized.

The reference values in tests/data/qweight_reference.npz were computed by the pre-refactor code
path, `forward(params, tokens, cfg, widths, quant=state)` (the decoder swapped each layer's
projections for QWeights inside its unrolled loop), at commit 0b49d0a, on this module's CFG: the
calibrated input scales, logits (full and nested), the gradient of a QAD-style loss through
`final_hidden`, prefill + one decode step, and the FP8 KV-cache scales, under the XLA flags the
tests run with (conftest.FAST_XLA). With equal flags the new path, run eagerly, gave every one of them
bit for bit; the test jits the logits (one compile each), and the tolerances leave room for that and
for other XLA versions. And the scanned layer loop must equal
the unrolled one with QWeight params."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import quant
from elastic_jax.model.decoder import final_hidden
from elastic_jax.model.policy import ComputePolicy
from elastic_jax.model.scan import unstackable_reason

REF = os.path.join(os.path.dirname(__file__), "data", "qweight_reference.npz")
CFG = ej.NemotronHConfig(vocab_size=64, hidden_size=64, hybrid_override_pattern="M*-E", intermediate_size=64,
                         moe_intermediate_size=32, mamba_head_dim=16, mamba_num_heads=4, n_groups=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                         num_experts_per_tok=2, moe_shared_expert_intermediate_size=32)
W = ej.Widths(hidden=48, mamba_heads=2, attn_heads=2, ffn=32, moe_experts=2, moe_ffn=16, layers=(True, True, False, True))
POL = ComputePolicy(remat="none")
TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF))


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.slow
def test_qweight_path_equals_the_pre_refactor_quant_forward(ref, fmt):
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jnp.asarray(ref["tokens"])
    np.testing.assert_array_equal(np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)), ref["tokens"])
    qs = quant.calibrate(params, CFG, quant.init_quant_state(params, CFG, fmt), [tokens], widths=(None, W))
    for i, layer in enumerate(qs.layers):
        for k, e in layer.items():
            np.testing.assert_allclose(np.asarray(e["input_scale"]), ref[f"{fmt}/input_scale/{i}/{k}"], **TOL)
    qp = quant.qweight_params(params, qs)
    # the logits jitted (one compile each instead of op-by-op dispatch; the reference was eager: equal
    # within TOL); the gradient stays eager, as the reference was computed (jitted, one of 4096 entries of
    # a layer's gradient moves by 1.5e-5 through cancellation)
    for w, name in ((None, "full"), (W, "masked")):
        logits = jax.jit(lambda p: ej.forward(p, tokens, CFG, w, policy=POL))(qp)
        np.testing.assert_allclose(np.asarray(logits), ref[f"{fmt}/logits/{name}"], **TOL)
    r = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 64))
    # QAD: differentiate through qweight_params (straight-through) and the plain forward
    g = jax.grad(lambda p: jnp.sum(final_hidden(quant.qweight_params(p, qs), tokens, CFG, W, policy=POL) * r))(params)
    leaves = jax.tree_util.tree_flatten_with_path(g)[0]
    assert len(leaves) == sum(k.startswith(f"{fmt}/grad/") for k in ref)
    for path, leaf in leaves:
        np.testing.assert_allclose(np.asarray(leaf), ref[f"{fmt}/grad/{jax.tree_util.keystr(path)}"], rtol=1e-4,
                                   atol=1e-5, err_msg=jax.tree_util.keystr(path))
    lg, cache = ej.prefill(qp, tokens[:, :6], CFG, W, max_len=8, policy=POL)
    lg2, _ = ej.decode_step(qp, tokens[:, 6:7], cache, CFG, W, policy=POL)
    np.testing.assert_allclose(np.asarray(lg), ref[f"{fmt}/prefill"], **TOL)
    np.testing.assert_allclose(np.asarray(lg2), ref[f"{fmt}/decode"], **TOL)


def test_kv_cache_scales_equal_the_pre_refactor_ones(ref):
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    kv = quant.calibrate_kv_cache(params, CFG, [jnp.asarray(ref["tokens"])], widths=(None, W))
    assert sorted(kv) == [1]
    for n in ("k_scale", "v_scale"):
        np.testing.assert_allclose(kv[1][n], ref[f"kv/1/{n}"], rtol=1e-6)


SCAN_CFG = CFG.replace(hybrid_override_pattern="M*-EM*-E")


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.slow
def test_scanned_equals_unrolled_with_qweight_params(fmt):
    """QWeight leaves stack by kind like any array, so the quantized model (and QAD) runs scanned."""
    params = ej.init_params(SCAN_CFG, jax.random.PRNGKey(4))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 64)
    qs = quant.calibrate(params, SCAN_CFG, quant.init_quant_state(params, SCAN_CFG, fmt), [tokens])
    w = ej.Widths(hidden=48, mamba_heads=2, attn_heads=2, ffn=32, moe_experts=2, moe_ffn=16)
    scan, unrolled = ComputePolicy(scan_layers=True, remat="full"), ComputePolicy(scan_layers=False, remat="full")
    r = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 64))

    def run(policy):
        def loss(p):
            return jnp.sum(final_hidden(quant.qweight_params(p, qs), tokens, SCAN_CFG, w, policy=policy) * r)
        return jax.jit(jax.value_and_grad(loss))(params)

    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the scanned run must not fall back to the unrolled loop
        (l_s, g_s) = run(scan)
    (l_u, g_u) = run(unrolled)
    np.testing.assert_allclose(float(l_s), float(l_u), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    qp = quant.qweight_params(params, qs)
    np.testing.assert_allclose(np.asarray(ej.forward(qp, tokens, SCAN_CFG, w, policy=scan)),
                               np.asarray(ej.forward(qp, tokens, SCAN_CFG, w, policy=unrolled)), rtol=1e-5, atol=1e-5)


def test_mixed_precision_layers_of_one_kind_say_why_they_run_unrolled():
    params = ej.init_params(SCAN_CFG, jax.random.PRNGKey(4))
    qs = quant.init_quant_state(params, SCAN_CFG, quant.QuantSpec("fp8", exclude=("backbone.layers.4.*",)))
    reason = unstackable_reason(quant.qweight_params(params, qs)["layers"], SCAN_CFG)
    assert "layer 4" in reason and "QWeight" in reason


def test_forward_takes_no_quant_argument_and_qweight_params_checks_its_input():
    import inspect
    for fn in (ej.forward, ej.prefill, ej.decode_step, ej.hidden_states, final_hidden):
        assert "quant" not in inspect.signature(fn).parameters, fn.__name__
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    qs = quant.init_quant_state(params, CFG, "fp8")
    with pytest.raises(quant.QuantizationError, match="the params 3"):
        quant.qweight_params({**params, "layers": params["layers"][:3]}, qs)
    stacked = ej.model.scan.stack_layers(params, CFG)
    with pytest.raises(quant.QuantizationError, match="per-layer list"):
        quant.qweight_params(stacked, qs)
