"""Training mechanics of the paper / official code (issue 14): budgets on several costs, the
official budget-loss and anchor formulas, straight-through hard samples, the depth head."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from elastic_jax.elastic import cost as C
from elastic_jax.elastic import router as R
from elastic_jax.elastic.config import BudgetTarget, ElasticConfig

# experts dominate the total size (like 30B-A3B), so total and active budgets pull apart
MOE = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="MEME", vocab_size=64, n_routed_experts=16,
                         num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=16,
                         mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=8)


# ------------------------------------------------------------ NumPy transcription (METHOD §6.2, §6.4)
def np_param_count(cfg, d, active):
    """METHOD §6.4 counter (shared expert h·shared per matrix, the model's n_groups), NumPy float64."""
    D = d.get("hidden", cfg.hidden_size)
    per = lambda axis, full, n: np.broadcast_to(np.asarray(d.get(axis, full), np.float64), (n,))
    gates = np.asarray(d.get("layers", np.ones(cfg.num_hidden_layers)), np.float64)
    total = 2 * cfg.vocab_size * D + D
    kinds = {c: [i for i, ch in enumerate(cfg.pattern) if ch == c] for c in "ME*-"}
    P, G, N, K = cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    H = per("mamba_heads", cfg.mamba_num_heads, len(kinds["M"]))
    for j, l in enumerate(kinds["M"]):
        di = H[j] * P
        total += gates[l] * (D + D * (2 * di + 2 * G * N + H[j]) + (di + 2 * G * N) * (K + 1) + 3 * H[j] + di
                             + di * D)
    E = per("moe_experts", cfg.n_routed_experts, len(kinds["E"]))
    W = per("moe_ffn", cfg.moe_intermediate_size, len(kinds["E"]))
    for j, l in enumerate(kinds["E"]):
        ne = cfg.num_experts_per_tok if active else E[j]
        total += gates[l] * (D + D * E[j] + E[j] + 2 * (ne * D * W[j] + D * cfg.moe_shared_expert_intermediate_size))
    return total


def np_budget_loss(cfg, ecfg, probs, opts, budget_idx):
    """Official budget_loss_func: d̄ = π·options; Σ_t w_t |cost_t/(r_t·full_t) − 1| dead-zoned at 5%;
    at budget 1.0 add 10·Σ_axes MSE(π, one_hot(0)) (MSE over every element: layers and options)."""
    d = {a: (np.asarray(probs[a], np.float64) * np.asarray(opts[a], np.float64)).sum(-1) for a in opts}
    full = budget_idx == 0
    loss = 0.0
    for t in ecfg.targets():
        r = ecfg.budgets[budget_idx] if t.ratios is None else t.ratios[budget_idx]
        active = t.cost_kind == "active"
        diff = abs(np_param_count(cfg, d, active) / (r * np_param_count(cfg, {}, active)) - 1)
        loss += t.weight * (diff if (full or diff >= 0.05) else 0.0)
    if full:
        for p in probs.values():
            p = np.asarray(p, np.float64)
            loss += 10.0 * np.mean((p - np.eye(p.shape[-1])[0]) ** 2)
    return loss


def _fixed_probs(cfg, ecfg, seed):
    rng = np.random.default_rng(seed)
    opts = ecfg.options(cfg)
    probs = {}
    for a, o in opts.items():
        n = 1 if (a == "hidden" or not ecfg.heterogeneous) else cfg.count({"mamba_heads": "M", "moe_experts": "E",
                                                                            "moe_ffn": "E"}[a])
        p = rng.dirichlet(np.ones(o.shape[-1]), size=n).astype(np.float32)
        probs[a] = p[0] if (a == "hidden" or not ecfg.heterogeneous) else p
    return probs, opts


@pytest.mark.parametrize("heterogeneous", [False, True])
@pytest.mark.parametrize("targets", [None, (BudgetTarget("params", (1.0, 0.6, 0.45)),
                                            BudgetTarget("active", (1.0, 0.85, 0.7), weight=0.5))])
def test_budget_loss_and_anchor_equal_numpy_transcription(heterogeneous, targets):
    e = ElasticConfig(budgets=(1.0, 0.8, 0.6), hidden_options=(1.0, 0.75, 0.5), mamba_options=(1.0, 0.5),
                      ffn_options=None, moe_expert_options=(1.0, 0.75, 0.5), moe_ffn_options=(1.0, 0.5),
                      heterogeneous=heterogeneous, budget_target="total", budget_targets=targets)
    for seed in range(3):
        probs, opts = _fixed_probs(MOE, e, seed)
        out = R.RouterOutput(probs={a: jnp.asarray(p) for a, p in probs.items()}, choice=None, soft_widths=None)
        for i, b in enumerate(e.budgets):
            got = float(C.budget_loss(MOE, e, out, b, i == 0, budget_idx=i))
            want = np_budget_loss(MOE, e, probs, opts, i)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (seed, b)
        # the anchor alone: Σ_axes mean over layers and options
        want_anchor = sum(np.mean((np.asarray(p, np.float64) - np.eye(p.shape[-1])[0]) ** 2) for p in probs.values())
        assert float(C.anchor_term(out.probs)) == pytest.approx(want_anchor, rel=1e-5)


def test_budget_targets_config_and_paper_run():
    """The paper's 30B-A3B run: 23B total / 2.8B active and 12B / 2.0B, expressed directly."""
    e = ElasticConfig(budgets=(1.0, 0.75, 0.4),
                      budget_targets=(BudgetTarget("params", (1.0, 23 / 31.6, 12 / 31.6)),
                                      dict(kind="active", ratios=[1.0, 2.8 / 3.6, 2.0 / 3.6], weight=1.0)))
    assert [t.cost_kind for t in e.targets()] == ["total", "active"]
    assert e.targets()[1].ratios == pytest.approx((1.0, 2.8 / 3.6, 2.0 / 3.6))
    assert ElasticConfig.from_dict(e.to_dict()) == e
    # ratios follow the budgets when those are given unsorted
    e2 = ElasticConfig(budgets=(0.4, 1.0), budget_targets=(BudgetTarget("active", (0.5, 1.0)),))
    assert e2.targets()[0].ratios == (1.0, 0.5)
    with pytest.raises(ValueError, match="one per budget"):
        ElasticConfig(budgets=(1.0, 0.5), budget_targets=(BudgetTarget("active", (1.0,)),))
    with pytest.raises(ValueError, match="BudgetTarget.kind"):
        BudgetTarget("latency")
    with pytest.raises(ValueError, match="layer_ranking"):
        ElasticConfig(depth_options=(1.0, 0.5))
    assert ElasticConfig().hard_sample_prob == 0.004


def _train_router(cfg, e, steps, lr=1e-2):
    rp = R.init_router(cfg, e, jax.random.PRNGKey(0))
    opt = optax.adam(lr)
    state = opt.init(rp)

    def loss_fn(rp, step, key):
        tau, scale = R.schedules(e, step, steps)
        total = 0.0
        for i, b in enumerate(e.budgets):
            out = R.route(rp, cfg, e, R.budget_code_from_index(e, i), jax.random.fold_in(key, i), tau, scale)
            total = total + C.budget_loss(cfg, e, out, b, i == 0, budget_idx=i)
        return total

    @jax.jit
    def run(rp, state):
        def body(carry, s):
            rp, state = carry
            g = jax.grad(loss_fn)(rp, s, R.router_key(jax.random.PRNGKey(5), s))
            upd, state = opt.update(g, state, rp)
            return (optax.apply_updates(rp, upd), state), None
        (rp, state), _ = jax.lax.scan(body, (rp, state), jnp.arange(steps))
        return rp
    return run(rp, state)


def test_router_meets_total_and_active_targets_at_once():
    """Budget loss alone: the expected total and active sizes both land within 5% of their targets,
    and the smallest budget shrinks the expert count (an active-only budget would not)."""
    # targets at reachable option combinations (a target between grid points leaves the argmax
    # submodel up to one grid step away): (8 experts, expert width 24) and (hidden 24, 4 experts,
    # expert width 24); an active-only budget would never shrink the expert count here
    targets = (BudgetTarget("params", (1.0, 0.496, 0.26)), BudgetTarget("active", (1.0, 0.897, 0.672)))
    e = ElasticConfig(budgets=(1.0, 0.7, 0.5), hidden_options=(1.0, 0.75, 0.5), mamba_options=(1.0, 0.5),
                      ffn_options=None, moe_expert_options=(1.0, 0.75, 0.5, 0.25), moe_ffn_options=(1.0, 0.75, 0.5),
                      budget_targets=targets, router_dim=32)
    steps = 400
    rp = _train_router(MOE, e, steps)
    full = {k: ej.param_count(MOE, active=k == "active") for k in ("total", "active")}
    for i, b in enumerate(e.budgets):          # the submodel the router picks (argmax, no noise)
        w = R.budget_widths(rp, MOE, e, b)
        for t in targets:
            ratio = ej.param_count(MOE, w, active=t.cost_kind == "active") / full[t.cost_kind]
            assert abs(ratio / t.ratios[i] - 1) < 0.05, (b, t.kind, ratio, w)
    assert int(np.max(R.budget_widths(rp, MOE, e, e.budgets[-1]).moe_experts)) < MOE.n_routed_experts


RANKING = (0, 3, 1, 2)


@pytest.mark.slow
def test_depth_head_gets_gradient_and_meets_a_depth_only_budget():
    # the two top-ranked layers (0: M, 3: E) are 0.525 of the total size
    e = ElasticConfig(budgets=(1.0, 0.53), hidden_options=None, mamba_options=None, ffn_options=None,
                      moe_expert_options=None, moe_ffn_options=None, depth_options=(4, 3, 2),
                      layer_ranking=RANKING, budget_target="total", router_dim=32)
    rp = R.init_router(MOE, e, jax.random.PRNGKey(0))
    assert set(rp) == {"layers"}
    g = jax.grad(lambda rp: C.budget_loss(MOE, e, R.route(rp, MOE, e, R.budget_code_from_index(e, 1),
                                                          jax.random.PRNGKey(1), 1.0, 1.0), 0.53, False))(rp)
    assert float(jnp.abs(g["layers"]["w2"]).sum()) > 0
    steps = 300
    rp = _train_router(MOE, e, steps)
    w = R.budget_widths(rp, MOE, e, 0.53)
    assert abs(ej.param_count(MOE, w) / ej.param_count(MOE) / 0.53 - 1) < 0.05
    assert sum(w.layers) < 4 and all(w.layers[l] for l in RANKING[:sum(w.layers)])   # the top-ranked kept
    assert R.budget_widths(rp, MOE, e, 1.0).layers == (True,) * 4


# -------------------------------------------------------------- model forward: hard samples, depth
SMALL = MOE.replace(hybrid_override_pattern="ME*-E", intermediate_size=32)
E_ALL = ElasticConfig(budgets=(1.0, 0.6), hidden_options=(1.0, 0.5), mamba_options=(1.0, 0.5), attn_options=None,
                      mamba_channel_options=(1.0, 0.5),
                      ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5), moe_ffn_options=(1.0, 0.5),
                      depth_options=(5, 4), layer_ranking=(0, 1, 3, 2, 4), heterogeneous=True, router_dim=16)


