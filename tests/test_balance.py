"""Aux-loss-free MoE load balancing (issue 14): the correction bias moves toward under-loaded
experts after each step, outside the optimizer; it keeps the tiny parent's routing balanced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.model import layers as L
from elastic_jax.train import OptimConfig
from elastic_jax.train.balance import routing_entropy, update_expert_bias
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
