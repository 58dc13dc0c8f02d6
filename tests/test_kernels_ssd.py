"""Pallas SSD (interpret mode on CPU) == the pure-JAX references, forward and every gradient.

A seeded grid rather than hypothesis: each shape costs one XLA compile (~5 s on 2 cores), so
the traced arguments (active_heads, seq_idx values) are drawn several times per compile.
Both kernel variants run: "gpu" (Triton-style body, the CPU default) and "tpu" (Mosaic-style).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax import kernels

from elastic_jax.kernels import reference
from elastic_jax.kernels.ssd_pallas import ssd_pallas
from conftest import assert_close

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 1.5e-2}  # max |a - b| relative to max(|ref|, 1)


def _inputs(seed, b, l, h, p, g, n, dtype, has_D=True, has_init=True):
    """numpy-drawn inputs (no per-op XLA compiles): dt > 0 (softplus), A < 0."""
    r = np.random.default_rng(seed)
    nrm = lambda *s: r.standard_normal(s).astype(np.float32)
    x = jnp.asarray(nrm(b, l, h, p)).astype(dtype)
    dt = jnp.asarray(np.log1p(np.exp(nrm(b, l, h) - 1.0)))
    A = jnp.asarray(-np.exp(0.5 * nrm(h)))
    B = jnp.asarray(nrm(b, l, g, n)).astype(dtype)
    C = jnp.asarray(nrm(b, l, g, n)).astype(dtype)
    D = jnp.asarray(nrm(h)) if has_D else None
    init = jnp.asarray(nrm(b, h, p, n)) if has_init else None
    return x, dt, A, B, C, D, init


def _seq_idx(seed, b, l):
    """Packed documents: ids increase along l, boundaries at random positions (some at 0)."""
    r = np.random.default_rng(seed)
    starts = r.random((b, l)) < 0.08
    starts[:, 0] = False
    return jnp.asarray(np.cumsum(starts, axis=1) + r.integers(0, 3, (b, 1)), jnp.int32)


def _vjp_fn(fn, chunk, has_D, has_init, variant=None):
    """jit(inputs, traced act, seq_idx, cotangents) -> (y, state, grads of the 7 float inputs)."""
    def run(x, dt, A, B, C, D, init, seq_idx, act, ct_y, ct_s):
        def f(x, dt, A, B, C, D, init):
            kw = dict(chunk_size=chunk, initial_state=init, seq_idx=seq_idx, active_heads=act)
            if variant is not None:
                kw["variant"] = variant
            return fn(x, dt, A, B, C, D, **kw)
        (y, s), vjp = jax.vjp(f, x, dt, A, B, C, D, init)
        return y, s, vjp((ct_y, ct_s))
    return jax.jit(run)


# (id, b, l, h, p, g, n, chunk, dtype, variant, has_D, has_init, has_seq)
CASES = [
    ("f32-odd-len-3heads-per-group", 2, 37, 6, 5, 2, 6, 16, F32, None, True, True, False),
    ("f32-packed-chunk64", 1, 100, 4, 8, 2, 8, 64, F32, None, False, False, True),
    ("bf16-chunk128-p80like", 1, 100, 4, 20, 2, 16, 128, BF16, None, True, True, False),
    ("f32-tpu-variant", 2, 45, 6, 8, 3, 4, 16, F32, "tpu", True, True, True),
]


# the first case in the fast tier, the others in the slow one
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if i == 0 else pytest.mark.slow)
                                  for i, c in enumerate(CASES)])
def test_ssd_pallas_matches_reference(case):
    _, b, l, h, p, g, n, Q, dtype, variant, has_D, has_init, has_seq = case
    hpg = h // g
    x, dt, A, B, C, D, init = _inputs(0, b, l, h, p, g, n, dtype, has_D, has_init)
    kern = _vjp_fn(ssd_pallas, Q, has_D, has_init, variant)
    ref = _vjp_fn(reference.ssd_chunked, Q, has_D, has_init)
    oracle = jax.jit(lambda x, dt, A, B, C, D, init, sid, act: reference.ssd_scan(
        x, dt, A, B, C, D, initial_state=init, seq_idx=sid, active_heads=act))
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    draws = [(hpg, 0), (1, 1)] + ([(0, 2)] if variant == "tpu" else [])
    for act_val, seed in draws:
        act = jnp.int32(act_val)
        sid = _seq_idx(seed, b, l) if has_seq else None
        r = np.random.default_rng(100 + seed)
        ct_y = jnp.asarray(r.standard_normal((b, l, h, p)), F32).astype(dtype)
        ct_s = jnp.asarray(r.standard_normal((b, h, p, n)), F32)
        y, s, grads = kern(x, dt, A, B, C, D, init, sid, act, ct_y, ct_s)
        yr, sr, grads_r = ref(x, dt, A, B, C, D, init, sid, act, ct_y, ct_s)
        yo, so = oracle(x, dt, A, B, C, D, init, sid, act)
        tol = TOL[dtype]
        tag = f"active={act_val}"
        assert y.dtype == x.dtype and s.dtype == F32 and y.shape == x.shape and s.shape == (b, h, p, n)
        assert_close(y, yr, tol, f"y vs chunked ({tag})")
        assert_close(y, yo, tol, f"y vs scan oracle ({tag})")
        assert_close(s, so, tol, f"final state vs scan oracle ({tag})")
        for name, gk, gr in zip(names, grads, grads_r):
            if gr is None:
                assert gk is None, name
                continue
            assert gk.dtype == gr.dtype, (name, gk.dtype, gr.dtype)
            assert_close(gk, gr, tol, f"d{name} ({tag})")
        # inactive heads: exactly zero output, state and gradients
        inactive = np.arange(h) % hpg >= act_val
        if inactive.any():
            assert not np.any(np.asarray(y, F32)[:, :, inactive]), "inactive heads must output zeros"
            assert not np.any(np.asarray(s)[:, inactive])
            assert not np.any(np.asarray(grads[0], F32)[:, :, inactive])
            assert not np.any(np.asarray(grads[2])[inactive])


def test_ssd_dispatch_chunk256_and_defaults():
    """kernels.ssd(impl="pallas") == impl="xla" through the public dispatch (active_heads=None,
    no D, no initial state, chunk 256 > length)."""
    b, l, h, p, g, n = 1, 70, 2, 8, 1, 8
    x, dt, A, B, C, _, _ = _inputs(3, b, l, h, p, g, n, F32, False, False)
    y, s = jax.jit(lambda *a: kernels.ssd(*a, chunk_size=256, impl="pallas"))(x, dt, A, B, C)
    yr, sr = kernels.ssd(x, dt, A, B, C, chunk_size=256, impl="xla")
    assert_close(y, yr, TOL[F32], "y")
    assert_close(s, sr, TOL[F32], "state")



def test_ssd_chunked_heads_matches_reference():
    """The CPU path of impl="xla" (group-major layout, its own chunk; ssd_heads.py, issue 17) ==
    reference.ssd_chunked (forward and every gradient) and the scan oracle: odd length, packed
    documents, initial state, D, 2 heads per group, all and one active head per group."""
    b, l, h, p, g, n, Q = 2, 45, 6, 8, 3, 4, 16
    x, dt, A, B, C, D, init = _inputs(0, b, l, h, p, g, n, F32)
    heads = _vjp_fn(kernels.ssd_chunked_heads, Q, True, True)
    ref = _vjp_fn(reference.ssd_chunked, Q, True, True)
    oracle = jax.jit(lambda x, dt, A, B, C, D, init, sid, act: reference.ssd_scan(
        x, dt, A, B, C, D, initial_state=init, seq_idx=sid, active_heads=act))
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    for act_val, seed in ((2, 0), (1, 1)):
        sid, act = _seq_idx(seed, b, l), jnp.int32(act_val)
        r = np.random.default_rng(100 + seed)
        cts = (jnp.asarray(r.standard_normal((b, l, h, p)), F32), jnp.asarray(r.standard_normal((b, h, p, n)), F32))
        y, s, grads = heads(x, dt, A, B, C, D, init, sid, act, *cts)
        yr, sr, grads_r = ref(x, dt, A, B, C, D, init, sid, act, *cts)
        yo, so = oracle(x, dt, A, B, C, D, init, sid, act)
        assert_close(y, yr, TOL[F32], f"y vs chunked (active={act_val})")
        assert_close(y, yo, TOL[F32], f"y vs scan oracle (active={act_val})")
        assert_close(s, so, TOL[F32], f"state vs scan oracle (active={act_val})")
        for name, gk, gr in zip(names, grads, grads_r):
            assert_close(gk, gr, TOL[F32], f"d{name} (active={act_val})")
    # the CPU dispatch of impl="xla" runs it (at min(chunk, CPU_CHUNK))
    y_d, s_d = kernels.ssd(x, dt, A, B, C, D, chunk_size=64, initial_state=init, impl="xla")
    y_h, s_h = kernels.ssd_chunked_heads(x, dt, A, B, C, D, chunk_size=min(64, kernels.CPU_CHUNK),
                                         initial_state=init)
    assert jnp.array_equal(y_d, y_h) and jnp.array_equal(s_d, s_h)

def test_ssd_pallas_rejects_bad_shapes():
    x, dt, A, B, C, D, init = _inputs(0, 1, 8, 3, 4, 2, 4, F32)
    with pytest.raises(ValueError, match="divisible"):
        ssd_pallas(x, dt, A, B, C, D)
    x, dt, A, B, C, D, init = _inputs(0, 1, 8, 4, 4, 2, 4, F32)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_pallas(x, dt, A, B, C, D, initial_state=init[:, :2])


@pytest.mark.parametrize("platform,variant", [("cuda", "gpu"), ("tpu", "tpu")])
def test_ssd_compiled_paths_lower(platform, variant):
    """The compiled paths (Triton on GPU, Mosaic on TPU), forward and backward, lower to the
    backend IR at Nemotron Nano shapes (64 heads x 64, d_state 128, 8 groups, chunk 128) and with
    head dim 80 + packed documents. Needs no device; the device compilers run only on one."""
    S = jax.ShapeDtypeStruct
    for b, l, h, p, g, n, Q in [(1, 4096, 64, 64, 8, 128, 128), (1, 1000, 8, 80, 2, 128, 64)]:
        args = (S((b, l, h, p), BF16), S((b, l, h), F32), S((h,), F32), S((b, l, g, n), BF16),
                S((b, l, g, n), BF16), S((h,), F32), S((b, h, p, n), F32), S((b, l), jnp.int32),
                S((), jnp.int32))

        def f(x, dt, A, B, C, D, init, sid, act):
            return ssd_pallas(x, dt, A, B, C, D, chunk_size=Q, initial_state=init, seq_idx=sid,
                              active_heads=act, variant=variant, interpret=False)

        def loss(*a):
            y, s = f(*a)
            return jnp.sum(y.astype(F32)) + jnp.sum(s)
        grad = jax.value_and_grad(loss, argnums=tuple(range(7)))
        text = jax.jit(grad).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
        assert text.count(target) >= 5, f"expected 5 Pallas kernels in the {platform} lowering"
