"""Cost model (METHOD §6.2, §6.4): analytic counts == sliced-model sizes, memory by hand, budget loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.elastic import cost as C
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.elastic.router import RouterOutput, budget_code, init_router, route
from elastic_jax.widths import PER_LAYER_AXES, divisor, full_size

CFGS = [
    ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="MEM*-E"),
    ej.NemotronHConfig(hidden_size=48, hybrid_override_pattern="M*EE-M-", n_routed_experts=12, n_group=3,
                       topk_group=2, num_experts_per_tok=3, moe_shared_expert_intermediate_size=0,
                       mamba_num_heads=12, n_groups=3, num_attention_heads=6, num_key_value_heads=3,
                       conv_kernel=3, vocab_size=300),
]


_param_cost = jax.jit(C.param_cost, static_argnums=(0, 2))


def _np_params(cfg):
    """Zero parameters of the right shapes (numpy: slicing them is instant)."""
    return jax.tree.map(lambda s: np.zeros(s, np.float32), ej.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def _valid(cfg, axis, v):
    try:
        ej.Widths(**{axis: v}).validate(cfg)
        return True
    except ValueError:
        return False


def _random_widths(cfg, rng, per_layer, layers):
    kw = {"hidden": int(rng.integers(1, cfg.hidden_size + 1))}
    for axis, char in PER_LAYER_AXES.items():
        n = cfg.count(char)
        if not n:
            continue
        div, _ = divisor(cfg, axis)
        vals = []
        for i in range(n):
            cands = [v for v in range(div, full_size(cfg, axis, i) + 1, div) if _valid(cfg, axis, v)]
            vals.append(int(rng.choice(cands)))
        # one mamba_head_dim per sliced model: the channel count is never per layer
        kw[axis] = tuple(vals) if per_layer and axis != "mamba_channels" else vals[0]
    if layers:
        keep = rng.random(cfg.num_hidden_layers) < 0.7
        keep[rng.integers(cfg.num_hidden_layers)] = True
        kw["layers"] = tuple(bool(x) for x in keep)
    return ej.Widths(**kw)


def _expected(cfg, w: ej.Widths):
    r = w.resolve(cfg)
    e = {a: np.asarray(getattr(r, a), np.float32) for a in ("hidden",) + tuple(PER_LAYER_AXES)}
    e["layers"] = np.asarray(r.layers, np.float32)
    return e


@pytest.mark.parametrize("cfg", CFGS, ids=["MEM*-E", "M*EE-M-"])
@pytest.mark.parametrize("per_layer,layers", [(False, False), (True, False), (True, True)])
def test_param_cost_equals_sliced_model(cfg, per_layer, layers):
    rng = np.random.default_rng(0)
    params = _np_params(cfg)
    for trial in range(6):
        w = _random_widths(cfg, rng, per_layer, layers)
        exp = _expected(cfg, w)
        for active in (False, True):
            assert float(_param_cost(cfg, exp, active)) == ej.param_count(cfg, w, active=active), (w, active)
        # the real slice, not just the config arithmetic
        sub_cfg, sub = ej.slice_params(params, cfg, w)
        ej.check_params(sub, sub_cfg)
        assert ej.count_params(sub) == float(_param_cost(cfg, exp, False))


def test_param_cost_full_and_missing_axes():
    cfg = CFGS[0]
    assert float(C.param_cost(cfg, {})) == ej.param_count(cfg)
    assert float(C.param_cost(cfg, {}, True)) == ej.param_count(cfg, active=True)
    assert ej.param_count(cfg, active=True) < ej.param_count(cfg)
    # scalar vs per-layer broadcast agree
    a = C.param_cost(cfg, {"mamba_heads": 4.0})
    b = C.param_cost(cfg, {"mamba_heads": jnp.array([4.0, 4.0])})
    assert float(a) == float(b)


def test_param_cost_is_differentiable():
    cfg = CFGS[0]
    g = jax.jit(jax.grad(lambda e: C.param_cost(cfg, e, True)))(
        {"hidden": 40.0, "mamba_heads": jnp.array([6.0, 4.0]), "ffn": 100.0, "moe_experts": jnp.array([6.0, 8.0]),
         "moe_ffn": jnp.array([24.0, 16.0])})
    # d/d(moe_experts) with active=True: only the router column D+1 per expert (experts are top-k)
    np.testing.assert_allclose(g["moe_experts"], [40.0 + 1, 40.0 + 1])
    # d/d(ffn) = 2·D for the single MLP layer
    np.testing.assert_allclose(g["ffn"], 2 * 40.0)
    assert float(g["hidden"]) > 0 and np.all(np.asarray(g["mamba_heads"]) > 0)


def test_memory_cost_by_hand():
    cfg = ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="M*ME", mamba_num_heads=8, mamba_head_dim=8,
                             n_groups=2, ssm_state_size=16, conv_kernel=4, num_key_value_heads=2, head_dim=16)
    ctx, B = 1000, 3
    # weights: 2 bytes each; full model
    n_params = ej.param_count(cfg)
    kv = 2 * B * ctx * 2 * 16 * 1                  # k and v, 1 attention layer
    ssm = B * 8 * 8 * 16 * 2                       # [B, H, P, N] per Mamba layer, 2 layers
    conv = B * 3 * (8 * 8 + 2 * 2 * 16) * 2        # [B, K-1, H·P + 2·G·N], 2 layers
    want = 2.0 * n_params + 1.0 * kv + 4.0 * ssm + 2.0 * conv
    got = C.memory_cost(cfg, {}, context=ctx, batch=B, bytes_per_param=2.0, bytes_kv=1.0, bytes_ssm=4.0)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # half the Mamba heads in the second Mamba layer, hidden 32
    w = ej.Widths(hidden=32, mamba_heads=(8, 4))
    n2 = ej.param_count(cfg, w)
    ssm2 = B * 16 * (8 * 8 + 4 * 8)               # N · Σ H·P
    conv2 = B * 3 * ((8 * 8 + 64) + (4 * 8 + 64))
    want2 = 2.0 * n2 + 1.0 * kv + 4.0 * ssm2 + 2.0 * conv2
    got2 = C.memory_cost(cfg, {"hidden": 32.0, "mamba_heads": jnp.array([8.0, 4.0])}, context=ctx, batch=B,
                         bytes_per_param=2.0, bytes_kv=1.0, bytes_ssm=4.0)
    assert float(got2) == pytest.approx(want2, rel=1e-6)
    # explicit conv dtype
    got3 = C.memory_cost(cfg, {}, context=ctx, batch=B, bytes_per_param=2.0, bytes_kv=1.0, bytes_ssm=4.0,
                         bytes_conv=4.0)
    assert float(got3) - float(got) == pytest.approx(2.0 * conv, rel=1e-6)


def _router_out(cfg, ecfg, probs):
    return RouterOutput(probs=probs, choice={a: jnp.argmax(p, -1) for a, p in probs.items()}, soft_widths=None)


def test_budget_loss_dead_zone_and_anchor():
    cfg = CFGS[0]
    ecfg = ElasticConfig(budgets=(1.0, 0.7), hidden_options=(1.0, 0.5), mamba_options=None, ffn_options=None,
                         moe_expert_options=None, moe_ffn_options=None, budget_target="total")
    full = ej.param_count(cfg)
    for p0 in (0.0, 0.3, 0.6, 1.0):
        out = _router_out(cfg, ecfg, {"hidden": jnp.array([p0, 1 - p0])})
        exp_h = 64 * p0 + 32 * (1 - p0)
        c = float(C.param_cost(cfg, {"hidden": exp_h}))
        diff = abs(c / (0.7 * full) - 1)
        got = float(C.budget_loss(cfg, ecfg, out, 0.7, False))
        assert got == pytest.approx(diff if diff >= 0.05 else 0.0, rel=1e-5, abs=1e-7)
        # full budget: no dead zone, plus the anchor 10·MSE(π, one_hot(0))
        anchor = 10.0 * np.mean((np.array([p0, 1 - p0]) - np.array([1.0, 0.0])) ** 2)
        got_full = float(C.budget_loss(cfg, ecfg, out, 1.0, True))
        assert got_full == pytest.approx(abs(c / full - 1) + anchor, rel=1e-5, abs=1e-7)
    # traced budget / is_full under jit
    out = _router_out(cfg, ecfg, {"hidden": jnp.array([0.2, 0.8])})
    f = jax.jit(lambda b, full: C.budget_loss(cfg, ecfg, out, b, full))
    assert float(f(0.7, False)) == pytest.approx(float(C.budget_loss(cfg, ecfg, out, 0.7, False)))
    assert float(f(1.0, True)) > float(f(1.0, False))


@pytest.mark.parametrize("target", ["active", "total", "memory"])
def test_budget_loss_gradient_reaches_router(target):
    cfg = CFGS[0]
    ecfg = ElasticConfig(budget_target=target, mem_context=256, heterogeneous=True)
    rp = init_router(cfg, ecfg, jax.random.PRNGKey(0))

    def loss(rp):
        out = route(rp, cfg, ecfg, budget_code(ecfg, 0.5), jax.random.PRNGKey(1), 1.0, 1.0)
        return C.budget_loss(cfg, ecfg, out, 0.5, False)

    val, g = jax.jit(jax.value_and_grad(loss))(rp)
    assert float(val) > 0.05
    for axis, gp in g.items():
        assert float(jnp.sum(jnp.abs(gp["w2"]))) > 0, axis


def test_expected_widths():
    cfg = CFGS[0]
    ecfg = ElasticConfig(heterogeneous=True)
    opts = ecfg.options(cfg)
    probs = {a: jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(i), (2, o.size) if a in ("mamba_heads", "moe_experts", "moe_ffn") else (o.size,)))
             for i, (a, o) in enumerate(opts.items())}
    e = C.expected_widths(_router_out(cfg, ecfg, probs), ecfg, cfg)
    for a, o in opts.items():
        np.testing.assert_allclose(e[a], np.asarray(probs[a]) @ o, rtol=1e-6)
