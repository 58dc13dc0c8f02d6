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


# =============================================================================== the one cost model
# `elastic_jax.model.cost` (FLOPs and bytes per call, summed from each kind's declarations) against
# independent references: XLA's own FLOP count of the lowered forward / decode step / training
# step, an exact count of the matmuls in the traced program, the real parameter tree and the real
# cache tree of the generate path.
import dataclasses  # noqa: E402

from elastic_jax import kernels  # noqa: E402
from elastic_jax.model.cost import CostModel, ElementBytes, Mode  # noqa: E402
from elastic_jax.model.kinds import attention, mamba, moe  # noqa: E402
from elastic_jax.model.policy import ComputePolicy  # noqa: E402

TINY = dict(hidden_size=64, vocab_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, chunk_size=8,
            n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48)
NESTED = ej.Widths(hidden=48, mamba_heads=4, mamba_channels=4, attn_heads=2, ffn=48, moe_experts=4, moe_ffn=16)
POLICY = ComputePolicy(kernel_impl="xla", attention_impl="xla")    # the direct (full-square) attention path
XLA_ELEMENTWISE_TOL = 0.08
ON_CPU = jax.default_backend() == "cpu"
B, L = 2, 32


def _dot_flops(jaxpr, mult=1.0) -> float:
    """2·M·N·K of every dot_general / ragged_dot in a traced program (sub-programs included, a
    scan body times its length): the matmul FLOPs the program really runs."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += mult * 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
        elif name.startswith("ragged_dot"):          # lhs [m, k] rows split over groups, rhs [g, k, n]
            m, k = eqn.invars[0].aval.shape
            total += mult * 2.0 * m * k * eqn.invars[1].aval.shape[-1]
        inner = mult * (eqn.params["length"] if name == "scan" else 1)
        for v in eqn.params.values():
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(j, "eqns"):
                    total += _dot_flops(j, inner)
                elif hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    total += _dot_flops(j.jaxpr, inner)
    return total


def _xla_flops(fn, *args) -> float:
    """XLA's cost analysis of the lowered (unoptimized) program: every dot 2·M·N·K, every
    elementwise op one FLOP per element."""
    ca = jax.jit(fn).lower(*args).cost_analysis()
    return float((ca[0] if isinstance(ca, list) else ca)["flops"])


def _program_offsets(cm: CostModel, mode: Mode, train: bool = False, xla: bool = True) -> float:
    """FLOPs the test programs run beyond the model's count (or below it), from the programs'
    known choices, per token x tokens (the model counts the TPU / GPU programs'):
    - attention "xla" (direct path) scores every (query, key) pair, the masked upper triangle too:
      + 4·nH·hd·(L - (L+1)/2) per token of a prefill (zero for one decode token over its cache);
    - on CPU the SSD kernel (group-major) forms C B^T once per group, not once per head as the
      TPU / GPU reference the model counts: - 2·Q·(H - G)·N per token of a chunked call;
    - `xla`: XLA:CPU lowers `ragged_dot` densely over every expert: the routed experts' up / down
      products (4·k·D·Ie per token) run E times instead of once (the traced program's
      `ragged_dot` itself is the routed work, m rows)."""
    cfg, extra = cm.cfg, 0.0
    for layer in cm.layers:
        s = layer.sizes
        if layer.kind is attention and mode.seq_len > 1:
            extra += 4.0 * s["heads"] * (mode.seq_len - (mode.seq_len + 1) / 2.0)
        if layer.kind is mamba and mode.seq_len > 1 and ON_CPU:
            extra -= 2.0 * cfg.chunk_size * (s["ssm_heads"] - cfg.n_groups) * cfg.ssm_state_size
        if layer.kind is moe and xla:
            extra += (s["experts_router"] - 1) * 4.0 * cfg.num_experts_per_tok * s["embed"] * s["expert_mlp"]
    return (3.0 if train else 1.0) * mode.tokens * extra


def _model(pattern, widths=None):
    cfg = ej.NemotronHConfig(hybrid_override_pattern=pattern, **TINY)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    if widths is None:
        return cfg, cfg, params
    sub_cfg, sub = ej.slice_params(params, cfg, widths)
    return cfg, sub_cfg, sub


@pytest.fixture
def dense_ragged_dot(monkeypatch):
    """The grouped matmul as one `ragged_dot` (not the CPU's tile-padded segments, whose scan XLA's
    cost analysis counts once): its FLOPs are then a known multiple of the routed work."""
    monkeypatch.setattr(kernels, "use_segments", lambda m, g: False)


CASES = [("M", None), ("*", None), ("-", None), ("E", None), ("M*-E", NESTED)]
CASE_IDS = ["mamba", "attention", "mlp", "moe", "hybrid-nested"]


def _calls(pattern, widths):
    """The cost model of `pattern` at `widths` and its two programs on the sliced model: a prefill
    (full-sequence forward) and one decode step after `ctx` positions over a cache of exactly
    ctx + 1 positions: [(Mode, fn, args)]."""
    cfg, sub_cfg, params = _model(pattern, widths)
    toks = jnp.zeros((B, L), jnp.int32)
    ctx = 16
    cache = dataclasses.replace(ej.init_cache(sub_cfg, B, ctx + 1, params), pos=jnp.asarray(ctx, jnp.int32))
    fwd = lambda p, t: ej.forward(p, t, sub_cfg, policy=POLICY)
    step = lambda p, t, c: ej.decode_step(p, t, c, sub_cfg, policy=POLICY)
    return CostModel(cfg, widths), [(Mode.prefill(L, B), fwd, (params, toks)),
                                    (Mode.decode(ctx, B), step, (params, toks[:, :1], cache))]


@pytest.mark.parametrize("pattern,widths", CASES, ids=CASE_IDS)
@pytest.mark.slow
def test_matmul_flops_equal_the_traced_programs(pattern, widths, dense_ragged_dot):
    """The matmul terms (head + weights + mixing) of a prefill and a decode step equal the
    dot_general / ragged_dot FLOPs of the traced program exactly, once the programs' known choices
    (`_program_offsets`) are added; the whole call is the sum of its terms."""
    cm, calls = _calls(pattern, widths)
    for mode, fn, args in calls:
        t = {k: mode.tokens * float(v) for k, v in cm.flops_terms(mode).items()}
        assert float(cm.flops(mode)) == pytest.approx(sum(t.values()), rel=1e-12)
        dots = _dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)
        matmuls = t["head"] + t["weights"] + t.get("mixing", 0.0)
        assert dots == pytest.approx(matmuls + _program_offsets(cm, mode, xla=False), rel=1e-9), mode


@pytest.mark.skipif(not ON_CPU, reason="the offsets are those of XLA:CPU's programs")
@pytest.mark.parametrize("pattern,widths", CASES, ids=CASE_IDS)
def test_forward_flops_match_xla_cost_analysis(pattern, widths, dense_ragged_dot):
    """XLA's count of the lowered prefill and decode step vs the model's (+ the CPU programs' known
    choices). The model omits norms, activations, softmax and masks (elementwise, a few % of XLA's
    count here): XLA may exceed the model by at most 8%, never fall below it."""
    cm, calls = _calls(pattern, widths)
    for mode, fn, args in calls:
        ratio = _xla_flops(fn, *args) / (float(cm.flops(mode)) + _program_offsets(cm, mode))
        assert 1.0 <= ratio <= 1.0 + XLA_ELEMENTWISE_TOL, (mode, ratio)


@pytest.mark.skipif(not ON_CPU, reason="the offsets are those of XLA:CPU's programs")
def test_training_flops_are_three_forwards_by_xla(dense_ragged_dot):
    """Forward + backward of the hybrid's loss: XLA counts ~3x the forward (each matmul's two
    gradient products); the elementwise share grows in the backward, hence 15% here."""
    cfg, _, params = _model("M*-E")
    cm = CostModel(cfg)
    toks = jnp.zeros((B, L), jnp.int32)
    loss = lambda p, t: jnp.sum(ej.forward(p, t, cfg, policy=POLICY))
    mode = Mode.train(L, B)
    assert float(cm.flops(mode)) == pytest.approx(3 * float(cm.flops(Mode.prefill(L, B))), rel=1e-12)
    ratio = _xla_flops(jax.grad(loss), params, toks) / (float(cm.flops(mode)) + _program_offsets(cm, mode, True))
    assert 1.0 <= ratio <= 1.15, ratio


@pytest.mark.parametrize("widths", [None, NESTED, ej.Widths(layers=(True, False, True, True), ffn=48)])
def test_parameter_and_cache_bytes_equal_the_real_trees(widths):
    """Parameter elements / bytes vs the (sliced) bf16 parameter tree; resident decode state and
    one decode step's state traffic vs the cache tree the generate path's prefill returns."""
    cfg = ej.NemotronHConfig(hybrid_override_pattern="M*-E", **TINY)
    params = ej.init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    sub_cfg, sub = ej.slice_params(params, cfg, widths)
    cm = CostModel(cfg, widths)
    leaves = jax.tree.leaves(sub)
    assert cm.param_count() == sum(x.size for x in leaves) == ej.param_count(cfg, widths)
    # every weight at the parameter dtype, except the router's correction bias, kept in f32
    f32_bias = sum(lp["mixer"]["e_score_correction_bias"].size for lp in sub["layers"]
                   if "e_score_correction_bias" in lp["mixer"])
    assert cm.memory_bytes(batch=1, context=0)["weights"] + 2 * f32_bias == sum(x.nbytes for x in leaves)

    S = 24
    _, cache = jax.jit(lambda p, t: ej.prefill(p, t, sub_cfg, max_len=S))(sub, jnp.zeros((B, 5), jnp.int32))
    real = {"kv": 0, "ssm": 0, "conv": 0}
    for layer in cache.layers:
        for name, x in (layer or {}).items():
            if name != "valid":             # the attention validity mask: bookkeeping, not state
                real[{"k": "kv", "v": "kv"}.get(name, name)] += x.nbytes
    nbytes = ElementBytes(weights=2, kv=2, ssm=4, conv=2)
    mem = cm.memory_bytes(batch=B, context=S, nbytes=nbytes)
    assert {k: mem.get(k, 0.0) for k in real} == real
    ctx = 7     # a decode step reads ctx positions of K / V, writes one, reads and writes the Mamba state
    kv_per_position = real["kv"] / S
    want = kv_per_position * (ctx + 1) + 2 * (real["ssm"] + real["conv"])
    assert float(cm.state_bytes(Mode.decode(ctx, B), nbytes)) == pytest.approx(want, rel=1e-12)
    assert float(cm.state_bytes(Mode.train(L, B), nbytes)) == 0.0


def test_weights_read_saturate_at_the_declared_parameters():
    """A call whose tokens hit every expert reads every layer weight once: the weights read equal
    the declared parameters (+ the embedding rows looked up); one token reads top-k experts."""
    cfg = ej.NemotronHConfig(hybrid_override_pattern="M*-E", **TINY)
    cm = CostModel(cfg)
    many = Mode.prefill(64, 4)
    assert cm.weight_elems_read(many) == cm.param_count() - cfg.vocab_size * 64 + many.tokens * 64
    one = Mode.decode(0)
    per_expert = 2 * 64 * 32
    assert cm.weight_elems_read(many) - cm.weight_elems_read(one) == (8 - 2) * per_expert + (many.tokens - 1) * 64


def test_cost_modes_refuse_bad_calls():
    with pytest.raises(ValueError, match="kind"):
        Mode("serve")
    with pytest.raises(ValueError, match="seq_len"):
        Mode("prefill", 0)
    with pytest.raises(ValueError, match="one token"):
        Mode("decode", 4)
    with pytest.raises(ValueError, match="no cache"):
        Mode("train", 8, 1, 3)
    with pytest.raises(ValueError, match="context"):
        Mode.decode(-1)
    with pytest.raises(ValueError, match="exceeds"):
        CostModel(ej.NemotronHConfig(hybrid_override_pattern="M*-E", **TINY), ej.Widths(ffn=1000))


def test_planner_latency_and_budget_control_read_one_cost_model(monkeypatch):
    """The same model, the same call: the planner's step FLOPs, the latency model's and budget
    control's are the cost model's numbers; and they all come from `CostModel.flops_terms` (a
    patched one moves all three)."""
    from elastic_jax import plan
    from elastic_jax.eval.latency import forward_cost, prefill_cost
    from elastic_jax.infer.budget import ElasticModel

    cfg = ej.NemotronHConfig(hybrid_override_pattern="M*-E", **TINY)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    model = ElasticModel(cfg, params, {"full": ej.Widths(), "half": NESTED})
    for name, w in (("full", None), ("half", NESTED)):
        cm = CostModel(cfg, w)
        for ctx in (0, 9, 100):
            want = float(cm.flops(Mode.decode(ctx)))
            assert float(model.flops_per_token(name, ctx)) == pytest.approx(want, rel=1e-12)
            assert forward_cost(cfg, w, "h100", batch=1, new_tokens=1, context=ctx).flops == pytest.approx(want, rel=1e-12)
        want = float(cm.flops(Mode.prefill(L, B)))
        assert prefill_cost(cfg, w, "h100", batch=B, length=L).flops == pytest.approx(want, rel=1e-12)
    # the planner trains the parent: teacher forward + student forward and backward = 4 forwards
    fl = plan.step_flops(cfg, B * L, L, "none")
    assert fl["model_flops"] == pytest.approx(4 * float(CostModel(cfg).flops(Mode.prefill(L, B))), rel=1e-12)
    assert fl["model_flops"] == pytest.approx(4 / 3 * float(CostModel(cfg).flops(Mode.train(L, B))), rel=1e-12)

    monkeypatch.setattr(CostModel, "flops_terms", lambda self, mode: {"x": np.asarray(1000.0)})
    model = ElasticModel(cfg, params, {"full": ej.Widths()})
    assert float(model.flops_per_token("full", 5)) == 1000.0
    assert forward_cost(cfg, None, "h100", batch=1, new_tokens=1, context=5).flops == 1000.0
    assert plan.step_flops(cfg, B * L, L, "none")["model_flops"] == 4 * 1000.0 * B * L


def test_elastic_memory_cost_is_the_cost_models_memory():
    """The budget loss's differentiable memory cost (elastic/cost.py, real-valued widths) equals
    the cost model's at integer widths: both read the kinds' `params`, `dims` and `cache_elems`."""
    cfg = ej.NemotronHConfig(hybrid_override_pattern="M*-E", **TINY)
    for w in (None, NESTED):
        e = {} if w is None else _expected(cfg, w)
        got = C.memory_cost(cfg, e, context=100, batch=3, bytes_per_param=2.0, bytes_kv=2.0, bytes_ssm=4.0)
        want = CostModel(cfg, w).memory_bytes(batch=3, context=100)["total"]
        assert float(got) == pytest.approx(want, rel=1e-6)
