"""Where a training step's time goes, per layer kind: forward + backward of one-layer models.

    python kernels/bench_layers.py [--out runs/layer_bench.json] [--batch 32] [--seq 64] [--iters 20]

The model is the main job's parent (`experiments/tiny_star_elastic.py`) with its pattern replaced by
one layer of each registered kind (Mamba2, attention, MoE, MLP); each row is the median time of
`jax.value_and_grad` of the summed logits, jitted, over `--iters` calls after compile. Two rows break
the Mamba layer down: the SSD chunked scan alone and the depthwise causal conv alone, at the same
shapes. The "share" column is a row's time over the sum of the one-layer models. Results are
printed as a table and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import elastic_jax as ej
from elastic_jax import kernels
from elastic_jax.experiment import load_experiment
from elastic_jax.model.kinds import KINDS, mamba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_ms(fn, *args, iters: int) -> float:
    """Median wall time (ms) of the jitted value-and-gradient of `fn` (summed output) over `iters` calls."""
    step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(batch: int, seq: int, iters: int) -> list[dict]:
    cfg = load_experiment(os.path.join(ROOT, "experiments", "tiny_star_elastic.py")).model
    key = jax.random.PRNGKey(0)
    tokens = jax.random.randint(key, (batch, seq), 0, cfg.vocab_size)
    segments = jnp.ones((batch, seq), jnp.int32)
    rows = []
    for kind in KINDS.values():          # every registered layer kind, one layer of it
        c = cfg.replace(hybrid_override_pattern=kind.CHAR)
        params = ej.init_params(c, key)
        ms = median_ms(lambda p, c=c: ej.forward(p, tokens, c, None, segment_ids=segments)[..., 0], params, iters=iters)
        rows.append({"row": f"one-layer model: {kind.NAME} layer", "ms": ms, "layer": True})
    H, P, G, N, K = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (batch, seq, H, P))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, H)))
    A, D = -jnp.exp(jax.random.normal(ks[2], (H,))), jnp.ones((H,))
    B, C = jax.random.normal(ks[3], (batch, seq, G, N)), jax.random.normal(ks[4], (batch, seq, G, N))
    ms = median_ms(lambda x, dt, A, B, C, D: kernels.ssd(x, dt, A, B, C, D, chunk_size=cfg.chunk_size)[0] ** 2,
                   x, dt, A, B, C, D, iters=iters)
    rows.append({"row": "  Mamba part: SSD chunked scan alone", "ms": ms, "layer": False})
    width = H * P + 2 * G * N
    xbc = jax.random.normal(ks[5], (batch, seq, width))
    w, b = jax.random.normal(ks[0], (K, width)), jnp.zeros((width,))
    ctx = jnp.zeros((batch, K - 1, width))
    ms = median_ms(lambda xbc, w, b: mamba._causal_conv(xbc, w, b, ctx, segments) ** 2, xbc, w, b, iters=iters)
    rows.append({"row": "  Mamba part: causal conv alone", "ms": ms, "layer": False})
    total = sum(r["ms"] for r in rows if r["layer"])
    for r in rows:
        r["share"] = r["ms"] / total
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/layer_bench.json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    rows = run(args.batch, args.seq, args.iters)
    print(f"forward + backward, batch {args.batch} x {args.seq}, {jax.devices()[0].platform}, jax {jax.__version__}")
    print(f"{'row':44s} {'ms':>8s} {'share':>7s}")
    for r in rows:
        print(f"{r['row']:44s} {r['ms']:8.2f} {100 * r['share']:6.1f}%")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch": args.batch, "seq": args.seq, "iters": args.iters, "platform": jax.devices()[0].platform,
                   "jax": jax.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