@pytest.fixture(scope="module")
def small():
    params = ej.init_params(SMALL, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, SMALL.vocab_size)
    return params, tokens


@pytest.mark.slow
def test_hard_forward_equals_widths_and_every_head_gets_kd_gradient(small):
    params, tokens = small
    teacher = jax.random.normal(jax.random.PRNGKey(4), (2, 8, SMALL.vocab_size))
    e = E_ALL
    rp = R.init_router(SMALL, e, jax.random.PRNGKey(1))
    code, key = R.budget_code_from_index(e, 1), jax.random.PRNGKey(0)     # draws a real submodel
    fwd = jax.jit(lambda p, t, w: ej.forward(p, t, SMALL, w))

    def kd(rp):
        out = R.route(rp, SMALL, e, code, key, 1.0, 1.0, hard=True)
        return jnp.mean(jnp.square(ej.forward(params, tokens, SMALL, out.soft_widths) - teacher) * 1e4), out

    (loss, out), g = jax.jit(jax.value_and_grad(kd, has_aux=True))(rp)
    assert set(g) == {"hidden", "mamba_heads", "mamba_channels", "ffn", "moe_experts", "moe_ffn", "layers"}
    for axis in g:
        assert float(jnp.abs(g[axis]["w2"]).sum()) > 1e-7, f"no hard-mode KD gradient to the {axis} head"
    widths = R.choices_to_widths(SMALL, e, jax.device_get(out.choice))
    assert not all(widths.layers) and widths.hidden < SMALL.hidden_size        # a real submodel was drawn
    hard_logits = fwd(params, tokens, out.soft_widths)
    np.testing.assert_allclose(hard_logits, fwd(params, tokens, widths.to_soft(SMALL)), atol=1e-6, rtol=0)
    # ... and the sliced model of those widths (dropped layer included)
    sub_cfg, sub = ej.slice_params(params, SMALL, widths)
    assert sub_cfg.num_hidden_layers == sum(widths.layers)
    np.testing.assert_allclose(jax.jit(lambda p, t: ej.forward(p, t, sub_cfg))(sub, tokens), hard_logits,
                               atol=2e-5, rtol=0)




