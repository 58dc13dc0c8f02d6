"""Aux-loss-free MoE load balancing (issue 14): the correction bias moves toward under-loaded
experts after each step, outside the optimizer; it keeps the tiny parent's routing balanced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.model import layers as L
from elastic_jax.model.kinds.moe import MoEMasks
from elastic_jax.train import OptimConfig
from elastic_jax.train.balance import active_experts, load_deviation, routing_entropy, update_expert_bias
from elastic_jax.train.optim import make_optimizer
from elastic_jax.train.step import StepSpec, make_step

CFG = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="ME", vocab_size=64, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                         mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=8)


def test_update_moves_bias_toward_underloaded_experts():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    load = jnp.asarray([[10.0, 0.0, 5.0, 5.0, 8.0, 2.0, 5.0, 5.0]])
    new = update_expert_bias(params, CFG, load, 0.01)
    delta = new["layers"][1]["mixer"]["e_score_correction_bias"] - params["layers"][1]["mixer"]["e_score_correction_bias"]
    np.testing.assert_allclose(delta, 0.01 * np.array([-1, 1, 0, 0, -1, 1, 0, 0]), atol=1e-7)
    assert new["layers"][0] is params["layers"][0]                      # the Mamba layer untouched
    assert float(routing_entropy(jnp.ones((1, 8)))[0]) == pytest.approx(1.0)
    assert float(routing_entropy(jnp.asarray([[1.0] + [0.0] * 7]))[0]) == pytest.approx(0.0)


def _loads_reference(params, tokens, seg):
    """Independent count: route the MoE layer's normed input with layers.route, count valid picks."""
    _, hid = ej.hidden_states(params, tokens, CFG)
    x = L.rms_norm(hid[0], params["layers"][1]["norm"], CFG.layer_norm_epsilon)
    idx, _ = L.route(params["layers"][1]["mixer"], x.reshape(-1, CFG.hidden_size), CFG, None)
    w = np.repeat(np.asarray(seg > 0).reshape(-1), CFG.num_experts_per_tok)
    return np.bincount(np.asarray(idx).reshape(-1), weights=w, minlength=CFG.n_routed_experts)


RATE = 1e-2
_TX = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 100)
_FNS = {}


def _lm_run(params, rate, steps, batch):
    """`steps` LM steps; returns the final state (the compiled step is shared per rate)."""
    if rate not in _FNS:
        spec = StepSpec("lm", CFG, None, None, 1.0, None, 1, False, True, expert_bias_rate=rate)
        _FNS[rate] = jax.jit(make_step(spec, _TX))
    state = {"params": params, "router": {}, "opt_state": _TX.init({"params": params, "router": {}})}
    for s in range(steps):
        state, m = _FNS[rate](state, None, batch, s, 1.0, 1.0, jnp.ones((1,)), jax.random.PRNGKey(0))
    return state


@pytest.fixture(scope="module")
def setup():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    # a skewed start (as after unbalanced pre-training): a few experts win most top-k choices
    bias = jnp.asarray([0.3, 0.2, 0.0, 0.0, -0.2, -0.2, -0.3, -0.3])
    params["layers"][1]["mixer"]["e_score_correction_bias"] = bias
    rng = np.random.default_rng(0)
    base = rng.integers(0, CFG.vocab_size, (4, 8))
    tokens = np.concatenate([base, base, base, base], 1)[None]                  # [1, 4, 32] learnable
    seg = np.ones_like(tokens)
    seg[0, 0, -5:] = 0                                                           # some padding
    return params, {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(seg, jnp.int32)}


@pytest.mark.slow
def test_step_updates_bias_from_the_routing_counts(setup):
    params, batch = setup
    ref = _loads_reference(params, batch["tokens"][0], batch["segment_ids"][0])
    state = _lm_run(params, RATE, 1, batch)
    delta = np.asarray(state["params"]["layers"][1]["mixer"]["e_score_correction_bias"]) - np.asarray(
        params["layers"][1]["mixer"]["e_score_correction_bias"])
    np.testing.assert_allclose(delta, RATE * np.sign(ref.mean() - ref), atol=1e-7)
    assert ref.sum() == (np.asarray(batch["segment_ids"]) > 0).sum() * CFG.num_experts_per_tok


def test_balancing_keeps_the_parent_routing_entropy_high(setup):
    params, batch = setup
    steps = 40
    ent = {}
    for rate in (RATE, 0.0):
        p = _lm_run(params, rate, steps, batch)["params"]
        load = _loads_reference(p, batch["tokens"][0], batch["segment_ids"][0])
        ent[rate] = float(routing_entropy(jnp.asarray(load)[None])[0])
    print(f"normalized routing entropy after {steps} LM steps: with balancing {ent[RATE]:.3f}, "
          f"without {ent[0.0]:.3f}")
    assert ent[RATE] > 0.9
    assert ent[RATE] > ent[0.0]


