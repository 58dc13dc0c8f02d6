"""Gumbel noise per data shard (issue 14, METHOD §5.2/§7.2): with `gumbel_groups` = G the micro-batch's
rows split into G groups, each routed with its own key fold_in(k, g) at the shared budget; the loss
is the all-rows KL plus the group-mean budget loss. Checked against a hand computation that calls
the router and the model directly, group by group."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.model.decoder import final_hidden
from elastic_jax.elastic import cost as C
from elastic_jax.elastic import router as R
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.train.config import Stage, TrainConfig
from elastic_jax.train.losses import chunked_kl
from elastic_jax.train.step import StepSpec, micro_loss

CFG = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="M*E", vocab_size=64, n_routed_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                         mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16)
ECFG = ElasticConfig(budgets=(1.0, 0.6), hidden_options=(1.0, 0.5), mamba_options=(1.0, 0.5), ffn_options=None,
                     moe_expert_options=(1.0, 0.5), moe_ffn_options=(1.0, 0.5), router_dim=16,
                     hard_sample_prob=0.0)
B, L, TAU, SCALE, BIDX = 4, 8, 1.0, 1.0, 1
_hidden = jax.jit(final_hidden, static_argnums=2)


@pytest.fixture(scope="module")
def setup():
    teacher = ej.init_params(CFG, jax.random.PRNGKey(0))
    student = jax.tree.map(lambda x: x * 1.1 + 0.01, teacher)
    router = R.init_router(CFG, ECFG, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (B, L)), jnp.int32)
    seg = jnp.ones_like(tokens)
    x_t = _hidden(teacher, tokens, CFG, None, segment_ids=seg)
    trainable = {"params": student, "router": router}
    key = jax.random.PRNGKey(7)
    losses = {}
    for G in (1, 2):
        spec = StepSpec("elastic", CFG, CFG, ECFG, 1.0, None, 1, gumbel_groups=G, expert_bias_rate=1e-3)
        fn = jax.jit(lambda tr, k, spec=spec: micro_loss(spec, tr, x_t, teacher["lm_head"], tokens, seg, k,
                                                         jnp.asarray(BIDX), TAU, SCALE))
        losses[G] = fn(trainable, key)
    return teacher, trainable, tokens, seg, x_t, key, losses


def _by_hand(teacher, trainable, tokens, seg, x_t, key, G):
    """The per-group losses, from route / final_hidden / chunked_kl called directly."""
    k_gumbel, _ = jax.random.split(key)
    code = R.budget_code_from_index(ECFG, BIDX)
    rows = B // G
    out = []
    for g in range(G):
        kg = k_gumbel if G == 1 else jax.random.fold_in(k_gumbel, g)
        rout = R.route(trainable["router"], CFG, ECFG, code, kg, TAU, SCALE)
        sl = slice(g * rows, (g + 1) * rows)
        x_s = _hidden(trainable["params"], tokens[sl], CFG, rout.soft_widths, segment_ids=seg[sl])
        kl = jnp.mean(chunked_kl(x_t[sl], teacher["lm_head"], x_s, trainable["params"]["lm_head"], chunk=None))
        bl = C.budget_loss(CFG, ECFG, rout, jnp.asarray(ECFG.budgets[BIDX]), False, budget_idx=BIDX)
        out.append((kl + ECFG.budget_weight * bl, rout))
    return out


@pytest.mark.slow
def test_one_group_is_the_single_sample(setup):
    teacher, trainable, tokens, seg, x_t, key, losses = setup
    (want, rout), = _by_hand(teacher, trainable, tokens, seg, x_t, key, 1)
    loss, aux = losses[1]
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-7)
    for a in rout.choice:
        np.testing.assert_array_equal(np.asarray(aux["choice"][a]), np.asarray(rout.choice[a]))


def test_two_groups_draw_different_samples_and_average_the_group_losses(setup):
    teacher, trainable, tokens, seg, x_t, key, losses = setup
    per_group = _by_hand(teacher, trainable, tokens, seg, x_t, key, 2)
    (l0, r0), (l1, r1) = per_group
    # different Gumbel noise: the groups train different soft widths under the same budget
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(r0.soft_widths), jax.tree.leaves(r1.soft_widths)) if a.size)
    assert diff > 1e-3
    loss, aux = losses[2]
    np.testing.assert_allclose(float(loss), (float(l0) + float(l1)) / 2, rtol=1e-5, atol=1e-6)
    assert float(loss) != pytest.approx(float(losses[1][0]), rel=1e-6)
    # the MoE loads of both groups are counted: every routed token of the micro-batch
    np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), B * L * CFG.num_experts_per_tok)


def test_gumbel_groups_validation():
    with pytest.raises(ValueError, match="gumbel_groups"):
        TrainConfig(stages=(Stage(steps=1, batch_size=4),), microbatches=2, gumbel_groups=3)
    with pytest.raises(ValueError, match="gumbel_groups"):
        TrainConfig(gumbel_groups=0)
    with pytest.raises(ValueError, match="gumbel_groups"):
        StepSpec("elastic", CFG, CFG, ECFG, gumbel_groups=0)
    assert TrainConfig(stages=(Stage(steps=1, batch_size=8),), microbatches=2, gumbel_groups=2).gumbel_groups == 2


@pytest.mark.slow   # fast tier: over 100 s of CPU; the full suite runs it
def test_balancing_deviation_counts_only_the_sampled_active_experts(setup):
    """issue 30: micro_loss's `expert_dev` is balance.load_deviation of its routing counts over the
    experts the sampled widths keep (the per-group sum with two groups)."""
    from elastic_jax.train.balance import active_experts, load_deviation
    teacher, trainable, tokens, seg, x_t, key, losses = setup
    for G in (1, 2):
        per_group = _by_hand(teacher, trainable, tokens, seg, x_t, key, G)
        want = 0.0
        for g, (_, rout) in enumerate(per_group):
            sl = slice(g * (B // G), (g + 1) * (B // G))
            _, loads = final_hidden(trainable["params"], tokens[sl], CFG, rout.soft_widths, segment_ids=seg[sl],
                                    return_expert_load=True)
            want = want + load_deviation(jnp.stack(loads), active_experts(CFG, rout.soft_widths))
        np.testing.assert_allclose(np.asarray(losses[G][1]["expert_dev"]), np.asarray(want), atol=1e-4)