# ------------------------------------------------------------------ long-context stage 2
def test_stage2_batches_hold_documents_longer_than_stage1_rows():
    from elastic_jax.data import DataConfig, make_dataset
    from elastic_jax.train import Stage, TrainConfig
    ds = make_dataset(DataConfig(kind="synthetic", num_documents=64, synthetic_len=(8, 96)), 256)
    s1 = Stage("short", seq_len=32, batch_size=4, steps=1)
    s2 = Stage("long", seq_len=128, batch_size=4, steps=1, min_doc_len=s1.seq_len + 1)

    def doc_lengths(batch):
        seg = np.asarray(batch["segment_ids"])
        return [int((row == s).sum()) for row in seg for s in np.unique(row) if s > 0]

    short = next(ds.batches(s1.seq_len, s1.batch_size, process_index=0, process_count=1))
    assert max(doc_lengths(short)) <= s1.seq_len
    lens = []
    stream = ds.batches(s2.seq_len, s2.batch_size, process_index=0, process_count=1, min_doc_len=s2.min_doc_len)
    for _ in range(3):
        lens += doc_lengths(next(stream))
    assert lens and min(lens) > s1.seq_len                     # every stage-2 document is a long one
    # a per-stage source round-trips through the run config (checkpoint metadata)
    tc = TrainConfig(stages=(s1, Stage("long", seq_len=128, batch_size=4, steps=1, min_doc_len=33,
                                       data=DataConfig(kind="synthetic", synthetic_len=(64, 128)))))
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="min_doc_len"):
        ds.batches(128, 4, process_index=0, process_count=1, min_doc_len=10_000)


