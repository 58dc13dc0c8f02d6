"""Foundation invariants (README, Architecture): masked == sliced, masked full == plain, forward == decode,
causality, one compiled program for every width, SSD chunked == sequential oracle."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from conftest import HYBRID64, assert_close
from elastic_jax.kernels import ssd_chunked, ssd_scan

CFG = HYBRID64
# group-limited routing (n_group > 1) and two layers of each elastic kind (per-layer widths)
CFG_GROUPED = CFG.replace(hybrid_override_pattern="ME*M-E-*", n_group=2, topk_group=1, n_routed_experts=8,
                          num_experts_per_tok=2, routed_scaling_factor=2.5)


_jit_forward = jax.jit(ej.forward, static_argnums=(2,))


def fwd(params, tokens, cfg, widths=None, **kw):
    """Jitted forward (resolved widths: one compile per config for every budget)."""
    if isinstance(widths, ej.Widths):
        widths = widths.resolve(cfg)
    return _jit_forward(params, tokens, cfg, widths, **kw)


def _params(cfg, seed=0):
    params = ej.init_params(cfg, jax.random.PRNGKey(seed))
    # non-trivial correction bias and norms so masks / routing are exercised
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _tokens(cfg, b=2, l=21, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, cfg.vocab_size)


@pytest.fixture(scope="module")
def model():
    return CFG, _params(CFG), _tokens(CFG)


@pytest.fixture(scope="module")
def grouped_model():
    return CFG_GROUPED, _params(CFG_GROUPED, seed=3), _tokens(CFG_GROUPED, seed=4)


# ------------------------------------------------------------------------------- SSD
@pytest.mark.parametrize("l,chunk", [(37, 8), (5, 8), (64, 16)])
def test_ssd_chunked_matches_sequential_oracle(l, chunk):
    ks = jax.random.split(jax.random.PRNGKey(l), 7)
    b, h, p, g, n = 2, 4, 8, 2, 6
    x = jax.random.normal(ks[0], (b, l, h, p))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, h)))
    A = -jnp.exp(jax.random.normal(ks[2], (h,)))
    B = jax.random.normal(ks[3], (b, l, g, n))
    C = jax.random.normal(ks[4], (b, l, g, n))
    D = jax.random.normal(ks[5], (h,))
    s0 = jax.random.normal(ks[6], (b, h, p, n))
    seq = jnp.stack([jnp.arange(l) * 3 // l, jnp.zeros(l, jnp.int32)])
    oracle = jax.jit(ssd_scan)
    chunked = jax.jit(ssd_chunked, static_argnames="chunk_size")
    for kw in (dict(), dict(seq_idx=seq, initial_state=s0, active_heads=1)):
        y1, s1 = oracle(x, dt, A, B, C, D, **kw)
        y2, s2 = chunked(x, dt, A, B, C, D, chunk_size=chunk, **kw)
        assert_close(y2, y1)
        assert_close(s2, s1)


# ------------------------------------------------------------------------- masking
def test_masked_full_equals_plain(model):
    cfg, params, t = model
    assert_close(fwd(params, t, cfg, ej.Widths.full(cfg)), fwd(params, t, cfg), tol=1e-6)
    assert_close(fwd(params, t, cfg, ej.Widths()), fwd(params, t, cfg), tol=1e-6)


AXIS_CASES = [
    dict(hidden=40), dict(hidden=1), dict(mamba_heads=2), dict(mamba_heads=6), dict(attn_heads=2),
    dict(ffn=17), dict(moe_experts=4), dict(moe_experts=2), dict(moe_ffn=9),
    dict(layers=(True, False, True, True, False, True)), dict(layers=(False, True, True, True, True, True)),
]


@pytest.mark.parametrize("kw", AXIS_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_masked_equals_sliced_each_axis(model, kw):
    cfg, params, t = model
    w = ej.Widths(**kw)
    sub_cfg, sub = ej.slice_params(params, cfg, w)
    ej.check_params(sub, sub_cfg)
    assert_close(fwd(sub, t, sub_cfg), fwd(params, t, cfg, w))


def _random_widths(cfg, rng, per_layer):
    def pick(full, div, lo=1):
        return int(rng.choice([v for v in range(lo, full + 1) if v % div == 0]))

    def axis(char, full, div, lo=1):
        n = cfg.count(char)
        if per_layer and n > 1:
            return tuple(pick(full, div, lo) for _ in range(n))
        return pick(full, div, lo)

    layers = tuple(bool(v) for v in rng.random(cfg.num_hidden_layers) > 0.2)
    if not any(layers):
        layers = (True,) + layers[1:]
    min_experts = max(cfg.num_experts_per_tok, 2 * cfg.n_group if cfg.n_group > 1 else 1)
    return ej.Widths(hidden=pick(cfg.hidden_size, 1), mamba_heads=axis("M", cfg.mamba_num_heads, cfg.n_groups),
                     attn_heads=axis("*", cfg.num_attention_heads, cfg.num_key_value_heads),
                     ffn=axis("-", cfg.intermediate_size, 1),
                     moe_experts=axis("E", cfg.n_routed_experts, cfg.n_group, min_experts),
                     moe_ffn=axis("E", cfg.moe_intermediate_size, 1), layers=layers)


@pytest.mark.parametrize("seed", range(4))
def test_masked_equals_sliced_random_mixes(model, grouped_model, seed):
    rng = np.random.default_rng(seed)
    for cfg, params, t in (model, grouped_model):
        w = _random_widths(cfg, rng, per_layer=seed % 2 == 1)
        sub_cfg, sub = ej.slice_params(params, cfg, w)
        assert_close(fwd(sub, t, sub_cfg), fwd(params, t, cfg, w))
        assert ej.count_params(sub) == ej.param_count(cfg, w)


@pytest.mark.parametrize("seed", range(2))
def test_embedded_smaller_model_runs_masked_at_the_parent_shapes(model, grouped_model, seed):
    """embed_params is slice_params' transpose: an independently trained smaller model (here: random
    params of the sliced shapes) placed back into the parent's shapes, zeros elsewhere, gives its own
    logits through the masked forward, and slicing it again returns it exactly."""
    rng = np.random.default_rng(10 + seed)
    for cfg, _, t in (model, grouped_model):
        w = _random_widths(cfg, rng, per_layer=seed == 1)
        sub_cfg = ej.elastic.slicing.sliced_config(cfg, w)
        small = _params(sub_cfg, seed=20 + seed)
        big = ej.elastic.slicing.embed_params(small, cfg, w)
        ej.check_params(big, cfg)
        chex.assert_trees_all_equal(ej.slice_params(big, cfg, w)[1], small)
        assert_close(fwd(big, t, cfg, w), fwd(small, t, sub_cfg))
        assert sum(int(np.count_nonzero(x)) for x in jax.tree_util.tree_leaves(big)) == \
            sum(int(np.count_nonzero(x)) for x in jax.tree_util.tree_leaves(small))
    with pytest.raises(ValueError, match="do not have the shapes"):
        ej.elastic.slicing.embed_params(small, cfg, ej.Widths())


@pytest.mark.slow
def test_heterogeneous_subconfig_records_per_layer_sizes(grouped_model):
    cfg, params, t = grouped_model
    w = ej.Widths(mamba_heads=(2, 6), attn_heads=(4, 2), ffn=(30, 96), moe_experts=(4, 8), moe_ffn=(8, 32))
    sub_cfg, sub = ej.slice_params(params, cfg, w)
    assert sub_cfg.is_heterogeneous
    assert sub_cfg.mamba_heads_per_layer == (2, 6) and sub_cfg.ffn_per_layer == (30, 96)
    assert_close(fwd(sub, t, sub_cfg), fwd(params, t, cfg, w))
    # the sliced heterogeneous model can itself be masked and sliced again
    w2 = ej.Widths(hidden=32, mamba_heads=(2, 4))
    sub2_cfg, sub2 = ej.slice_params(sub, sub_cfg, w2)
    assert_close(fwd(sub2, t, sub2_cfg), fwd(sub, t, sub_cfg, w2))


def test_soft_widths_one_hot_equals_hard(model):
    cfg, params, t = model
    options = {"hidden": [64, 48, 32], "mamba_heads": [8, 4], "ffn": [96, 48], "moe_experts": [8, 4],
               "moe_ffn": [32, 16], "attn_heads": [4, 2]}
    probs = {"hidden": [0, 1, 0], "mamba_heads": [0, 1], "ffn": [1, 0], "moe_experts": [0, 1],
             "moe_ffn": [0, 1], "attn_heads": [0, 1]}
    soft = ej.SoftWidths.from_options(cfg, options, probs)
    hard = ej.Widths(hidden=48, mamba_heads=4, ffn=96, moe_experts=4, moe_ffn=16, attn_heads=2)
    assert_close(fwd(params, t, cfg, soft), fwd(params, t, cfg, hard), tol=1e-6)
    # a genuine mix is differentiable in the probabilities and lies off both endpoints
    def loss(p_hidden):
        sw = ej.SoftWidths.from_options(cfg, {"hidden": [64, 32]}, {"hidden": p_hidden})
        return jnp.sum(ej.forward(params, t, cfg, sw) ** 2)
    g = jax.jit(jax.grad(loss))(jnp.array([0.5, 0.5]))
    assert jnp.all(jnp.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_masked_submodel_trains_only_through_active_components(model):
    cfg, params, t = model
    w = ej.Widths(hidden=32, ffn=40).resolve(cfg)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(ej.forward(p, t, cfg, w) ** 2)))(params)
    assert float(jnp.abs(grads["embed"][:, 32:]).max()) == 0.0
    mlp = cfg.pattern.index("-")
    assert float(jnp.abs(grads["layers"][mlp]["mixer"]["up_proj"][:, 40:]).max()) == 0.0
    assert float(jnp.abs(grads["layers"][mlp]["mixer"]["up_proj"][:32, :40]).max()) > 0.0


# -------------------------------------------------------------------------- decode
@pytest.mark.parametrize("sliced", [False, True])
def test_forward_equals_prefill_plus_decode(model, sliced):
    cfg, params, t = model
    widths = None
    if sliced:
        cfg, params = ej.slice_params(params, cfg, ej.Widths(hidden=48, mamba_heads=4, moe_experts=4, ffn=50))
    full = fwd(params, t, cfg, widths)
    logits, cache = jax.jit(lambda p, tok: ej.prefill(p, tok, cfg, widths, max_len=24))(params, t[:, :13])
    outs = [logits]
    step = jax.jit(lambda p, tok, c: ej.decode_step(p, tok, c, cfg))
    for i in range(13, t.shape[1]):
        lg, cache = step(params, t[:, i:i + 1], cache)
        outs.append(lg)
    assert_close(jnp.concatenate(outs, axis=1), full)


def test_masked_decode_equals_masked_forward(model):
    cfg, params, t = model
    w = ej.Widths(hidden=40, mamba_heads=(6,) * 2, attn_heads=2, moe_ffn=20).resolve(cfg)
    full = fwd(params, t, cfg, w)
    logits, cache = jax.jit(lambda p, tok, w: ej.prefill(p, tok, cfg, w, max_len=t.shape[1]))(params, t[:, :7], w)
    outs = [logits]
    step = jax.jit(lambda p, tok, c, w: ej.decode_step(p, tok, c, cfg, w))
    for i in range(7, t.shape[1]):
        lg, cache = step(params, t[:, i:i + 1], cache, w)
        outs.append(lg)
    assert_close(jnp.concatenate(outs, axis=1), full)


def test_packed_segments_equal_separate_documents(model):
    cfg, params, _ = model
    a = _tokens(cfg, 1, 9, seed=7)
    b = _tokens(cfg, 1, 12, seed=8)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 9 + [2] * 12 + [0] * 3])
    out = fwd(params, packed, cfg, segment_ids=seg)
    assert_close(out[:, :9], fwd(params, a, cfg))
    assert_close(out[:, 9:21], fwd(params, b, cfg))


@pytest.mark.slow
def test_generate_greedy_left_padding_and_stop_tokens(model):
    cfg, params, t = model
    g_one = ej.generate(params, t[:1, :4], cfg, max_new_tokens=6)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), t[:1, :4]], axis=1)
    valid = jnp.array([[False] * 3 + [True] * 4])
    g_pad = ej.generate(params, padded, cfg, max_new_tokens=6, prompt_valid=valid)
    np.testing.assert_array_equal(g_one.tokens, g_pad.tokens)
    # greedy == argmax of the full forward at every position (teacher forcing on the output)
    seq = jnp.concatenate([t[:1, :4], g_one.tokens], axis=1)
    np.testing.assert_array_equal(jnp.argmax(fwd(params, seq, cfg)[0, 3:9], axis=-1), g_one.tokens[0])
    stop = int(g_one.tokens[0, 2])
    g_stop = ej.generate(params, t[:1, :4], cfg, max_new_tokens=6, stop_tokens=(stop,))
    first = int(np.argmax(np.asarray(g_one.tokens[0]) == stop))
    assert int(g_stop.lengths[0]) == first + 1 and bool(g_stop.stopped[0])
    assert np.all(np.asarray(g_stop.tokens[0, first + 1:]) == cfg.pad_token_id)


def test_generate_sampling_top_p(model):
    cfg, params, t = model
    a = ej.generate(params, t[:, :4], cfg, max_new_tokens=5, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(3))
    b = ej.generate(params, t[:, :4], cfg, max_new_tokens=5, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    c = ej.generate(params, t[:, :4], cfg, max_new_tokens=5, temperature=1.0, top_p=1e-6, key=jax.random.PRNGKey(5))
    g = ej.generate(params, t[:, :4], cfg, max_new_tokens=5)
    np.testing.assert_array_equal(c.tokens, g.tokens)


def test_sample_logits_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: ej.sample_logits(logits, k, 1.0, 0.7))(jax.random.split(jax.random.PRNGKey(0), 400))
    assert set(np.unique(np.asarray(draws))) == {0, 1}


# ---------------------------------------------------------------- causality / jit
def test_gradient_causality(model):
    cfg, params, t = model
    emb = jnp.take(params["embed"], t, axis=0)

    def loss_at(e, pos):
        p = dict(params)
        # feed embeddings through an identity lookup: tokens index rows of a per-position table
        table = e.reshape(-1, e.shape[-1])
        p["embed"] = table
        idx = jnp.arange(table.shape[0]).reshape(t.shape)
        cfg2 = cfg.replace(vocab_size=max(cfg.vocab_size, table.shape[0]))
        return jnp.sum(fwd(p, idx, cfg2)[:, pos])

    pos = 9
    g = jax.jit(jax.grad(loss_at), static_argnums=1)(emb, pos)
    assert float(jnp.abs(g[:, pos + 1:]).max()) == 0.0
    assert float(jnp.abs(g[:, :pos + 1]).max()) > 0.0


def test_new_widths_do_not_recompile(model):
    """One program for every width: resolved widths are traced arrays, so four different
    submodels (every axis, depth included) trace the forward once."""
    cfg, params, t = model

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(p, tok, w):
        return ej.forward(p, tok, cfg, w)

    for w in (ej.Widths(), ej.Widths(hidden=32, mamba_heads=4), ej.Widths(ffn=7, moe_experts=2, layers=(True,) * 5 + (False,)),
              ej.Widths(attn_heads=2, moe_ffn=3)):
        f(params, t, w.resolve(cfg)).block_until_ready()


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,msg", [
    (dict(hidden=0), "hidden"), (dict(hidden=65), "exceeds"), (dict(mamba_heads=3), "n_groups"),
    (dict(mamba_heads=(2, 2, 2)), "one value per"), (dict(attn_heads=3), "num_key_value_heads"),
    (dict(moe_experts=1), "num_experts_per_tok"), (dict(ffn=-4), "must be > 0"),
    (dict(layers=(True, False)), "layers"), (dict(moe_ffn=2.5), "integers"),
])
def test_invalid_widths_raise(model, kw, msg):
    cfg, params, t = model
    with pytest.raises(ValueError, match=msg):
        ej.forward(params, t, cfg, ej.Widths(**kw))


def test_invalid_tokens_raise(model):
    cfg, params, t = model
    with pytest.raises(ValueError, match="vocab_size"):
        ej.forward(params, t.at[0, 0].set(cfg.vocab_size), cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        ej.forward(params, t.at[0, 0].set(-1), cfg)
    with pytest.raises(ValueError, match="batch, length"):
        ej.forward(params, t[0], cfg)


def test_mismatched_params_are_listed(model):
    cfg, params, _ = model
    bad = jax.tree_util.tree_map(lambda x: x, params)
    del bad["layers"][0]["mixer"]["A_log"]
    bad["layers"][1]["mixer"]["up_proj"] = bad["layers"][1]["mixer"]["up_proj"][:, :, :3]
    with pytest.raises(ValueError) as e:
        ej.check_params(bad, cfg)
    assert "A_log: missing" in str(e.value) and "up_proj: shape" in str(e.value)


def test_cache_overflow_and_long_prompt_raise(model):
    cfg, params, t = model
    with pytest.raises(ValueError, match="max_len"):
        ej.prefill(params, t, cfg, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        ej.generate(params, t, cfg, max_new_tokens=4, max_len=22)


@pytest.mark.slow
def test_eager_forward_takes_numpy_parameters():
    """`jax.device_get(params)` gives numpy leaves: the eager forward (MoE grouped matmul included,
    at a size that takes the CPU segment path) runs on them and equals the jnp forward; resolved
    widths pass back through the forward also for a pattern without attention."""
    cfg = HYBRID64.replace(hybrid_override_pattern="ME")
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, cfg.vocab_size))
    w = ej.Widths(hidden=48, mamba_heads=4, moe_experts=4, moe_ffn=16)
    host = jax.device_get(params)
    assert isinstance(jax.tree.leaves(host)[0], np.ndarray)
    assert_close(ej.forward(host, tokens, cfg, w), ej.forward(params, tokens, cfg, w))
    assert_close(ej.forward(host, tokens, cfg, w.resolve(cfg)), ej.forward(params, tokens, cfg, w))
