"""Layers under lax.scan (ComputePolicy.scan_layers) == the unrolled loop: forward (full, soft-masked,
dropped layers), gradients under every remat policy, masked == sliced, the training step; the
stack / unstack boundary; the training loop's one-step-late metrics with no other device->host read."""
import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from conftest import tiny_config
from elastic_jax.model.decoder import final_hidden
from elastic_jax.model.policy import REMAT_POLICIES, remat_policy
from elastic_jax.model.scan import stack_layers, unstack_layers, unstackable_reason

CFG = tiny_config("MEM*E-", moe_shared_expert_intermediate_size=24)
SCAN = ej.ComputePolicy(scan_layers=True)
UNROLLED = ej.ComputePolicy()


def _params(seed=0):
    params = ej.init_params(CFG, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _soft(seed):
    """Random two-option mixes on every axis, per-layer probabilities, and soft / dropped layer gates."""
    rng = np.random.default_rng(seed)
    options = {"hidden": [32, 16], "mamba_heads": [4, 2], "attn_heads": [4, 2], "ffn": [48, 20],
               "moe_experts": [4, 2], "moe_ffn": [16, 8]}
    probs = {"hidden": rng.dirichlet([1, 1])}
    for a in ("mamba_heads", "attn_heads", "ffn", "moe_experts", "moe_ffn"):
        n = CFG.count({"mamba_heads": "M", "attn_heads": "*", "ffn": "-"}.get(a, "E"))
        probs[a] = rng.dirichlet([1, 1], size=n)
    gates = np.array([1.0, 0.0, 0.7, 1.0, 0.0, 1.0], np.float32)        # two layers dropped
    return ej.SoftWidths.from_options(CFG, options, probs, layers=gates)


@pytest.fixture(scope="module")
def setup():
    params = _params()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, CFG.vocab_size)
    fwd = jax.jit(ej.forward, static_argnums=(2,), static_argnames=("policy",))
    return params, tokens, fwd


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.slow
def test_scanned_forward_equals_unrolled(setup, masked):
    params, tokens, fwd = setup
    w = _soft(0) if masked else None
    ref = fwd(params, tokens, CFG, w, policy=UNROLLED)
    got = fwd(params, tokens, CFG, w, policy=SCAN)
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
    # pre-stacked parameters (no copy inside the step) give the same logits
    stacked = stack_layers(params, CFG)
    assert set(stacked["layers"]) == {"M", "E", "*", "-"} and stacked["layers"]["M"]["norm"].shape == (2, 32)
    np.testing.assert_allclose(fwd(stacked, tokens, CFG, w, policy=SCAN), ref, atol=2e-6, rtol=1e-5)


def test_stack_unstack_roundtrip_and_hidden_states(setup):
    params, tokens, _ = setup
    back = unstack_layers(stack_layers(params, CFG), CFG)
    chex.assert_trees_all_equal(back, params)
    hidden = jax.jit(ej.hidden_states, static_argnums=(2,), static_argnames=("policy",))
    lg_a, hs_a = hidden(params, tokens, CFG, policy=UNROLLED)
    lg_b, hs_b = hidden(params, tokens, CFG, policy=SCAN)
    assert len(hs_b) == CFG.num_hidden_layers
    for a, b in zip(hs_a, hs_b):
        np.testing.assert_allclose(b, a, atol=2e-6, rtol=1e-5)


@pytest.mark.slow   # fast tier: over 100 s of CPU; the full suite runs it
def test_gradients_equal_under_every_remat_policy(setup):
    params, tokens, _ = setup
    w = _soft(1)

    axes = [f.name for f in dataclasses.fields(w)
            if f.name not in ("layers", "mask_form") and getattr(w, f.name) is not None]
    floats = {"probs": {a: getattr(w, a)[1] for a in axes}, "gates": w.layers}

    def loss(p, fl, policy):      # differentiable in the parameters, the option probabilities and the gates
        sw = ej.SoftWidths(**{a: (getattr(w, a)[0], fl["probs"][a]) for a in axes}, layers=fl["gates"])
        return jnp.mean(ej.forward(p, tokens, CFG, sw, policy=policy) ** 2)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2,))
    grads = lambda policy: grad_fn(params, floats, policy)
    ref = grads(UNROLLED)
    assert float(jnp.abs(ref[1]["gates"]).max()) > 0
    for policy in (ej.ComputePolicy(scan_layers=True, remat="minimal"), ej.ComputePolicy(scan_layers=True, remat="full"),
                   ej.ComputePolicy(remat="save_dots")):
        chex.assert_trees_all_close(grads(policy), ref, atol=1e-6, rtol=1e-4, custom_message=str(policy))


