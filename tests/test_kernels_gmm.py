"""Pallas grouped matmul (interpret mode on CPU) == jax.lax.ragged_dot reference, forward and
both gradients (d lhs through the transposed-rhs gmm, d rhs through tgmm).

Seeded grid: one compile per shape; group sizes (with empty groups, rows past the sum) and the
elastic arguments are traced, so several draws run per compile. Both variants run.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax import kernels

from elastic_jax.kernels import reference
from elastic_jax.kernels import gmm_pallas as gmm_mod
from conftest import assert_close
gmm_pallas = gmm_mod.gmm_pallas

F32, BF16 = jnp.float32, jnp.bfloat16


def _group_sizes(r, m, G, kind):
    if kind == "all-empty":
        return np.zeros(G, np.int32)
    total = m if kind == "exact" else int(r.integers(m // 2, m))       # "short": rows past the sum
    cuts = np.sort(r.integers(0, total + 1, G - 1))
    gs = np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)
    gs[r.integers(0, G - 1)] = 0                                      # at least one empty group
    gs[-1] += total - gs.sum()
    return gs


def _vjp_fn(fn, out_dtype, **kw):
    def run(lhs, rhs, gs, ag, ak, an, ct):
        f = lambda a, b: fn(a, b, gs, active_groups=ag, active_k=ak, active_n=an,
                            preferred_element_type=out_dtype, **kw)
        out, vjp = jax.vjp(f, lhs, rhs)
        return (out,) + vjp(ct)
    return jax.jit(run)


# (id, m, k, n, G, dtype, out dtype, variant, tiling)
CASES = [
    ("f32-gpu", 50, 20, 24, 4, F32, F32, None, (16, 16, 16)),
    ("bf16-gpu-f32out", 96, 48, 40, 5, BF16, F32, None, (32, 16, 32)),
    ("f32-tpu", 70, 40, 24, 6, F32, F32, "tpu", (16, 16, 16)),
    ("bf16-tpu", 64, 32, 48, 3, BF16, BF16, "tpu", (16, 32, 16)),
]


# the first case in the fast tier, the others in the slow one
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if i == 0 else pytest.mark.slow)
                                  for i, c in enumerate(CASES)])
def test_gmm_pallas_matches_ragged_dot(case):
    _, m, k, n, G, dtype, out_dtype, variant, tiling = case
    _check_against_ragged_dot(lambda *a, **kw: gmm_pallas(*a, tiling=tiling, variant=variant, **kw),
                              m, k, n, G, dtype, out_dtype)


# (id, m, k, n, G, dtype, out dtype, rows per tile)
SEGMENT_CASES = [("f32-tile8", 70, 40, 24, 6, F32, F32, 8), ("bf16-f32out-default-tile", 96, 48, 40, 5, BF16, F32, None)]


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=[c[0] for c in SEGMENT_CASES])
def test_gmm_segments_matches_ragged_dot(case):
    """The CPU lowering of the XLA path (tile-padded sorted segments, issue 17): groups spanning
    several tiles, empty groups, rows past the sum, the elastic arguments, both gradients."""
    _, m, k, n, G, dtype, out_dtype, tile = case
    _check_against_ragged_dot(lambda *a, **kw: kernels.gmm_segments(*a, tile=tile, **kw), m, k, n, G, dtype, out_dtype)


def _check_against_ragged_dot(fn, m, k, n, G, dtype, out_dtype):
    r = np.random.default_rng(0)
    lhs = jnp.asarray(r.standard_normal((m, k)), F32).astype(dtype)
    rhs = jnp.asarray(r.standard_normal((G, k, n)), F32).astype(dtype)
    kern = _vjp_fn(fn, out_dtype)
    ref = _vjp_fn(reference.gmm_reference, out_dtype)
    tol = 2e-5 if dtype == F32 and out_dtype == F32 else 1.5e-2
    draws = [("exact", G, k, n), ("short", max(1, G - 2), k // 2 + 1, n - 5),
             ("exact", 0, k, n), ("all-empty", G, k, n), ("short", G, k, n // 3)]
    for kind, ag, ak, an in draws:
        gs = jnp.asarray(_group_sizes(r, m, G, kind))
        ct = jnp.asarray(r.standard_normal((m, n)), F32).astype(out_dtype)
        args = (lhs, rhs, gs, jnp.int32(ag), jnp.int32(ak), jnp.int32(an), ct)
        out, dl, dr = kern(*args)
        out_r, dl_r, dr_r = ref(*args)
        tag = f"{kind} gs={np.asarray(gs).tolist()} active=({ag},{ak},{an})"
        assert out.dtype == out_dtype and dl.dtype == dtype and dr.dtype == dtype
        assert_close(out, out_r, tol, f"out {tag}")
        assert_close(dl, dl_r, tol, f"d lhs {tag}")
        assert_close(dr, dr_r, tol, f"d rhs {tag}")
        # masked experts / columns / rows past the groups are exactly zero
        ends = np.cumsum(np.asarray(gs))
        o = np.asarray(out, F32)
        assert not o[ends[-1]:].any() and not o[:, an:].any()
        if ag < G:
            assert not o[ends[ag - 1] if ag else 0:].any()
            assert not np.asarray(dr, F32)[ag:].any()
        assert not np.asarray(dl, F32)[:, ak:].any()


def test_gmm_xla_path_on_cpu_uses_segments_above_decode_sizes():
    """The rule of kernels.use_segments: a prefill's rows take the segments lowering (no ragged_dot
    in the program), a decode step's few rows keep ragged_dot."""
    rhs = jax.ShapeDtypeStruct((16, 32, 32), F32)
    gs = jax.ShapeDtypeStruct((16,), jnp.int32)
    for m, want in ((4096, False), (16, True)):
        lhs = jax.ShapeDtypeStruct((m, 32), F32)
        jaxpr = str(jax.make_jaxpr(lambda a, b, g: kernels.gmm(a, b, g, impl="xla"))(lhs, rhs, gs))
        assert ("ragged_dot" in jaxpr) == want, (m, want)
        assert kernels.use_segments(m, 16) != want


