"""Kernel benchmark: build, check against the reference, time, and compare with measured ceilings.

    python kernels/bench.py [--out runs/kernel_bench.json] [--quick] [--variant gpu|tpu] [--seq 4096,16384]

For each kernel (SSD chunked scan; MoE grouped matmul, up and down projection) and each impl
("xla" reference, "pallas"), forward and forward+backward: the median time, achieved TFLOP/s
and GB/s (analytic counts of the work the kernel does / the compulsory HBM traffic), their
percentage of ceilings measured in the same run (a large matmul, a large copy), the error
against the XLA reference, and the time ratio of the 50%-active submodel (half the Mamba heads
per group; half the expert width) to the full one.

On GPU / TPU the sizes are Nemotron Nano v3's (Mamba: 64 heads x 64, d_state 128, 8 groups,
chunk 128, sequence 4k-16k; MoE: 128 experts x 1856, top-6, hidden 2688). On CPU the same table
runs in Pallas interpret mode at small sizes (the numbers then say nothing about GPU speed; the
run checks that everything builds and agrees). Results are written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


from elastic_jax import kernels
F32, BF16 = jnp.float32, jnp.bfloat16


# ----------------------------------------------------------------------------- timing

def _time(fn, *args, iters, warmup=1, slow_s=2.0):
    """Median wall time (s) of a jitted fn over `iters` runs, after compile + warmup. A call
    slower than `slow_s` is timed once (keeps e.g. a dense-expanded reference affordable)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    if first > slow_s:
        return first
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    ts = [first]
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_ceilings(accel: bool, iters: int):
    """Peak-ish matmul TFLOP/s (bf16 on accelerators, f32 on CPU) and copy GB/s (read + write)."""
    r = np.random.default_rng(0)
    if accel:
        nmm, dt, ncopy = 8192, BF16, 1 << 28          # 8192^3 bf16; 1 GiB f32 copy
    else:
        nmm, dt, ncopy = 1024, F32, 1 << 23           # 1024^3 f32; 32 MiB f32 copy
    a = jnp.asarray(r.standard_normal((nmm, nmm)), F32).astype(dt)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
    t_mm = _time(mm, a, a, iters=iters)
    x = jnp.zeros((ncopy,), F32)
    cp = jax.jit(lambda x: x + 1.0)
    t_cp = _time(cp, x, iters=iters)
    return dict(matmul_tflops=2 * nmm ** 3 / t_mm / 1e12, matmul_shape=[nmm, nmm, nmm],
                matmul_dtype=str(jnp.dtype(dt)), copy_gbps=2 * ncopy * 4 / t_cp / 1e9,
                copy_bytes=ncopy * 4)


def _rel_err(a, b):
    a = np.asarray(jnp.asarray(a, F32))
    b = np.asarray(jnp.asarray(b, F32))
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30))


# ----------------------------------------------------------------------------- SSD

