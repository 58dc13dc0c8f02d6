"""Memory-efficient attention == the reference einsum attention (f32, CPU), forward and gradient;
the compute policy (bf16 compute, precision) against the f32 model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from conftest import HYBRID64
from elastic_jax.kernels import dot_product_attention as A
from elastic_jax.model.layers import dense

B, L, K, R, D = 2, 256, 2, 3, 16
POS = jnp.arange(L)
# row 0: two documents then padding (id 0); row 1: one document
SEG = jnp.array([[1] * 100 + [2] * 120 + [0] * 36, [1] * L], jnp.int32)


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (B, L, K, R, D)), jax.random.normal(ks[1], (B, L, K, D)),
            jax.random.normal(ks[2], (B, L, K, D)))


def _ref(q, k, v, seg=SEG, k_valid=None):
    return A.reference_attention(q, k, v, POS, POS, seg, seg, k_valid, scale=D ** -0.5)


def _grads(f, q, k, v):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))(q, k, v)


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


# "blocked" (what CPU picks for short sequences) in the fast tier, the others in the slow one
@pytest.mark.parametrize("impl", [pytest.param("chunked", marks=pytest.mark.slow),
                                  pytest.param("splash", marks=pytest.mark.slow), "blocked"])
def test_equals_reference_with_segments_and_padding(qkv, impl):
    """GQA, causal, packed segments with padding: forward and gradients (splash in interpret mode;
    blocked: 4 query blocks of 64, each against its causal prefix of keys)."""
    q, k, v = qkv
    if impl == "blocked":   # jitted: op by op its 4 unrolled blocks cost ~5x the compile
        f = jax.jit(lambda q, k, v: A.blocked_attention(q, k, v, SEG, scale=D ** -0.5))
    elif impl == "chunked":   # 4 key blocks of 64: the online softmax crosses block boundaries
        f = lambda q, k, v: A.chunked_attention(q, k, v, POS, POS, SEG, SEG, None, D ** -0.5, 64, A.HIGHEST)
    else:
        f = lambda q, k, v: A.splash_attention(q, k, v, SEG, scale=D ** -0.5)
    _close(f(q, k, v), _ref(q, k, v), 1e-5)
    for g, r in zip(_grads(f, q, k, v), _grads(_ref, q, k, v)):
        _close(g, r, 5e-5)


def test_chunked_rows_without_keys_are_zero(qkv):
    """Decode-cache validity: a row whose keys are all invalid gives 0 and finite gradients."""
    q, k, v = qkv
    kv = jnp.zeros((B, L), bool).at[1, :10].set(True)          # row 0: no valid key at all
    f = lambda q, k, v: A.chunked_attention(q, k, v, POS, POS, None, None, kv, D ** -0.5, 64, A.HIGHEST)
    out = f(q, k, v)
    assert float(jnp.max(jnp.abs(out[0]))) == 0.0
    _close(out, _ref(q, k, v, None, kv), 1e-5)
    for g, r in zip(_grads(f, q, k, v), _grads(lambda q, k, v: _ref(q, k, v, None, kv), q, k, v)):
        assert bool(jnp.all(jnp.isfinite(g)))
        _close(g, r, 5e-5)


def test_reference_reads_a_head_major_cache_as_it_is(qkv):
    """Decode's layout: k / v stored [B, K, S, D] give the [B, S, K, D] result (the same dots
    without a transposed copy; XLA:CPU's kernels may sum in another order, ~1e-7); an unknown
    layout is one clear error."""
    q, k, v = qkv
    kv = jnp.ones((B, L), bool).at[0, 200:].set(False)
    one = lambda t: t[:, -1:]
    f = jax.jit(lambda q, k, v, layout: A.reference_attention(one(q), k, v, POS[-1:], POS, k_valid=kv, scale=D ** -0.5,
                                                              kv_layout=layout), static_argnums=3)
    _close(f(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), "bksd"), f(q, k, v, "bskd"), 1e-6)
    with pytest.raises(ValueError, match="kv_layout must be"):
        A.reference_attention(q, k, v, POS, POS, scale=1.0, kv_layout="bkds")


def test_chunked_never_materializes_scores():
    """No [L, S] array in the forward or backward program of the chunked path (L = S = 1024)."""
    n = 1024
    q = jax.ShapeDtypeStruct((1, n, 1, 2, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, n, 1, 8), jnp.float32)
    pos = jnp.arange(n)
    f = lambda q, k, v: jnp.sum(A.chunked_attention(q, k, v, pos, pos, None, None, None, 0.3, 128, A.HIGHEST))
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv).as_text()
    assert f"{n}x{n}" not in text and "x128x" in text        # blocks of 128 keys, never 1024 x 1024


def test_pick_impl_auto_and_errors():
    assert A.pick_impl("auto", L=64, S=64, self_attention=True, segments=True, dtype=jnp.float32) == "blocked"
    assert A.pick_impl("auto", L=64, S=64, self_attention=False, segments=True, dtype=jnp.float32) == "xla"
    assert A.pick_impl("auto", L=8192, S=8192, self_attention=True, segments=True, dtype=jnp.float32) == "chunked"
    from elastic_jax.kernels import compile_target
    with compile_target("tpu"):
        assert A.pick_impl("auto", L=8192, S=8192, self_attention=True, segments=True, dtype=jnp.bfloat16) == "splash"
    with pytest.raises(ValueError, match="attention impl"):
        A.pick_impl("flash", L=8, S=8, self_attention=True, segments=False, dtype=jnp.float32)


# ------------------------------------------------------------------------------ in the model
CFG = HYBRID64.replace(hybrid_override_pattern="M*-E*")


@pytest.fixture(scope="module")
def model():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, CFG.vocab_size)
    seg = jnp.array([[1] * 15 + [2] * 20 + [0] * 5, [3] * 40], jnp.int32)
    fwd = jax.jit(ej.forward, static_argnums=(2,), static_argnames=("policy",))
    return params, tokens, seg, fwd


def test_model_chunked_equals_xla_masked(model):
    """Whole model, packed segments + padding, elastic widths (head masks): chunked == xla."""
    params, tokens, seg, fwd = model
    widths = ej.Widths(hidden=48, mamba_heads=4, attn_heads=2, ffn=48, moe_experts=4, moe_ffn=16).resolve(CFG)
    ref = fwd(params, tokens, CFG, widths, segment_ids=seg, policy=ej.ComputePolicy(attention_impl="xla"))
    got = fwd(params, tokens, CFG, widths, segment_ids=seg,
              policy=ej.ComputePolicy(attention_impl="chunked"))
    _close(got, ref, 1e-5)


def test_bf16_policy_close_to_f32(model):
    """bf16 parameters with no policy (the bf16 policy), and f32 parameters under compute_dtype
    bf16: logits within bf16 tolerance of the f32 model."""
    params, tokens, seg, fwd = model
    ref = fwd(params, tokens, CFG, None, segment_ids=seg)
    scale = float(jnp.max(jnp.abs(ref)))
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    for got in (fwd(p16, tokens, CFG, None, segment_ids=seg),
                fwd(params, tokens, CFG, None, segment_ids=seg, policy=ej.ComputePolicy(compute_dtype="bfloat16"))):
        assert got.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(got - ref))) / scale
        assert err < 5e-2, err          # bf16 has an 8-bit mantissa: ~1e-2 relative per op


def test_bf16_params_run_default_precision():
    """No silent upcast: bf16 operands are multiplied at DEFAULT precision (f32 accumulation),
    f32 operands at HIGHEST ("auto"), and an explicit precision wins."""
    x = jnp.ones((2, 8), jnp.bfloat16)
    w = jnp.ones((8, 4), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(dense)(x, w))
    assert "HIGHEST" not in jaxpr and "preferred_element_type=float32" in jaxpr
    assert "HIGHEST" in str(jax.make_jaxpr(dense)(x.astype(jnp.float32), w.astype(jnp.float32)))
    pol = ej.ComputePolicy(compute_dtype="bfloat16")
    j = str(jax.make_jaxpr(lambda x, w: dense(x, w, pol))(x.astype(jnp.float32), w.astype(jnp.float32)))
    assert "HIGHEST" not in j and "bf16[2,8]" in j
    assert "HIGHEST" in str(jax.make_jaxpr(lambda x, w: dense(x, w, ej.ComputePolicy(precision="highest")))(x, w))
    assert ej.ComputePolicy().lax_precision(jnp.float32) == jax.lax.Precision.HIGHEST
    with pytest.raises(ValueError, match="compute_dtype"):
        ej.ComputePolicy(compute_dtype="int8")