def test_gmm_dispatch_defaults():
    """kernels.gmm(impl="pallas") == impl="xla" with the default tiling and no active args."""
    r = np.random.default_rng(1)
    lhs = jnp.asarray(r.standard_normal((40, 24)), F32)
    rhs = jnp.asarray(r.standard_normal((3, 24, 20)), F32)
    gs = jnp.asarray([12, 0, 25], jnp.int32)
    out = jax.jit(lambda a, b, g: kernels.gmm(a, b, g, impl="pallas"))(lhs, rhs, gs)
    assert_close(out, kernels.gmm(lhs, rhs, gs, impl="xla"), 2e-5, "out")


def test_group_metadata_covers_every_row_once_per_group():
    """Every (row, group) pair is visited by exactly one step; visits of a tile are consecutive."""
    m, tm = 45, 8
    gs = jnp.asarray([5, 0, 20, 3, 0, 9], jnp.int32)       # sum 37 < m: tail rows 37..44
    off, gid, tile, num, num_act = jax.jit(
        lambda g: gmm_mod.group_metadata(g, m, tm, 4, tail=True, visit_empty=False))(gs)
    off, gid, tile, num = map(np.asarray, (off, gid, tile, int(num)))
    covered = np.zeros(m, int)
    for t in range(num):
        rows = np.arange(tile[t] * tm, min(tile[t] * tm + tm, m))
        covered[rows[(rows >= off[gid[t]]) & (rows < off[gid[t] + 1])]] += 1
    assert (covered == 1).all()
    assert (np.diff(tile[:num]) >= 0).all() and (np.diff(gid[:num]) >= 0).all()
    assert int(num_act) == int(np.sum(gid[:num] < 4))


@pytest.mark.parametrize("platform,variant", [("cuda", "gpu"), ("tpu", "tpu")])
def test_gmm_compiled_paths_lower(platform, variant):
    """gmm forward and backward (transposed-rhs gmm + tgmm) lower to Triton IR / Mosaic MLIR at
    Nemotron Nano MoE shapes (128 experts x 1856, hidden 2688, 4096 tokens x top-6). Needs no
    device; the device compilers run only on one."""
    S = jax.ShapeDtypeStruct
    m, k, n, G = 4096 * 6, 2688, 1856, 128
    args = (S((m, k), BF16), S((G, k, n), BF16), S((G,), jnp.int32), S((), jnp.int32),
            S((), jnp.int32), S((), jnp.int32))

    def loss(a, b, gs, ag, ak, an):
        out = gmm_pallas(a, b, gs, active_groups=ag, active_k=ak, active_n=an, variant=variant,
                         interpret=False)
        return jnp.sum(out.astype(F32))
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    assert text.count(target) >= 3, f"expected 3 Pallas kernels in the {platform} lowering"