def _grad_temp_bytes(pattern: str, length: int) -> int:
    """Temporary bytes of the compiled gradient of the scanned, rematerialized forward (XLA:CPU)."""
    cfg = tiny_config(pattern, max_position_embeddings=length)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), ej.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    policy = ej.ComputePolicy(scan_layers=True, remat="full")
    grad = jax.jit(jax.grad(lambda p, t: jnp.sum(ej.forward(p, t, cfg, policy=policy))))
    return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_kind_switch_holds_one_kind_at_a_time():
    """The scanned step switches on the layer kind; its backward pass must hold the internals of the
    kind being differentiated only (~max over kinds), not of every kind at once (~the sum: what a
    `lax.switch` under one step-level checkpoint costs, since it saves the union of the branches'
    residuals)."""
    alone = {k: _grad_temp_bytes(k, 2048) for k in ("M", "E")}
    both = _grad_temp_bytes("ME", 2048)
    assert min(alone.values()) > 0.25 * max(alone.values())       # both kinds weigh in: the test can fail
    assert both <= 1.1 * max(alone.values()), (both, alone)


def test_masked_equals_sliced_under_scan(setup):
    params, tokens, fwd = setup
    w = ej.Widths(hidden=16, mamba_heads=2, attn_heads=2, ffn=20, moe_experts=2, moe_ffn=8,
                  layers=(True, True, False, True, True, True))
    sub_cfg, sub = ej.slice_params(params, CFG, w)
    masked = fwd(params, tokens, CFG, w.resolve(CFG), policy=SCAN)
    np.testing.assert_allclose(fwd(sub, tokens, sub_cfg, policy=SCAN), masked, atol=2e-6, rtol=1e-5)
    # a heterogeneous sliced model cannot be stacked: it runs unrolled, saying why
    hw = ej.Widths(mamba_heads=(2, 4), ffn=20)
    het_cfg, het = ej.slice_params(params, CFG, hw)
    reason = unstackable_reason(het["layers"], het_cfg)
    assert reason is not None and "layer 2 ('M')" in reason and "heterogeneous" in reason
    with pytest.raises(ValueError, match="heterogeneous"):
        stack_layers(het, het_cfg)
    with pytest.warns(UserWarning, match="running the layers unrolled"):
        got = fwd(het, tokens, het_cfg, policy=SCAN)
    np.testing.assert_allclose(got, fwd(params, tokens, CFG, hw.resolve(CFG), policy=SCAN), atol=2e-6, rtol=1e-5)


def _scan_lengths(jaxpr):
    """Lengths of every lax.scan in a (closed) jaxpr, nested ones included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn.params["length"]
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _scan_lengths(sub)


@pytest.mark.parametrize("masked", [False, True])
def test_scanned_expert_loads_equal_unrolled(setup, masked):
    """The per-MoE-layer routing counts (aux-loss-free balancing) come out of the scanned loop,
    equal to the unrolled loop's, padding excluded, with the layers still under one scan."""
    params, tokens, _ = setup
    w = _soft(2) if masked else None
    seg = jnp.ones(tokens.shape, jnp.int32).at[0, -3:].set(0)

    def loads(p, policy):
        return final_hidden(p, tokens, CFG, w, segment_ids=seg, policy=policy, return_expert_load=True)

    x_ref, ref = jax.jit(loads, static_argnums=1)(params, UNROLLED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                     # no "running the layers unrolled"
        x_got, got = jax.jit(loads, static_argnums=1)(params, SCAN)
        assert CFG.num_hidden_layers in list(_scan_lengths(jax.make_jaxpr(loads, static_argnums=1)(params, SCAN)))
    assert len(got) == len(ref) == CFG.count("E")
    for a, b in zip(ref, got):
        assert b.shape == (CFG.n_routed_experts,) and b.dtype == jnp.float32
        np.testing.assert_array_equal(b, a)
        assert float(b.sum()) == (tokens.size - 3) * CFG.num_experts_per_tok
    if not masked:      # the two MoE layers route differently, so their order is checked (masked: 2 of 4 experts, top-2)
        assert not np.array_equal(ref[0], ref[1])
    np.testing.assert_allclose(x_got, x_ref, atol=2e-6, rtol=1e-5)


def test_remat_policy_names():
    assert remat_policy("none") is None
    assert remat_policy("minimal") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert set(REMAT_POLICIES) == {"none", "full", "save_dots", "minimal"}
    with pytest.raises(ValueError, match="remat"):
        ej.ComputePolicy(remat="sometimes")


@pytest.mark.slow   # fast tier: over 100 s of CPU; the full suite runs it
def test_train_step_with_scan_equals_without(setup):
    """The jitted training step (LM mode: masked scans are covered by the gradient test above) with
    aux-loss-free expert balancing on: the loads come out of the scan, no unrolled fallback."""
    from elastic_jax.train.config import OptimConfig
    from elastic_jax.train.optim import make_optimizer
    from elastic_jax.train.step import StepSpec, make_step
    params, tokens, _ = setup
    # eps = 1: Adam's first update is ~ lr·g (linear in the gradient, not lr·sign(g)), so the new
    # parameters compare the gradients themselves
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1.0), 10)
    batch = {"tokens": tokens[None], "segment_ids": jnp.ones((1,) + tokens.shape, jnp.int32)}

    def run(policy):
        spec = StepSpec("lm", CFG, microbatches=1, vocab_chunk=None, freeze_router=True, policy=policy,
                        expert_bias_rate=1e-2)
        state = {"params": params, "router": {}}
        state["opt_state"] = tx.init(state)
        step = jax.jit(make_step(spec, tx))
        args = (state, None, batch, jnp.int32(0), jnp.float32(1.0), jnp.float32(1.0), jnp.asarray([1.0]),
                jax.random.PRNGKey(0))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)                 # no "running the layers unrolled"
            traced = step.trace(*args)                                  # one trace, one compile
            return traced.lower().compile()(*args), list(_scan_lengths(traced.jaxpr))

    ((sa, ma), la), ((sb, mb), lb) = run(None), run(SCAN)
    assert CFG.num_hidden_layers in lb and CFG.num_hidden_layers not in la
    moe = [i for i, c in enumerate(CFG.pattern) if c == "E"]
    for i in moe:                                # the correction bias moved, equally
        bias = lambda s: np.asarray(s["params"]["layers"][i]["mixer"]["e_score_correction_bias"])
        assert np.abs(bias(sa) - np.asarray(params["layers"][i]["mixer"]["e_score_correction_bias"])).max() > 0
        np.testing.assert_array_equal(bias(sb), bias(sa))
    np.testing.assert_array_equal(mb["routing_entropy"], ma["routing_entropy"])
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    np.testing.assert_allclose(mb["grad_norm"], ma["grad_norm"], rtol=1e-4)
    chex.assert_trees_all_close(sb["params"], sa["params"], atol=1e-7, rtol=1e-4)


