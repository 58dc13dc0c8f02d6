"""Layer kinds declared once (elastic_jax/model/kinds/): the declarations give the parameter layout
the library has always had, every dimension name means one size and has a sharding rule, and the
intermediates `forward` returns are the activations an independent walk computes."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.model.kinds import KINDS, layer_sizes
from elastic_jax.model.layers import dense, relu2, rms_norm, route
from elastic_jax.model.policy import ComputePolicy
from elastic_jax.model.params import param_axes, param_shapes
from elastic_jax.sharding import DEFAULT_RULES

CFG = ej.NemotronHConfig(vocab_size=96, hidden_size=64, hybrid_override_pattern="M*-E", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8,
                         mamba_head_dim=8, n_groups=2, ssm_state_size=16, chunk_size=8, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48)

# the layout written out by hand: (shape, logical axes) of every mixer parameter of CFG
D, H, P, GN, K, Q, KV, I, E, IE, IS = 64, 8, 8, 2 * 16, 4, 4 * 16, 2 * 16, 96, 8, 32, 48
LAYOUT = {
    "M": {"z_proj": ((D, H * P), ("embed", "ssm_inner")), "x_proj": ((D, H * P), ("embed", "ssm_inner")),
          "B_proj": ((D, GN), ("embed", "ssm_groups")), "C_proj": ((D, GN), ("embed", "ssm_groups")),
          "dt_proj": ((D, H), ("embed", "ssm_heads")),
          "conv_x": ((K, H * P), ("conv", "ssm_inner")), "conv_x_bias": ((H * P,), ("ssm_inner",)),
          "conv_B": ((K, GN), ("conv", "ssm_groups")), "conv_B_bias": ((GN,), ("ssm_groups",)),
          "conv_C": ((K, GN), ("conv", "ssm_groups")), "conv_C_bias": ((GN,), ("ssm_groups",)),
          "A_log": ((H,), ("ssm_heads",)), "D": ((H,), ("ssm_heads",)), "dt_bias": ((H,), ("ssm_heads",)),
          "norm": ((H * P,), ("ssm_inner",)), "out_proj": ((H * P, D), ("ssm_inner", "embed"))},
    "*": {"q_proj": ((D, Q), ("embed", "heads")), "k_proj": ((D, KV), ("embed", "kv_heads")),
          "v_proj": ((D, KV), ("embed", "kv_heads")), "o_proj": ((Q, D), ("heads", "embed"))},
    "-": {"up_proj": ((D, I), ("embed", "mlp")), "down_proj": ((I, D), ("mlp", "embed"))},
    "E": {"gate": ((D, E), ("embed", "experts_router")), "e_score_correction_bias": ((E,), ("experts_router",)),
          "up_proj": ((E, D, IE), ("experts", "embed", "expert_mlp")),
          "down_proj": ((E, IE, D), ("experts", "expert_mlp", "embed")),
          "shared_up": ((D, IS), ("embed", "shared_mlp")), "shared_down": ((IS, D), ("shared_mlp", "embed"))},
}


def test_declarations_give_the_layout_with_one_size_per_name():
    shapes, axes = param_shapes(CFG), param_axes(CFG)
    for i, c in enumerate(CFG.pattern):
        want = LAYOUT[c]
        assert shapes["layers"][i]["mixer"] == {n: s for n, (s, _) in want.items()}, c
        assert axes["layers"][i]["mixer"] == {n: a for n, (_, a) in want.items()}, c
        sizes = {}                                  # one name = one size (within the layer and with the top)
        for leaf_shape, leaf_axes in [((CFG.vocab_size, D), ("vocab", "embed"))] + list(want.values()):
            for n, name in zip(leaf_shape, leaf_axes):
                assert sizes.setdefault(name, n) == n, (c, name, sizes[name], n)
        assert {k: v for k, v in layer_sizes(CFG, i).items() if k in sizes} == \
            {k: v for k, v in sizes.items() if k in layer_sizes(CFG, i)}
    # the optional shared expert is declared only when it exists; the router bias stays f32
    assert "shared_up" not in param_shapes(CFG.replace(moe_shared_expert_intermediate_size=0))["layers"][3]["mixer"]
    moe = KINDS["E"].params(CFG)
    assert moe["e_score_correction_bias"].f32 and not moe["gate"].f32
    # every dimension name has a rule in the one sharding table
    rules = dict(DEFAULT_RULES)
    names = {n for leaf in jax.tree.leaves(axes, is_leaf=lambda t: isinstance(t, tuple)) for n in leaf}
    assert names <= set(rules), names - set(rules)
    assert set(KINDS) == set("M*-E") and all(KINDS[c].CHAR == c for c in KINDS)


@pytest.fixture(scope="module")
def walk():
    params = ej.init_params(CFG, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, CFG.vocab_size)
    # under a scanned policy: collecting runs the unrolled loop, without the fallback warning
    fwd = jax.jit(lambda p, t: ej.forward(p, t, CFG, policy=ComputePolicy(scan_layers=True), intermediates=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits, inter = fwd(params, tokens)
    plain, hs = jax.jit(ej.hidden_states, static_argnums=2)(params, tokens, CFG)
    return params, tokens, logits, inter, hs, plain


def test_intermediates_are_the_activations_of_an_independent_walk(walk):
    params, tokens, logits, inter, hs, plain = walk
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
    assert len(inter) == CFG.num_hidden_layers
    h = jnp.take(params["embed"], tokens, axis=0)
    tol = dict(rtol=1e-5, atol=1e-6)
    for i, c in enumerate(CFG.pattern):
        lp, it = params["layers"][i], inter[i]
        x = rms_norm(h, lp["norm"], CFG.layer_norm_epsilon)
        np.testing.assert_allclose(it["input"], x, **tol)
        out = hs[i] - h                                             # this layer's contribution
        m = lp["mixer"]
        if c == "M":
            np.testing.assert_allclose(it["x_proj"], dense(x, m["x_proj"]).reshape(2, 12, H, P), **tol)
        elif c == "*":                                              # per-head output = o_proj input
            np.testing.assert_allclose(dense(it["heads"].reshape(2, 12, Q), m["o_proj"]), out, **tol)
        elif c == "-":
            np.testing.assert_allclose(it["neurons"], relu2(dense(x, m["up_proj"])), **tol)
            np.testing.assert_allclose(dense(it["neurons"], m["down_proj"]), out, **tol)
        else:                                                       # rows sorted by expert, dense check
            idx, w = route(m, x.reshape(-1, D), CFG, None)
            np.testing.assert_array_equal(it["route_idx"], idx)
            rows = np.asarray(x).reshape(-1, D)[np.asarray(it["expert_order"]) // CFG.num_experts_per_tok]
            expert = np.asarray(idx).reshape(-1)[np.asarray(it["expert_order"])]
            act = np.maximum(np.einsum("td,tdf->tf", rows, np.asarray(m["up_proj"])[expert]), 0) ** 2
            np.testing.assert_allclose(it["expert_act"], act, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(it["expert_out"], np.einsum("tf,tfd->td", act, np.asarray(m["down_proj"])[expert]),
                                       rtol=1e-4, atol=1e-6)
        h = hs[i]
