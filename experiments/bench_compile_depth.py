"""Compile time of forward + backward against depth: the unrolled layer loop vs layers under lax.scan.

    python experiments/bench_compile_depth.py [--depths 4 8 16 32 52] [--expert-load] [--out bench_compile_depth.json]

A small-width hybrid whose pattern cycles the Nemotron 3 Nano 30B-A3B's `MEMEM*E` block, cut to each
depth; the loss is the mean squared logits of a masked (75% width) model with `remat="full"` (the
training setting). For each depth and loop it times tracing + lowering and the XLA compile
separately (`jax.jit(...).lower(...)` then `.compile()`, nothing runs), the process CPU time of
both (less sensitive to other load than wall time) and the HLO text size, then prints a table
(scanned / unrolled ratios measured in the same run) and writes JSON after every depth.
`--expert-load`: the forward also returns the per-MoE-layer routing counts (`final_hidden(...,
return_expert_load=True)`, as the training step requests for aux-loss-free balancing).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

import elastic_jax as ej
from elastic_jax.model.decoder import final_hidden

BLOCK = "MEMEM*E"          # the 30B-A3B's repeating unit (its full pattern is irregular around it)


def model_cfg(depth: int, hidden: int) -> ej.NemotronHConfig:
    pattern = (BLOCK * (depth // len(BLOCK) + 1))[:depth]
    D = hidden
    return ej.NemotronHConfig(vocab_size=256, hidden_size=D, hybrid_override_pattern=pattern,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=D // 4,
                              intermediate_size=2 * D, mamba_num_heads=8, mamba_head_dim=D // 8, n_groups=2,
                              ssm_state_size=16, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=D, moe_shared_expert_intermediate_size=D)


def measure(cfg: ej.NemotronHConfig, scan: bool, batch: int, seq: int, expert_load: bool = False) -> dict:
    policy = ej.ComputePolicy(scan_layers=scan, remat="full")
    params = jax.eval_shape(lambda: ej.init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    widths = ej.Widths(hidden=cfg.hidden_size * 3 // 4, mamba_heads=cfg.mamba_num_heads // 2,
                       moe_experts=cfg.n_routed_experts // 2,
                       moe_ffn=cfg.moe_intermediate_size * 3 // 4).resolve(cfg)

    def loss(p, t, w):
        if not expert_load:
            return jnp.mean(ej.forward(p, t, cfg, w, policy=policy) ** 2), ()
        x, loads = final_hidden(p, t, cfg, w, policy=policy, return_expert_load=True)
        return jnp.mean((x @ p["lm_head"]) ** 2), loads

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = fn.lower(params, tokens, widths)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0,
            "hlo_chars": len(lowered.as_text()), "compiled_chars": len(compiled.as_text() or "")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--expert-load", action="store_true", help="also return the per-MoE-layer expert loads")
    ap.add_argument("--out", default="bench_compile_depth.json")
    args = ap.parse_args(argv)
    rows = []
    for depth in args.depths:
        cfg = model_cfg(depth, args.hidden)
        row = {"depth": depth, "pattern": cfg.pattern}
        for name, scan in (("unrolled", False), ("scanned", True)):
            row[name] = measure(cfg, scan, args.batch, args.seq, args.expert_load)
        row["compile_ratio"] = row["scanned"]["total_s"] / row["unrolled"]["total_s"]
        row["cpu_ratio"] = row["scanned"]["cpu_s"] / row["unrolled"]["cpu_s"]
        rows.append(row)
        u, s = row["unrolled"], row["scanned"]
        print(f"depth {depth:3d}  unrolled {u['lower_s']:6.1f}s + {u['compile_s']:6.1f}s ({u['cpu_s']:.1f} cpu-s)  "
              f"scanned {s['lower_s']:6.1f}s + {s['compile_s']:6.1f}s ({s['cpu_s']:.1f} cpu-s)  "
              f"scanned/unrolled {row['compile_ratio']:.2f} wall, {row['cpu_ratio']:.2f} cpu", flush=True)
        _write(args, rows)
    print()
    print("| layers | unrolled: lower + compile wall (s), CPU (s) | scanned: lower + compile wall (s), CPU (s) "
          "| scanned / unrolled wall, CPU | HLO chars unrolled / scanned |")
    print("|---|---|---|---|---|")
    for r in rows:
        u, s = r["unrolled"], r["scanned"]
        print(f"| {r['depth']} | {u['lower_s']:.1f} + {u['compile_s']:.1f} = {u['total_s']:.1f}, {u['cpu_s']:.1f} "
              f"| {s['lower_s']:.1f} + {s['compile_s']:.1f} = {s['total_s']:.1f}, {s['cpu_s']:.1f} "
              f"| {r['compile_ratio']:.2f}, {r['cpu_ratio']:.2f} | {u['hlo_chars']:,} / {s['hlo_chars']:,} |")
    print(f"\nwrote {args.out}")


def _write(args, rows):
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.machine(),
            "hidden": args.hidden, "batch": args.batch, "seq": args.seq, "block": BLOCK, "remat": "full",
            "expert_load": args.expert_load,
            "widths": "75% hidden/moe_ffn, 50% mamba heads/experts (masked)"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
