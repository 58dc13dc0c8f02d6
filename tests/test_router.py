"""ElasticConfig validation and the budget router (METHOD §5, §6.2)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from elastic_jax.elastic import cost as C
from elastic_jax.elastic import router as R
from elastic_jax.elastic.config import ElasticConfig

CFG = ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="MEM*-E")


# ------------------------------------------------------------------------------ config
def test_options_fractions_and_ints():
    e = ElasticConfig(budgets=(0.5, 1.0, 0.75), hidden_options=(1.0, 0.8, 0.5), mamba_options=(8, 6, 2),
                      attn_options=(1.0, 0.5), ffn_options=(1.0, 0.3), moe_expert_options=(1.0, 0.5),
                      moe_ffn_options=(32, 16))
    assert e.budgets == (1.0, 0.75, 0.5)          # kept sorted descending
    o = e.options(CFG)
    assert o["hidden"].tolist() == [64, 51, 32]   # floored
    assert o["mamba_heads"].tolist() == [8, 6, 2]
    assert o["attn_heads"].tolist() == [4, 2]
    assert o["ffn"].tolist() == [128, 38]
    assert o["moe_experts"].tolist() == [8, 4]
    assert o["moe_ffn"].tolist() == [32, 16]
    # fractions floor to the group step: mamba 0.6·8 = 4.8 -> 4 (n_groups=2)
    assert ElasticConfig(mamba_options=(1.0, 0.6)).options(CFG)["mamba_heads"].tolist() == [8, 4]
    # kinds absent from the pattern are skipped
    assert "ffn" not in ElasticConfig().options(CFG.replace(hybrid_override_pattern="ME*"))
    d = e.to_dict()
    assert ElasticConfig.from_dict(json.loads(json.dumps(d))) == e


def test_quantization_block():
    e = ElasticConfig(quantization="nvfp4", hidden_options=(1.0, 0.8), ffn_options=(1.0, 0.7), mamba_options=(1.0, 0.5),
                      moe_ffn_options=(1.0, 0.5))
    o = e.options(CFG)
    assert o["hidden"].tolist() == [64, 48]       # 51 -> multiple of 16
    assert o["ffn"].tolist() == [128, 80]         # 89 -> 80
    assert o["mamba_heads"].tolist() == [8, 4]    # 4 heads x 8 channels = 32 (a multiple of 16)
    with pytest.raises(ValueError, match=r"ffn_options.*multiple of 16"):
        ElasticConfig(quantization="fp8", hidden_options=None, moe_ffn_options=None,
                      ffn_options=(128, 100)).options(CFG)
    with pytest.raises(ValueError, match=r"mamba_options.*multiple of 4 .*fp8"):
        ElasticConfig(quantization="fp8", hidden_options=None, ffn_options=None, moe_ffn_options=None,
                      mamba_options=(8, 6, 4)).options(CFG.replace(mamba_head_dim=4))


@pytest.mark.parametrize("kw,match", [
    (dict(budgets=(1.0, 1.5)), r"budgets.*\(0, 1\]"),
    (dict(budgets=(1.0, 0.0)), r"budgets.*\(0, 1\]"),
    (dict(budgets=(1.0, -0.2)), r"budgets.*\(0, 1\]"),
    (dict(budgets=(0.8, 0.5)), r"budgets.*must include 1.0"),
    (dict(budgets=(1.0, 0.5, 0.5)), r"budgets.*distinct"),
    (dict(hidden_options=(1.0, 1.2)), r"hidden_options.*\(0, 1\]"),
    (dict(hidden_options=(0.9, 0.5)), r"hidden_options.*index 0"),
    (dict(ffn_options=(1.0, 0.5, 0.75)), r"ffn_options.*descending"),
    (dict(ffn_options=(128, 32, 64)), r"ffn_options.*descending"),
    (dict(ffn_options=(1.0, 64)), r"ffn_options.*mix"),
    (dict(router_dim=0), r"router_dim"),
    (dict(budget_target="latency"), r"budget_target"),
    (dict(quantization="int4"), r"quantization"),
    (dict(dead_zone=1.5), r"dead_zone"),
])
def test_config_rejects_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        ElasticConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(mamba_options=(8, 5)), r"mamba_options.*divisible by n_groups=2"),
    (dict(attn_options=(4, 3)), r"attn_options.*divisible by num_key_value_heads=2"),
    (dict(moe_expert_options=(8, 1)), r"moe_expert_options.*num_experts_per_tok"),
    (dict(ffn_options=(64, 32)), r"ffn_options.*full size 128"),
    (dict(hidden_options=(1.0, 0.01)), r"hidden_options.*floors to 0"),
    (dict(mamba_options=(1.0, 0.9, 0.8)), r"mamba_options.*duplicate"),
])
def test_options_reject_group_violations(kw, match):
    with pytest.raises(ValueError, match=match):
        ElasticConfig(**kw).options(CFG)


# ------------------------------------------------------------------------------ router
def test_router_shapes_and_init():
    e = ElasticConfig(router_dim=512)
    rp = R.init_router(CFG, e, jax.random.PRNGKey(0))
    assert set(rp) == {"hidden", "mamba_heads", "ffn", "moe_experts", "moe_ffn"}
    assert rp["hidden"]["w1"].shape == (3, 512) and rp["hidden"]["w2"].shape == (512, 3)
    std = float(jnp.std(jnp.concatenate([rp[a]["w1"].ravel() for a in rp])))
    assert 0.09 < std < 0.11
    axes = R.router_axes(CFG, e)
    assert {a: set(v) for a, v in axes.items()} == {a: set(v) for a, v in rp.items()}
    assert all(len(axes[a][w]) == rp[a][w].ndim for a in rp for w in rp[a])
    h = R.init_router(CFG, e.replace(heterogeneous=True), jax.random.PRNGKey(0))
    assert h["hidden"]["w2"].shape == (512, 3)              # the embedding axis stays global
    assert h["mamba_heads"]["w2"].shape == (512, 2 * 3)     # two Mamba layers
    assert h["moe_ffn"]["w2"].shape == (512, 2 * 3)


def test_budget_code():
    e = ElasticConfig(budgets=(1.0, 0.75, 0.5))
    np.testing.assert_allclose(R.budget_code(e, 0.75), [0, 1, 0])
    np.testing.assert_allclose(R.budget_code(e, 1.0), [1, 0, 0])
    np.testing.assert_allclose(R.budget_code(e, 0.6), [0, 0.4, 0.6], atol=1e-6)    # w = (0.6-0.5)/0.25
    np.testing.assert_allclose(R.budget_code(e, 0.9), [0.6, 0.4, 0], atol=1e-6)
    np.testing.assert_allclose(R.budget_code(e, 0.3), [0, 0, 1])                   # below: the smallest
    np.testing.assert_allclose(R.budget_code(ElasticConfig(budgets=(1.0, 0.5)).replace(), 0.5), [0, 1])
    traced = jax.jit(lambda b: R.budget_code(e, b))(0.6)
    np.testing.assert_allclose(traced, [0, 0.4, 0.6], atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda i: R.budget_code_from_index(e, i))(2), [0, 0, 1])
    for bad in (0.0, 1.2, -1.0):
        with pytest.raises(ValueError, match=r"budget.*\(0, 1\]"):
            R.budget_code(e, bad)


def test_schedules():
    e = ElasticConfig()
    tau0, s0 = R.schedules(e, 0, 1000)
    tau1, s1 = R.schedules(e, 1000, 1000)
    taum, sm = R.schedules(e, 500, 1000)
    assert float(tau0) == pytest.approx(1.0) and float(tau1) == pytest.approx(0.05)
    assert float(s0) == pytest.approx(1.0) and float(s1) == pytest.approx(10.0)
    assert float(taum) == pytest.approx(0.05 ** 0.5, rel=1e-5) and float(sm) == pytest.approx(5.5)
    assert float(R.schedules(e, 5000, 1000)[0]) == pytest.approx(0.05)   # clamped
    tau_j, _ = jax.jit(lambda t: R.schedules(e, t, 1000))(jnp.int32(500))
    assert float(tau_j) == pytest.approx(float(taum))


def test_route_noise_hard_and_widths():
    e = ElasticConfig(heterogeneous=True)
    rp = R.init_router(CFG, e, jax.random.PRNGKey(0))
    code = R.budget_code(e, 0.75)
    key = R.router_key(jax.random.PRNGKey(3), 7, 1)
    route = jax.jit(lambda rp, code, key, hard: R.route(rp, CFG, e, code, key, 0.5, 2.0, hard=hard))
    a = route(rp, code, key, False)
    b = route(rp, code, key, False)
    c = route(rp, code, R.router_key(jax.random.PRNGKey(3), 7, 2), False)
    assert all(np.array_equal(a.probs[k], b.probs[k]) for k in a.probs)            # deterministic
    assert any(not np.allclose(a.probs[k], c.probs[k]) for k in a.probs)           # per-microbatch noise
    assert a.probs["mamba_heads"].shape == (2, 3) and a.probs["hidden"].shape == (3,)
    for k, p in a.probs.items():
        np.testing.assert_allclose(jnp.sum(p, -1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(a.choice[k], jnp.argmax(p, -1))
    # soft widths carry π; hard widths the straight-through one-hot (exactly one_hot in value)
    np.testing.assert_allclose(a.soft_widths.mamba_heads[1], a.probs["mamba_heads"])
    np.testing.assert_array_equal(a.soft_widths.mamba_heads[0], np.broadcast_to([8, 6, 4], (2, 3)))
    h = route(rp, code, key, True)
    want = jax.nn.one_hot(a.choice["mamba_heads"], 3)
    np.testing.assert_array_equal(h.soft_widths.mamba_heads[1], want)
    # no key: no noise, deterministic
    d = R.route(rp, CFG, e, code, None, 1.0, 1.0)
    z = R.router_logits(rp, CFG, e, code)
    np.testing.assert_allclose(d.probs["ffn"], jax.nn.softmax(z["ffn"], -1), rtol=1e-5)
    # std-normalized logits: π = softmax(s · z / std(z) / τ), per layer row
    en = e.replace(normalize_logits=True)
    dn = R.route(rp, CFG, en, code, None, 0.5, 3.0)
    zm = z["mamba_heads"]
    want = jax.nn.softmax(3.0 * zm / (jnp.std(zm, -1, keepdims=True) + 1e-6) / 0.5, -1)
    np.testing.assert_allclose(dn.probs["mamba_heads"], want, rtol=1e-5)
    # budget_widths: argmax at the final τ / scale -> concrete, valid widths
    w = R.budget_widths(rp, CFG, e, 0.5)
    w.validate(CFG)
    opts = e.options(CFG)
    assert w.hidden in opts["hidden"].tolist()
    assert all(x in opts["mamba_heads"].tolist() for x in np.atleast_1d(w.mamba_heads))
    # a router from a different ElasticConfig
    with pytest.raises(ValueError, match="different ElasticConfig|no 'ffn' router"):
        R.route(R.init_router(CFG, e.replace(ffn_options=None), jax.random.PRNGKey(0)), CFG, e, code, None, 1.0, 1.0)


def test_gradients_reach_router_through_masks_and_budget_loss():
    cfg = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="ME-", vocab_size=64)
    e = ElasticConfig(heterogeneous=True, router_dim=32)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    rp = R.init_router(cfg, e, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, cfg.vocab_size)
    teacher = jax.random.normal(jax.random.PRNGKey(4), (2, 8, cfg.vocab_size))

    def kd(rp, tokens):       # any student loss: the masks depend on π, so it reaches the router
        out = R.route(rp, cfg, e, R.budget_code(e, 0.5), jax.random.PRNGKey(3), 1.0, 1.0)
        return jnp.mean(jnp.square(ej.forward(params, tokens, cfg, out.soft_widths) - teacher))

    def bl(rp):
        out = R.route(rp, cfg, e, R.budget_code(e, 0.5), jax.random.PRNGKey(3), 1.0, 1.0)
        return C.budget_loss(cfg, e, out, 0.5, False)

    g_kd, g_bl = jax.jit(lambda rp, t: (jax.grad(kd)(rp, t), jax.grad(bl)(rp)))(rp, tokens)
    assert set(rp) == {"hidden", "mamba_heads", "ffn", "moe_experts", "moe_ffn"}
    for axis in rp:
        assert float(jnp.sum(jnp.abs(g_kd[axis]["w2"]))) > 0, f"no KD gradient to the {axis} router"
        assert float(jnp.sum(jnp.abs(g_bl[axis]["w2"]))) > 0, f"no budget gradient to the {axis} router"


@pytest.mark.parametrize("heterogeneous,target", [(False, "active"), (True, "total")])
@pytest.mark.slow
def test_budget_loss_alone_reaches_every_budget(heterogeneous, target):
    """Only the budget loss, a few hundred Adam steps: each budget's expected cost (noise-free, final
    τ and scale) lands within the dead zone of its target; the full budget picks the full model."""
    e = ElasticConfig(budgets=(1.0, 0.8, 0.6), hidden_options=(1.0, 0.75, 0.5), mamba_options=(1.0, 0.5),
                      ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5), moe_ffn_options=(1.0, 0.5),
                      heterogeneous=heterogeneous, budget_target=target, router_dim=64)
    steps = 300
    rp = R.init_router(CFG, e, jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    state = opt.init(rp)
    full = float(C.cost(CFG, e, {}))

    def loss_fn(rp, step, key):
        tau, scale = R.schedules(e, step, steps)
        total = 0.0
        for i, b in enumerate(e.budgets):
            out = R.route(rp, CFG, e, R.budget_code_from_index(e, i), jax.random.fold_in(key, i), tau, scale)
            total = total + C.budget_loss(CFG, e, out, b, b == 1.0)
        return total

    @jax.jit
    def step_fn(rp, state, step):
        g = jax.grad(loss_fn)(rp, step, R.router_key(jax.random.PRNGKey(5), step))
        upd, state = opt.update(g, state, rp)
        return optax.apply_updates(rp, upd), state

    for s in range(steps):
        rp, state = step_fn(rp, state, s)
    tau, scale = R.schedules(e, steps, steps)
    for i, b in enumerate(e.budgets):
        out = R.route(rp, CFG, e, R.budget_code(e, b), None, tau, scale)
        ratio = float(C.cost(CFG, e, C.expected_widths(out, e, CFG))) / (b * full)
        assert abs(ratio - 1) < e.dead_zone + 1e-3, (b, ratio)
    w = R.budget_widths(rp, CFG, e, 1.0)
    assert w.hidden == CFG.hidden_size and np.all(np.atleast_1d(w.ffn) == CFG.intermediate_size)