def ssd_counts(b, L, h, p, g, n, Q, itemsize, active_frac=1.0):
    """(fwd flops, fwd+bwd flops, fwd bytes, fwd+bwd bytes) of the kernels' work."""
    nc = -(-L // Q)
    ha = h * active_frac
    fwd = b * nc * (g * 2 * Q * Q * n + ha * (2 * Q * Q * p + 4 * Q * p * n))
    bwd = b * nc * (g * 2 * Q * Q * n + ha * (4 * Q * Q * p + 4 * Q * Q * n + 12 * Q * p * n))
    xb = b * L * ha * p * itemsize
    bcb = b * L * g * n * itemsize
    states = nc * b * ha * p * n * 4
    fwd_bytes = 3 * xb + 3 * bcb + 4 * states          # x twice, y, B twice, C; S w/r, H w/r
    bwd_bytes = 5 * xb + 6 * bcb + 10 * states + 2 * b * L * g * n * 4
    return fwd, fwd + bwd, fwd_bytes, fwd_bytes + bwd_bytes


def bench_ssd(b, L, h, p, g, n, Q, dtype, impls, variant, iters, rows, ceil):
    r = np.random.default_rng(0)
    nrm = lambda *s: jnp.asarray(r.standard_normal(s), F32)
    x, B, C = nrm(b, L, h, p).astype(dtype), nrm(b, L, g, n).astype(dtype), nrm(b, L, g, n).astype(dtype)
    dt = jax.nn.softplus(nrm(b, L, h) - 2.0)
    A, D = -jnp.exp(0.5 * nrm(h)), nrm(h)
    ct = nrm(b, L, h, p).astype(dtype)
    hpg = h // g
    shape = f"b{b} L{L} h{h}x{p} g{g} n{n} Q{Q} {jnp.dtype(dtype).name}"
    counts = {fr: ssd_counts(b, L, h, p, g, n, Q, jnp.dtype(dtype).itemsize, fr) for fr in (1.0, 0.5)}

    def make(impl):
        kw = dict(chunk_size=Q, impl=impl)

        def fwd(x, dt, A, B, C, D, act):
            return kernels.ssd(x, dt, A, B, C, D, active_heads=act, **kw)

        def fwdbwd(x, dt, A, B, C, D, act):
            (y, s), vjp = jax.vjp(lambda *a: fwd(*a, act), x, dt, A, B, C, D)
            return vjp((ct, jnp.zeros_like(s)))
        return jax.jit(fwd), jax.jit(fwdbwd)

    outs = {}
    for impl in impls:
        try:
            f, fb = make(impl)
            full, half = jnp.int32(hpg), jnp.int32(max(1, hpg // 2))
            args = (x, dt, A, B, C, D)
            outs[impl] = (f(*args, full), fb(*args, full))
            for pas, fn, ci in (("fwd", f, 0), ("fwd+bwd", fb, 1)):
                t = _time(fn, *args, full, iters=iters)
                t_half = _time(fn, *args, half, iters=iters)
                fl, by = counts[1.0][ci], counts[1.0][2 + ci]
                rows.append(_row("ssd", shape, impl, pas, t, fl, by, ceil, t_half / t))
        except Exception as e:  # record and go on: one broken lowering must not hide the rest
            rows.append(dict(kernel="ssd", shape=shape, impl=impl, error=_err(e)))
    _attach_errors(rows, "ssd", shape, outs)


# ----------------------------------------------------------------------------- GMM

def bench_gmm(tokens, hidden, ffn, experts, topk, dtype, impls, variant, iters, rows, ceil):
    r = np.random.default_rng(0)
    logits = r.standard_normal((tokens, experts)) + 0.5 * r.standard_normal((1, experts))
    idx = np.argsort(-logits, axis=1)[:, :topk].reshape(-1)
    gs = jnp.asarray(np.bincount(idx, minlength=experts), jnp.int32)
    m = tokens * topk
    isz = jnp.dtype(dtype).itemsize
    for name, k, n, elastic in (("gmm_up", hidden, ffn, "n"), ("gmm_down", ffn, hidden, "k")):
        lhs = jnp.asarray(r.standard_normal((m, k)), F32).astype(dtype)
        rhs = (jnp.asarray(r.standard_normal((experts, k, n)), F32) / np.sqrt(k)).astype(dtype)
        ct = jnp.asarray(r.standard_normal((m, n)), F32).astype(dtype)
        shape = f"m{m} k{k} n{n} E{experts} top{topk} {jnp.dtype(dtype).name}"

        def make(impl):
            def fwd(lhs, rhs, gs, an, ak):
                return kernels.gmm(lhs, rhs, gs, active_n=an, active_k=ak, impl=impl,
                                   preferred_element_type=dtype)

            def fwdbwd(lhs, rhs, gs, an, ak):
                _, vjp = jax.vjp(lambda a, b: fwd(a, b, gs, an, ak), lhs, rhs)
                return vjp(ct)
            return jax.jit(fwd), jax.jit(fwdbwd)

        full = (jnp.int32(n), jnp.int32(k))
        half = (jnp.int32(n // 2), jnp.int32(k)) if elastic == "n" else (jnp.int32(n), jnp.int32(k // 2))
        fl = 2 * m * k * n
        by = m * k * isz + experts * k * n * isz + m * n * isz
        outs = {}
        for impl in impls:
            try:
                f, fb = make(impl)
                args = (lhs, rhs, gs)
                outs[impl] = (f(*args, *full), fb(*args, *full))
                for pas, fn, mult_f, mult_b in (("fwd", f, 1, 1), ("fwd+bwd", fb, 3, 3)):
                    t = _time(fn, *args, *full, iters=iters)
                    t_half = _time(fn, *args, *half, iters=iters)
                    rows.append(_row(name, shape, impl, pas, t, mult_f * fl, mult_b * by, ceil,
                                     t_half / t))
            except Exception as e:
                rows.append(dict(kernel=name, shape=shape, impl=impl, error=_err(e)))
        _attach_errors(rows, name, shape, outs)


# ----------------------------------------------------------------------------- table

def _err(e):
    return (type(e).__name__ + ": " + str(e))[:800] + "\n" + traceback.format_exc(limit=3)[-800:]


def _row(kernel, shape, impl, pas, t, flops, nbytes, ceil, ratio):
    tf, gb = flops / t / 1e12, nbytes / t / 1e9
    return {"kernel": kernel, "shape": shape, "impl": impl, "pass": pas, "time_ms": t * 1e3, "tflops": tf,
            "gbps": gb, "pct_flops": 100 * tf / ceil["matmul_tflops"],
            "pct_bw": 100 * gb / ceil["copy_gbps"], "ratio_50": ratio}


def _attach_errors(rows, kernel, shape, outs):
    """Max relative error of each impl's fwd output / grads against the xla reference."""
    if "xla" not in outs:
        return
    ref_f, ref_b = outs["xla"]
    for impl, (o_f, o_b) in outs.items():
        ef = _rel_err(jax.tree.leaves(o_f)[0], jax.tree.leaves(ref_f)[0])
        eb = max(_rel_err(a, b2) for a, b2 in zip(jax.tree.leaves(o_b), jax.tree.leaves(ref_b)))
        for r in rows:
            if r.get("kernel") == kernel and r.get("shape") == shape and r.get("impl") == impl:
                r["err_vs_xla"] = ef if r.get("pass") == "fwd" else eb


def print_table(rows, ceil):
    print(f"\nceilings: matmul {ceil['matmul_tflops']:.2f} TFLOP/s ({ceil['matmul_dtype']} "
          f"{ceil['matmul_shape'][0]}^3), copy {ceil['copy_gbps']:.1f} GB/s")
    hdr = (f"{'kernel':9} {'shape':42} {'impl':6} {'pass':8} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
           f"{'%mm':>6} {'%bw':>6} {'50%/full':>8} {'err':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:9} {r['shape']:42} {r['impl']:6} FAILED: {r['error'].splitlines()[0][:120]}")
            continue
        err = r.get("err_vs_xla")
        print(f"{r['kernel']:9} {r['shape']:42} {r['impl']:6} {r['pass']:8} {r['time_ms']:9.3f} "
              f"{r['tflops']:8.3f} {r['gbps']:8.1f} {r['pct_flops']:6.1f} {r['pct_bw']:6.1f} "
              f"{r['ratio_50']:8.2f} {('%.1e' % err) if err is not None else '-':>8}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("runs", "kernel_bench.json"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes / iterations")
    ap.add_argument("--variant", choices=["gpu", "tpu"], default=None,
                    help="Pallas kernel variant (default: the platform's)")
    ap.add_argument("--impls", default="xla,pallas")
    ap.add_argument("--seq", default=None, help="SSD sequence lengths, comma separated")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)

    if args.variant:   # read by kernels._common.resolve_lowering
        os.environ["ELASTIC_JAX_PALLAS_VARIANT"] = args.variant
    backend = jax.default_backend()
    accel = backend in ("gpu", "tpu", "cuda", "rocm")
    impls = args.impls.split(",")
    iters = args.iters or (10 if accel else 3)
    print(f"backend {backend}, device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"pallas {'compiled' if accel else 'interpret mode'}")
    ceil = measure_ceilings(accel, iters=max(3, iters // 2))
    rows = []
    if accel:
        seqs = [int(s) for s in args.seq.split(",")] if args.seq else ([4096] if args.quick else [4096, 8192, 16384])
        for L in seqs:
            bench_ssd(1, L, 64, 64, 8, 128, 128, BF16, impls, args.variant, iters, rows, ceil)
        for tokens in ([4096] if args.quick else [4096, 16384]):
            bench_gmm(tokens, 2688, 1856, 128, 6, BF16, impls, args.variant, iters, rows, ceil)
    else:
        seqs = [int(s) for s in args.seq.split(",")] if args.seq else ([256] if args.quick else [256, 1024])
        for L in seqs:
            bench_ssd(1, L, 8, 16, 2, 16, 64, F32, impls, args.variant, iters, rows, ceil)
        for tokens in ([64] if args.quick else [64, 256]):   # 2 tiles along k and n (64-wide)
            bench_gmm(tokens, 128, 128, 8, 2, F32, impls, args.variant, iters, rows, ceil)
    print_table(rows, ceil)
    result = dict(backend=backend, device=jax.devices()[0].device_kind, jax=jax.__version__,
                  host=_platform.node(), interpret=not accel, variant=args.variant,
                  quick=args.quick, ceilings=ceil, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
