"""Decode throughput: the compiled loop (one `lax.while_loop` per phase) vs the per-token loop
(Python-dispatched steps, the streaming fallback), same tokens, same checkpoint.

    python experiments/bench_generate.py CHECKPOINT_DIR [--think 50%] [--answer 100%] [--out bench.json]

CHECKPOINT_DIR: an HF export with a tokenizer, or the pipeline's `checkpoints/nested`. Prints a
table (tokens/s per phase and loop, the ratio compiled / per-token) and writes JSON. Each
configuration is run once to compile, then timed `--repeats` times (best kept); the phases'
tokens/s exclude compilation in any case (`TextPhase.compile_s`).
"""
from __future__ import annotations

import argparse
import json
import time

import jax


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--think", default=None)
    ap.add_argument("--answer", default=None)
    ap.add_argument("--prompt", default="a 3 b 7 c 2 d 9 e 5 f 1", help="one user message (repeated --batch times)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--thinking-budget", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=44, help="thinking + end text + answer (vLLM's max_tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_generate.json")
    args = ap.parse_args(argv)
    from elastic_jax.infer.text import TextGenerator
    gen = TextGenerator.load(args.checkpoint)
    names = gen.names()
    think = args.think or names[-2 if len(names) > 1 else 0]
    answer = args.answer or names[0]
    kw = dict(think=think, answer=answer, thinking_budget=args.thinking_budget, grace_period=0,
              max_tokens=args.max_tokens)
    prompts = [args.prompt] * args.batch
    rows = []
    for loop, stream in (("compiled", None), ("per-token", lambda *a: None)):
        gen.generate(prompts, stream=stream, **kw)          # compile
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = gen.generate(prompts, stream=stream, **kw)
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, out)
        for phase, st in best[1].phases.items():
            rows.append({"loop": loop, "phase": phase, "model": st.model, "tokens": st.tokens,
                         "latency_s": st.latency_s, "tokens_per_s": st.tokens_per_s})
    ratio = {r["phase"]: r["tokens_per_s"] / next(q["tokens_per_s"] for q in rows
                                                 if q["loop"] == "per-token" and q["phase"] == r["phase"])
             for r in rows if r["loop"] == "compiled"}
    print(f"backend {jax.default_backend()}, batch {args.batch}, think {think} -> answer {answer}")
    print(f"{'loop':<10} {'phase':<7} {'model':<6} {'tokens':>6} {'seconds':>8} {'tok/s':>8}")
    for r in rows:
        print(f"{r['loop']:<10} {r['phase']:<7} {r['model']:<6} {r['tokens']:>6} {r['latency_s']:>8.3f} "
              f"{r['tokens_per_s']:>8.1f}")
    print("compiled / per-token tokens/s:", {k: round(v, 2) for k, v in ratio.items()})
    with open(args.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "args": vars(args), "rows": rows,
                   "ratio_compiled_over_per_token": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
