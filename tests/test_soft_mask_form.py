"""The official soft-mask form (`ElasticConfig.soft_mask_form="official"`, issue 14; METHOD §4.2-4.3):
the FFN masked before relu², the Mamba x / dt at the projection and the conv-x weights masked. Exact
for hard masks (= the `Widths` forward, hence = the sliced model); different for soft mixtures."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.elastic import router as R
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.model.kinds.mamba import MambaMasks, mamba_mixer
from elastic_jax.model.kinds.mlp import MLPMasks, mlp_mixer
from elastic_jax.model.layers import Context, relu2
from elastic_jax.widths import SoftWidths, norm_correction, prefix_mask

CFG = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="M-E", vocab_size=64, intermediate_size=32,
                         n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         moe_shared_expert_intermediate_size=16, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                         ssm_state_size=8)
OPTS = {"hidden": (32, 16), "mamba_heads": (4, 2), "ffn": (32, 16), "moe_ffn": (16, 8)}
_fwd = jax.jit(ej.forward, static_argnums=2)
_mamba = jax.jit(lambda p, x, el: mamba_mixer(p, x, CFG, el, Context(), None)[0])


@pytest.fixture(scope="module")
def model():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 8)), jnp.int32)
    return params, tokens


def _soft(probs, form):
    return SoftWidths.from_options(CFG, OPTS, {a: jnp.asarray(probs) for a in OPTS}, mask_form=form)


def test_official_form_is_exact_for_hard_masks_and_differs_when_soft(model):
    params, tokens = model
    hard = _fwd(params, tokens, CFG, ej.Widths(hidden=16, mamba_heads=2, ffn=16, moe_ffn=8))
    for form in ("output", "official"):
        got = _fwd(params, tokens, CFG, _soft([0.0, 1.0], form))
        np.testing.assert_allclose(np.asarray(got), np.asarray(hard), atol=1e-6)
    soft_out = _fwd(params, tokens, CFG, _soft([0.6, 0.4], "output"))
    soft_off = _fwd(params, tokens, CFG, _soft([0.6, 0.4], "official"))
    assert float(jnp.max(jnp.abs(soft_out - soft_off))) > 1e-4


def test_official_ffn_and_mamba_layers_match_their_formulas(model):
    params, _ = model
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, CFG.hidden_size))
    probs = jnp.asarray([0.7, 0.3])
    ctx = Context()
    # FFN: y = W₂ relu²(m · W₁x), m = Σ π_i prefix_i
    p = params["layers"][1]["mixer"]
    m = prefix_mask(CFG.intermediate_size, jnp.asarray(OPTS["ffn"]), probs)
    got = mlp_mixer(p, x, CFG, MLPMasks(ffn_mask=m, premask=True), ctx, None)[0]
    want = relu2((x @ p["up_proj"]) * m) @ p["down_proj"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Mamba: the official form == the unmasked mixer on masked z/x/dt projections and conv-x weights
    p = params["layers"][0]["mixer"]
    H, P = CFG.mamba_num_heads, CFG.mamba_head_dim
    c = jnp.asarray(OPTS["mamba_heads"])
    head = prefix_mask(H, c, probs, CFG.n_groups)
    eps_f, scale = norm_correction(H, c, probs)
    el = MambaMasks(head_mask=head, norm_eps=eps_f, norm_scale=scale, premask=True)
    got = _mamba(p, x, el)
    hm = jnp.repeat(head, P)
    q = dict(p, z_proj=p["z_proj"] * hm, x_proj=p["x_proj"] * hm, dt_proj=p["dt_proj"] * head,
             conv_x=p["conv_x"] * hm, conv_x_bias=p["conv_x_bias"] * hm)
    el_norm = MambaMasks(head_mask=jnp.ones((H,)), norm_eps=eps_f, norm_scale=scale)
    want = _mamba(q, x, el_norm)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    ours = _mamba(p, x, dataclasses.replace(el, premask=False))
    assert float(jnp.max(jnp.abs(ours - got))) > 1e-5


def test_router_passes_the_form_and_bad_values_are_refused():
    e = ElasticConfig(budgets=(1.0, 0.5), hidden_options=(1.0, 0.5), mamba_options=(1.0, 0.5), router_dim=8,
                      soft_mask_form="official")
    r = R.route(R.init_router(CFG, e, jax.random.PRNGKey(0)), CFG, e, R.budget_code_from_index(e, 1), None, 1.0, 1.0)
    assert r.soft_widths.mask_form == "official"
    assert ElasticConfig().soft_mask_form is None
    with pytest.raises(ValueError, match="soft_mask_form"):
        ElasticConfig(soft_mask_form="pre")
    with pytest.raises(ValueError, match="mask_form"):
        SoftWidths.from_options(CFG, {}, {}, mask_form="pre")