def test_loop_reads_metrics_one_step_late_and_nothing_else(tmp_path, monkeypatch):
    """No device->host transfer in the step loop but the previous step's metrics: run under
    jax.transfer_guard_device_to_host("disallow") (an implicit read, e.g. float(x), raises), and
    check the order of dispatches, reads and checkpoint saves."""
    from elastic_jax.data import DataConfig, make_dataset
    from elastic_jax.train import Checkpointer, OptimConfig, Stage, TrainConfig, train_lm
    from elastic_jax.train import loop
    cfg = ej.NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="*-", num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=64)
    events = []
    compile_step, read, save = loop.compile_step, loop._read_metrics, Checkpointer.save

    def counting_compile(*a, **kw):
        jitted, bspec = compile_step(*a, **kw)

        def dispatch(state, teacher, batch, step, *rest):
            events.append(("step", len([e for e in events if e[0] == "step"])))
            return jitted(state, teacher, batch, step, *rest)
        return dispatch, bspec

    def counting_read(tree):
        events.append(("read",))
        return read(tree)

    def counting_save(self, step, *a, **kw):
        events.append(("save", step))
        return save(self, step, *a, **kw)

    monkeypatch.setattr(loop, "compile_step", counting_compile)
    monkeypatch.setattr(loop, "_read_metrics", counting_read)
    monkeypatch.setattr(Checkpointer, "save", counting_save)
    ds = make_dataset(DataConfig(num_documents=32, synthetic_vocab=64), cfg.vocab_size)
    tc = TrainConfig(stages=(Stage(seq_len=16, batch_size=2, steps=5),), checkpoint_every=3, vocab_chunk=None,
                     optim=OptimConfig(lr=1e-2, warmup_steps=1), tensorboard=False, plot=False,
                     policy=ej.ComputePolicy(scan_layers=True, remat="full"))
    p0 = ej.init_params(cfg, jax.random.PRNGKey(0))
    with jax.transfer_guard_device_to_host("disallow"):
        res = train_lm(cfg, tc, p0, ds, tmp_path / "run", progress=False)
    names = [e[0] if e[0] != "save" else f"save{e[1]}" for e in events]
    # step s+1 is dispatched before step s's metrics are read; every step is read before a save
    assert names == ["step", "step", "read", "step", "read", "read", "save3",
                     "step", "step", "read", "read", "save5"], names
    assert [h["step"] for h in res.history] == [0, 1, 2, 3, 4]
    assert res.tokens_seen == sum(h["tokens"] for h in res.history) and res.history[0]["lr"] == pytest.approx(1e-2)
