"""Importance estimation, function-preserving permutation and depth ranking (METHOD §3)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from elastic_jax.elastic import importance as I

# every layer kind; two routing groups so expert ranking is group-constrained
CFG = ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="MEM*-E", n_group=2, topk_group=1,
                         num_attention_heads=4, num_key_value_heads=2)
GROUPS = {"mamba_heads": CFG.n_groups, "attn_heads": CFG.num_key_value_heads, "moe_experts": CFG.n_group}
_forward = jax.jit(ej.forward, static_argnums=2)
_init = jax.jit(ej.init_params, static_argnums=0)


def _tokens(seed, B=2, L=32, V=None):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, L), 0, V or CFG.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def params():
    p = _init(CFG, jax.random.PRNGKey(0))
    # non-trivial correction bias and Mamba per-head parameters, so their permutation matters
    for i, c in enumerate(CFG.pattern):
        m = p["layers"][i]["mixer"]
        if c == "E":
            m["e_score_correction_bias"] = 0.05 * jax.random.normal(jax.random.PRNGKey(10 + i), (8,))
        if c == "M":
            m["D"] = jax.random.uniform(jax.random.PRNGKey(20 + i), (8,), minval=0.5, maxval=1.5)
            m["norm"] = jax.random.uniform(jax.random.PRNGKey(30 + i), (64,), minval=0.5, maxval=1.5)
        p["layers"][i]["norm"] = jax.random.uniform(jax.random.PRNGKey(40 + i), (64,), minval=0.5, maxval=1.5)
    return p


def _random_importance(cfg, seed):
    """Random (group-respecting) rankings on every axis."""
    base = I.identity_importance(cfg)
    r = np.random.default_rng(seed)
    rk = {}
    for a, v in base.rankings.items():
        if a == "hidden":
            rk[a] = r.permutation(len(v))
        else:
            rk[a] = [I.rank_within_groups(r.random(len(x)), GROUPS.get(a, 1)) for x in v]
    return I.Importance(scores=base.scores, rankings=rk, fingerprint=base.fingerprint)


@pytest.mark.slow
def test_permuted_parent_logits_equal_original(params):
    tokens = _tokens(1)
    ref = _forward(params, tokens, CFG)
    imp = ej.estimate_importance(params, CFG, [tokens, _tokens(2)])
    for k, importance in enumerate([imp, _random_importance(CFG, 0)]):
        pp = ej.permute_params(params, CFG, importance)
        ej.check_params(pp, CFG)
        # the permutation moved something on every axis of every layer kind
        assert not np.allclose(pp["embed"], params["embed"])
        for i, c in enumerate(CFG.pattern):
            key = {"M": "x_proj", "*": "q_proj", "-": "up_proj", "E": "up_proj"}[c]
            assert not np.allclose(pp["layers"][i]["mixer"][key], params["layers"][i]["mixer"][key]), (k, i, c)
        out = _forward(pp, tokens, CFG)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
    # after permutation the scores come out sorted (importance order = index order)
    imp2 = ej.estimate_importance(ej.permute_params(params, CFG, imp), CFG, [tokens, _tokens(2)])
    np.testing.assert_allclose(imp2.scores["hidden"], np.sort(imp.scores["hidden"])[::-1], rtol=1e-4)
    for r in imp2.rankings["ffn"]:
        np.testing.assert_array_equal(r, np.arange(r.size))
    for r in imp2.rankings["moe_experts"] + imp2.rankings["mamba_heads"]:
        np.testing.assert_array_equal(r, np.arange(r.size))


def _planted(params):
    """Plant weak components: they must be ranked last (within their group)."""
    p = jax.tree.map(lambda x: x, params)
    weak = {"hidden": [5, 17], "mamba_heads": [1, 6], "mamba_channels": [2], "attn_heads": [0, 3],
            "ffn": [3, 70, 100], "moe_experts": [2, 5], "moe_ffn": [4]}
    for i, c in enumerate(CFG.pattern):
        lp = p["layers"][i]
        lp["norm"] = lp["norm"].at[jnp.array(weak["hidden"])].set(0.01)
        m = lp["mixer"]
        if c == "M":
            P = CFG.mamba_head_dim
            cols = np.concatenate([np.arange(h * P, (h + 1) * P) for h in weak["mamba_heads"]])
            m["x_proj"] = m["x_proj"].at[:, cols].multiply(0.05)
            m["x_proj"] = m["x_proj"].at[:, np.arange(weak["mamba_channels"][0], 64, P)].multiply(0.2)
        elif c == "*":
            # sharp heads (large queries) vs planted uniform heads (q = 0 averages V over the prefix)
            hd = CFG.head_dim
            m["q_proj"] = m["q_proj"] * 40.0
            for h in weak["attn_heads"]:
                m["q_proj"] = m["q_proj"].at[:, h * hd:(h + 1) * hd].set(0.0)
        elif c == "-":
            m["up_proj"] = m["up_proj"].at[:, jnp.array(weak["ffn"])].multiply(0.01)
        else:   # balanced routing (no correction bias) so every expert sees calibration tokens
            m["e_score_correction_bias"] = jnp.zeros_like(m["e_score_correction_bias"])
            m["down_proj"] = m["down_proj"].at[jnp.array(weak["moe_experts"])].multiply(0.01)
            m["up_proj"] = m["up_proj"].at[:, :, weak["moe_ffn"][0]].multiply(0.01)
    return p, weak


def _last_in_group(ranking, weak, groups):
    n = len(ranking)
    per = n // groups
    pos = {int(c): i for i, c in enumerate(ranking)}
    for g in range(groups):
        in_g = [w for w in weak if w // per == g]
        tail = set(int(x) for x in ranking[(g + 1) * per - len(in_g):(g + 1) * per])
        assert tail == set(in_g), (ranking, weak, g)
    return pos


def test_planted_structure_ranked_last(params):
    p, weak = _planted(params)
    imp = ej.estimate_importance(p, CFG, [_tokens(s) for s in range(3, 7)])
    _last_in_group(imp.rankings["hidden"], weak["hidden"], 1)
    for r in imp.rankings["mamba_heads"]:
        _last_in_group(r, weak["mamba_heads"], CFG.n_groups)
    for r in imp.rankings["mamba_channels"]:
        _last_in_group(r, weak["mamba_channels"], 1)
    for r in imp.rankings["attn_heads"]:
        _last_in_group(r, weak["attn_heads"], CFG.num_key_value_heads)
    for r in imp.rankings["ffn"]:
        _last_in_group(r, weak["ffn"], 1)
    for r in imp.rankings["moe_experts"]:
        _last_in_group(r, weak["moe_experts"], CFG.n_group)
    for r in imp.rankings["moe_ffn"]:
        _last_in_group(r, weak["moe_ffn"], 1)
    # ... so the permuted model's prefix drops exactly the planted components
    pp = ej.permute_params(p, CFG, imp)
    new = np.asarray(pp["layers"][4]["mixer"]["up_proj"])
    old = np.asarray(p["layers"][4]["mixer"]["up_proj"])[imp.rankings["hidden"]]   # rows follow the hidden order
    tail = {j for j in range(128) for w in weak["ffn"] if np.array_equal(new[:, j], old[:, w])}
    assert tail == {125, 126, 127}


def test_reap_saliency_matches_definition(params):
    """REAP: S_j = mean over routed tokens of g_j(x)·‖f_j(x)‖ — recomputed densely in numpy."""
    from elastic_jax.model.layers import rms_norm, route
    tokens = _tokens(5)
    imp = ej.estimate_importance(params, CFG, [tokens])
    _, hs = jax.jit(ej.hidden_states, static_argnums=2)(params, tokens, CFG)
    li = 1                                         # first MoE layer; its input is the stream after layer 0
    lp = params["layers"][li]
    x = rms_norm(hs[li - 1], lp["norm"], CFG.layer_norm_epsilon).reshape(-1, CFG.hidden_size)
    idx, w = route(lp["mixer"], x, CFG, None)
    idx, w = np.asarray(idx), np.asarray(w) / CFG.routed_scaling_factor
    x, up, down = np.asarray(x, np.float64), np.asarray(lp["mixer"]["up_proj"]), np.asarray(lp["mixer"]["down_proj"])
    f = np.einsum("tef,efd->ted", np.maximum(np.einsum("td,edf->tef", x, up), 0) ** 2, down)   # every expert
    norms = np.linalg.norm(f, axis=-1)                                                          # [T, E]
    sal, cnt = np.zeros(8), np.zeros(8)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            sal[idx[t, s]] += w[t, s] * norms[t, idx[t, s]]
            cnt[idx[t, s]] += 1
    assert cnt.sum() == x.shape[0] * CFG.num_experts_per_tok
    np.testing.assert_allclose(imp.scores["moe_experts"][0], sal / np.maximum(cnt, 1), rtol=2e-4, atol=1e-7)


def test_importance_serialization_and_bad_input(params, tmp_path):
    imp = I.identity_importance(CFG)
    path = tmp_path / "importance.json"
    imp.save(path)
    back = I.Importance.load(path)
    assert json.loads(path.read_text())["fingerprint"] == I.config_fingerprint(CFG)
    for a in imp.rankings:
        if a == "hidden":
            np.testing.assert_array_equal(back.rankings[a], imp.rankings[a])
        else:
            assert all(np.array_equal(x, y) for x, y in zip(back.rankings[a], imp.rankings[a]))
    # a ranking from a different config
    other = CFG.replace(intermediate_size=96)
    with pytest.raises(ValueError, match="different model config"):
        ej.permute_params(params, CFG, I.identity_importance(other))
    # rankings that break the group structure
    bad = I.identity_importance(CFG)
    bad.rankings["mamba_heads"][0] = np.array([4, 1, 2, 3, 0, 5, 6, 7])
    with pytest.raises(ValueError, match="across Mamba groups"):
        ej.permute_params(params, CFG, bad)
    bad = I.identity_importance(CFG)
    bad.rankings["ffn"][0] = np.zeros(128, np.int64)
    with pytest.raises(ValueError, match="not a permutation"):
        ej.permute_params(params, CFG, bad)
    with pytest.raises(ValueError, match="empty"):
        ej.estimate_importance(params, CFG, [])
    with pytest.raises(ValueError, match="vocab_size"):
        ej.estimate_importance(params, CFG, [jnp.full((1, 4), CFG.vocab_size, jnp.int32)])
    with pytest.raises(ValueError, match="mamba_channel_frac"):
        ej.estimate_importance(params, CFG, [_tokens(1)], mamba_channel_frac=0.0)


def test_rank_layers_planted(params):
    p = jax.tree.map(lambda x: x, params)
    # layer 2 (Mamba) barely writes to the residual stream; layer 4 (MLP) writes large outputs
    p["layers"][2]["mixer"]["out_proj"] = p["layers"][2]["mixer"]["out_proj"] * 1e-4
    p["layers"][4]["mixer"]["down_proj"] = p["layers"][4]["mixer"]["down_proj"] * 50.0
    order = I.rank_layers(p, CFG, [_tokens(6)])
    assert sorted(order) == list(range(CFG.num_hidden_layers))
    assert order[-1] == 2
    assert order.index(4) < order.index(2)
    imp = ej.estimate_importance(p, CFG, iter([_tokens(6)]), depth=True)      # a one-shot iterator
    assert imp.layers == tuple(order)
    assert I.Importance.from_dict(imp.to_dict()).layers == tuple(order)


# ------------------------------------------------------------- trained small model
TCFG = ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="M*-EM", vocab_size=96, n_group=2, topk_group=1,
                          moe_intermediate_size=32, intermediate_size=128)


def _bigram_batch(table, seed, B, L):
    r = np.random.default_rng(seed)
    t = np.zeros((B, L), np.int32)
    t[:, 0] = r.integers(0, table.shape[0], B)
    for i in range(1, L):
        t[:, i] = table[t[:, i - 1], r.integers(0, table.shape[1], B)]
    return jnp.asarray(t)


def _ce(params, tokens, cfg):
    logits = ej.forward(params, tokens, cfg)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))


@pytest.mark.slow
def test_prefix_slices_beat_random_slices_on_trained_model():
    """Train a tiny parent on a bigram language, rank, permute; the prefix-sliced submodel keeps a
    lower loss than (the average of) submodels of the same size sliced from randomly permuted parents."""
    table = np.random.default_rng(0).integers(0, TCFG.vocab_size, size=(TCFG.vocab_size, 2))
    opt = optax.adam(1e-2)
    params = _init(TCFG, jax.random.PRNGKey(0))
    state = opt.init(params)

    @jax.jit
    def step(p, s, tok):
        g = jax.grad(_ce)(p, tok, TCFG)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(80):
        params, state = step(params, state, _bigram_batch(table, i, 8, 32))
    evalb = _bigram_batch(table, 10_000, 32, 32)
    full_loss = float(jax.jit(_ce, static_argnums=2)(params, evalb, TCFG))
    assert full_loss < 1.5                                   # it learned the bigrams (ln 2 = 0.69 optimum)

    imp = ej.estimate_importance(params, TCFG, [_bigram_batch(table, 500 + i, 8, 32) for i in range(2)])
    widths = ej.Widths(hidden=40, mamba_heads=4, ffn=48, moe_experts=4, moe_ffn=16)
    sub_cfg = ej.sliced_config(TCFG, widths)
    sub_ce = jax.jit(_ce, static_argnums=2)

    def sliced_loss(importance):
        _, sub = ej.slice_params(ej.permute_params(params, TCFG, importance), TCFG, widths)
        return float(sub_ce(sub, evalb, sub_cfg))

    prefix = sliced_loss(imp)
    groups = {"mamba_heads": TCFG.n_groups, "attn_heads": TCFG.num_key_value_heads, "moe_experts": TCFG.n_group}
    randoms = []
    for seed in range(4):
        r = np.random.default_rng(seed)
        rk = {a: (r.permutation(len(v)) if a == "hidden" else
                  [I.rank_within_groups(r.random(len(x)), groups.get(a, 1)) for x in v])
              for a, v in imp.rankings.items()}
        randoms.append(sliced_loss(I.Importance(scores=imp.scores, rankings=rk, fingerprint=imp.fingerprint)))
    # measured (80 steps): full 0.85, prefix 1.69, random 1.56 / 1.89 / 2.00 / 1.86 — the ranking is
    # better than chance on average (mostly through the Mamba heads; a briefly trained tiny parent
    # barely uses its FFN / experts), not better than every random draw.
    assert prefix < np.mean(randoms), (prefix, randoms, full_loss)


_SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import elastic_jax as ej
cfg = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="ME*-", vocab_size=64, n_group=2, topk_group=1)
params = ej.init_params(cfg, jax.random.PRNGKey(0))
tokens = [jax.random.randint(jax.random.PRNGKey(i), (4, 16), 0, 64) for i in range(2)]
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def shard(x):
    spec = [None] * x.ndim
    if x.ndim and x.shape[-1] % 2 == 0:
        spec[-1] = "model"
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))
sp = jax.tree.map(shard, params)
st = [jax.device_put(t, NamedSharding(mesh, P("data", None))) for t in tokens]
a = ej.estimate_importance(params, cfg, tokens)
b = ej.estimate_importance(sp, cfg, st)
for k in a.rankings:
    xs, ys = (a.scores[k], b.scores[k]) if k == "hidden" else (np.concatenate(a.scores[k]), np.concatenate(b.scores[k]))
    np.testing.assert_allclose(xs, ys, rtol=1e-4, atol=1e-7)
pp = ej.permute_params(sp, cfg, b)
fwd = jax.jit(ej.forward, static_argnums=2)
ref = fwd(params, tokens[0], cfg)
out = fwd(pp, st[0], cfg)
np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
print("SHARDED-OK", len(jax.devices()))
"""


@pytest.mark.slow
def test_importance_and_permutation_on_sharded_params(tmp_path):
    """4 CPU devices (a fresh process: the device count is fixed at JAX start-up)."""
    import subprocess
    import sys
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHARDED-OK 4" in res.stdout