# ---------------------------------------------------------------- elastic expert counts (issue 30)
def test_masked_experts_take_no_part_in_the_update():
    """A 4-of-8-expert budget: the 4 masked experts' bias is unchanged; the active ones balance
    among themselves (mean over the 4 active loads, not over all 8)."""
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    active = active_experts(CFG, ej.Widths(moe_experts=4))
    np.testing.assert_array_equal(np.asarray(active), [[True] * 4 + [False] * 4])
    assert active_experts(CFG, None) is None
    # soft router mixtures over 8 / 6 / 4 experts: an expert counts when >= half the mass keeps it
    soft = lambda p: ej.SoftWidths.from_options(CFG, {"moe_experts": [8, 6, 4]}, {"moe_experts": p})
    np.testing.assert_array_equal(np.asarray(active_experts(CFG, soft([0.9, 0.05, 0.05]))), [[True] * 8])
    np.testing.assert_array_equal(np.asarray(active_experts(CFG, soft([0.1, 0.2, 0.7]))),
                                  [[True] * 4 + [False] * 4])
    np.testing.assert_array_equal(np.asarray(active_experts(CFG, soft([0.3, 0.3, 0.4]))),
                                  [[True] * 6 + [False] * 2])
    load = jnp.asarray([[10.0, 2.0, 5.0, 7.0, 0.0, 0.0, 0.0, 0.0]])             # active mean 6
    old = update_expert_bias(params, CFG, load, 0.01)
    new = update_expert_bias(params, CFG, load, 0.01, active=active)
    b0 = params["layers"][1]["mixer"]["e_score_correction_bias"]
    np.testing.assert_allclose(old["layers"][1]["mixer"]["e_score_correction_bias"] - b0,
                               0.01 * np.array([-1, 1, -1, -1, 1, 1, 1, 1]), atol=1e-7)
    np.testing.assert_allclose(new["layers"][1]["mixer"]["e_score_correction_bias"] - b0,
                               0.01 * np.array([-1, 1, 1, -1, 0, 0, 0, 0]), atol=1e-7)
    with pytest.raises(ValueError, match="exactly one"):
        update_expert_bias(params, CFG, load, 0.01, deviation=load)


def _simulate(rule: str, steps: int = 3000, rate: float = 1e-3, tokens: int = 256):
    """Routing under uniformly sampled 8 / 6 / 4-expert budgets (the main job's expert options), the
    bias updated after every step by the old rule (every expert counted, masked ones as load 0) or the
    new one (active experts only). Returns the full model's normalized routing entropy and the share of
    its tokens on the two last (least important) experts, after `steps` steps."""
    mixer = ej.init_params(CFG, jax.random.PRNGKey(1))["layers"][1]["mixer"]
    x = jax.random.normal(jax.random.PRNGKey(2), (tokens, CFG.hidden_size))
    counts = (8, 6, 4)
    active = jnp.stack([active_experts(CFG, ej.Widths(moe_experts=k)) for k in counts])    # [3, 1, E]

    def loads(bias, k):
        el = MoEMasks(expert_counts=jnp.asarray([k]), expert_probs=jnp.ones((1,)))
        idx, _ = L.route(dict(mixer, e_score_correction_bias=bias), x, CFG, el)
        return jnp.zeros(CFG.n_routed_experts).at[idx.reshape(-1)].add(1.0)[None]       # [1, E]

    def step(bias, key):
        b = jax.random.randint(key, (), 0, len(counts))
        load = loads(bias, jnp.asarray(counts)[b])
        dev = load_deviation(load, None if rule == "old" else active[b])
        return bias + rate * jnp.sign(dev[0]), None

    bias0 = jnp.zeros(CFG.n_routed_experts)
    bias, _ = jax.jit(lambda b0: jax.lax.scan(step, b0, jax.random.split(jax.random.PRNGKey(3), steps)))(bias0)
    full = loads(bias, jnp.asarray(8))
    return float(routing_entropy(full)[0]), float(full[0, -2:].sum() / full.sum()), \
        float(routing_entropy(loads(bias0, jnp.asarray(8)))[0])


def test_old_rule_collapses_routing_new_rule_holds_it():
    old_h, old_tail, h0 = _simulate("old")
    new_h, new_tail, _ = _simulate("new")
    print(f"full-model routing entropy after 3000 steps: start {h0:.3f}, old rule {old_h:.3f} "
          f"({old_tail:.0%} of tokens on the 2 tail experts), new rule {new_h:.3f} ({new_tail:.0%})")
    assert old_h < 0.7 and old_tail > 0.5             # the collapse onto the tail experts
    assert new_h > 0.95 and new_tail < 0.35           # held near uniform (2/8 = 25% on the tail)
