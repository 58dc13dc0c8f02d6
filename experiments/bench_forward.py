"""Forward and decode throughput of the full model and of 75% / 50% sliced submodels.

    python experiments/bench_forward.py [--out bench_forward.json] [--hidden 128] [--seq 256]

Prints a table (tokens/s and the ratio to the full model, measured in the same run) and writes
JSON. The sliced models are real smaller arrays (ej.slice_params), so the ratios show what a
nested submodel saves at serving time on this machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

import elastic_jax as ej


def _time(fn, *args, repeats=5):
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def widths_at(cfg: ej.NemotronHConfig, frac: float) -> ej.Widths:
    """A homogeneous submodel at `frac` of every width axis (rounded to the group constraints)."""
    def r(full, div, lo=1):
        return max(lo, int(full * frac) // div * div)
    return ej.Widths(hidden=r(cfg.hidden_size, 1), mamba_heads=r(cfg.mamba_num_heads, cfg.n_groups, cfg.n_groups),
                     attn_heads=r(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads),
                     ffn=r(cfg.intermediate_size, 1), moe_experts=r(cfg.n_routed_experts, cfg.n_group,
                                                                      cfg.num_experts_per_tok),
                     moe_ffn=r(cfg.moe_intermediate_size, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_forward.json")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=32)
    args = ap.parse_args(argv)
    D = args.hidden
    cfg = ej.NemotronHConfig(vocab_size=512, hidden_size=D, hybrid_override_pattern="MEM*EM-E",
                             num_attention_heads=8, num_key_value_heads=2, head_dim=D // 8,
                             intermediate_size=4 * D, mamba_num_heads=16, mamba_head_dim=D // 8, n_groups=2,
                             ssm_state_size=32, chunk_size=64, n_routed_experts=16, num_experts_per_tok=2,
                             moe_intermediate_size=D, moe_shared_expert_intermediate_size=2 * D)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq), 0, cfg.vocab_size)
    rows = []
    for name, frac in (("full", 1.0), ("75%", 0.75), ("50%", 0.5)):
        sub_cfg, sub = (cfg, params) if frac == 1.0 else ej.slice_params(params, cfg, widths_at(cfg, frac))
        fwd = jax.jit(lambda p, t, c=sub_cfg: ej.forward(p, t, c))
        t_fwd = _time(fwd, sub, tokens)
        prompt = tokens[:, :16]
        _, cache = ej.prefill(sub, prompt, sub_cfg, max_len=16 + args.decode_steps)
        step = jax.jit(lambda p, tok, c, cf=sub_cfg: ej.decode_step(p, tok, c, cf))

        def decode(p, cache0):
            c = cache0
            tok = prompt[:, -1:]
            for _ in range(args.decode_steps):
                lg, c = step(p, tok, c)
                tok = jnp.argmax(lg[:, -1:], axis=-1).astype(jnp.int32)
            return tok
        t_dec = _time(decode, sub, cache, repeats=3)
        rows.append({"model": name, "params": ej.count_params(sub),
                     "active_params": ej.param_count(sub_cfg, active=True),
                     "forward_tok_s": args.batch * args.seq / t_fwd,
                     "decode_tok_s": args.batch * args.decode_steps / t_dec})
    for r in rows:
        r["forward_ratio"] = r["forward_tok_s"] / rows[0]["forward_tok_s"]
        r["decode_ratio"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    print(f"{'model':6} {'params':>9} {'active':>9} {'fwd tok/s':>11} {'x full':>7} {'decode tok/s':>13} {'x full':>7}")
    for r in rows:
        print(f"{r['model']:6} {r['params']:9d} {r['active_params']:9d} {r['forward_tok_s']:11.0f} "
              f"{r['forward_ratio']:7.2f} {r['decode_tok_s']:13.0f} {r['decode_ratio']:7.2f}")
    result = {"config": cfg.to_dict(), "batch": args.batch, "seq": args.seq, "decode_steps": args.decode_steps,
              "backend": jax.default_backend(), "machine": platform.machine(), "jax": jax.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