# ------------------------------------------------------------------ Mamba head channels
def test_mamba_channels_masked_equals_sliced_and_cost_is_exact(small):
    params, tokens = small
    w = ej.Widths(hidden=16, mamba_heads=4, mamba_channels=2, moe_experts=8, layers=(True, True, False, True, True))
    sub_cfg, sub = ej.slice_params(params, SMALL, w)
    assert sub_cfg.mamba_head_dim == 2 and sub["layers"][0]["mixer"]["out_proj"].shape == (8, 16)
    np.testing.assert_allclose(jax.jit(lambda p, t: ej.forward(p, t, sub_cfg))(sub, tokens),
                               jax.jit(lambda p, t, w: ej.forward(p, t, SMALL, w))(params, tokens, w.resolve(SMALL)),
                               atol=2e-5, rtol=0)
    d = {"hidden": 16, "mamba_heads": 4, "mamba_channels": 2, "moe_experts": 8,
         "layers": jnp.asarray([1, 1, 0, 1, 1], jnp.float32)}
    for active in (False, True):
        assert float(C.param_cost(SMALL, d, active)) == ej.param_count(SMALL, w, active)
    with pytest.raises(ValueError, match="mamba_channels"):
        ej.sliced_config(SMALL.replace(hybrid_override_pattern="MEM"), ej.Widths(mamba_channels=(2, 4)))
