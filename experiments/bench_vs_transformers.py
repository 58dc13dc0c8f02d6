"""Forward (prefill / training-shaped) time per layer kind against transformers, same weights.

    python experiments/bench_vs_transformers.py [--out bench_vs_transformers.json] [--repeats 5]

For each model (`MMMM` Mamba2, `EEEE` MoE, `****` attention, `----` relu² MLP, the hybrid
`M*MEM-ME`; hidden 256, f32, batch 4 x 512 by default): a random `transformers`
`NemotronHForCausalLM` is saved with `save_pretrained` and read back with `ej.load_hf`, then the
jitted `ej.forward` and the torch model (`use_cache=False`, `torch.no_grad`) are timed interleaved
in this process, median of `--repeats`. Also this machine's measured f32 matmul FLOP/s (a jitted
square matmul, timed interleaved with each row's runs so it sees the same load), each row's analytic FLOPs / time as a fraction of it, and the elastic (masked)
forward at full and at 50% widths against the plain forward. Prints a table and writes JSON
(with the load average: the numbers are wall-clock on a possibly shared machine).

Analytic FLOPs (per token, 2 per multiply-add): every weight matmul (2 x matrix size; MoE: the
top-k routed experts + shared expert + router), attention scores and values over the causal
half (2 x 2 x heads x head_dim x (L+1)/2), and the chunked SSD contractions (chunk Q: C·Bᵀ
2·Q·N·G, masked scores·x 2·Q·H·P, chunk states and state outputs 4·N·H·P), the LM head included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej

MODELS = ("MMMM", "EEEE", "****", "----", "M*MEM-ME")


def hf_kwargs(pattern: str, D: int, vocab: int) -> dict:
    """transformers NemotronHConfig kwargs (bench_forward-sized: 8 heads / 2 KV, 16 experts top-4)."""
    kinds = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    return dict(vocab_size=vocab, hidden_size=D, layers_block_type=[kinds[c] for c in pattern],
                num_attention_heads=8, num_key_value_heads=2, head_dim=D // 8, intermediate_size=4 * D,
                mamba_num_heads=16, mamba_head_dim=D // 8, n_groups=2, ssm_state_size=32, conv_kernel=4,
                chunk_size=64, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=D,
                moe_shared_expert_intermediate_size=2 * D, n_group=1, topk_group=1)


def hf_model(kw: dict, seed: int = 0):
    """A random transformers NemotronH with O(1) activations (as tests/test_hf.py)."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / p.shape[-1] ** 0.5))
            elif name.endswith("dt_bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def analytic_flops(cfg: ej.NemotronHConfig, B: int, L: int) -> float:
    """FLOPs of one forward of [B, L] tokens (module docstring)."""
    D = cfg.hidden_size
    per_tok = 2.0 * D * cfg.vocab_size                                        # LM head
    for c in cfg.pattern:
        if c == "M":
            H, P, G, N, Q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.chunk_size
            proj = D * (2 * H * P + 2 * G * N + H) + H * P * D
            per_tok += 2.0 * proj + 2.0 * Q * N * G + 2.0 * Q * H * P + 4.0 * N * H * P
        elif c == "*":
            nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            per_tok += 2.0 * D * hd * (2 * nH + 2 * nKV) + 2.0 * 2 * nH * hd * (L + 1) / 2
        elif c == "-":
            per_tok += 2.0 * 2 * D * cfg.intermediate_size
        elif c == "E":
            per_tok += (2.0 * 2 * D * cfg.moe_intermediate_size * cfg.num_experts_per_tok
                        + 2.0 * 2 * D * cfg.moe_shared_expert_intermediate_size + 2.0 * D * cfg.n_routed_experts)
    return per_tok * B * L


PEAK_N = 2048


def matmul_peak_fn(n: int = PEAK_N):
    """A jitted f32 [n, n] x [n, n] matmul (2·n³ FLOPs), compiled: this machine's matmul peak."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    return lambda: f(a, b)


def torch_matmul_peak_fn(n: int = PEAK_N):
    """The same f32 [n, n] x [n, n] matmul in torch (its own BLAS), to check the peak is not XLA's alone."""
    import torch
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return lambda: torch.mm(a, b)


def widths_at(cfg: ej.NemotronHConfig, frac: float) -> ej.Widths:
    """Every width axis at `frac` of the parent (as arrays: traced, one program for every budget)."""
    def r(full, div, lo=1):
        return max(lo, int(full * frac) // div * div)
    axes = {"M": dict(mamba_heads=r(cfg.mamba_num_heads, cfg.n_groups, cfg.n_groups)),
            "*": dict(attn_heads=r(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads)),
            "-": dict(ffn=r(cfg.intermediate_size, 1)),
            "E": dict(moe_experts=r(cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok),
                      moe_ffn=r(cfg.moe_intermediate_size, 1))}
    kw = {k: v for c in set(cfg.pattern) for k, v in axes[c].items()}
    return ej.Widths(hidden=r(cfg.hidden_size, 1), **kw).resolve(cfg)


def _timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench_model(pattern: str, args, tmp: str, peak_fn, torch_peak_fn) -> dict:
    import torch
    kw = hf_kwargs(pattern, args.hidden, args.vocab)
    model = hf_model(kw)
    path = os.path.join(tmp, pattern.replace("*", "A").replace("-", "F"))
    model.save_pretrained(path)
    cfg, params = ej.load_hf(path)
    tokens = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    t_torch = torch.tensor(tokens, dtype=torch.long)
    tok = jnp.asarray(tokens)
    fwd = jax.jit(lambda p, t, w: ej.forward(p, t, cfg, w))
    full_w, half_w = widths_at(cfg, 1.0), widths_at(cfg, 0.5)

    def run_hf():
        with torch.no_grad():
            return model(t_torch, use_cache=False).logits

    runs = {"matmul_peak": peak_fn, "torch_matmul_peak": torch_peak_fn, "transformers": run_hf, "elastic_jax": lambda: fwd(params, tok, None),
            "masked_full": lambda: fwd(params, tok, full_w), "masked_50": lambda: fwd(params, tok, half_w)}
    ours = np.asarray(runs["elastic_jax"]())
    ref = run_hf().float().numpy()
    max_diff = float(np.max(np.abs(ours - ref)))
    masked_diff = float(np.max(np.abs(np.asarray(runs["masked_full"]()) - ours)))
    runs["masked_50"]()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):      # interleaved: the machine's load hits every column alike
        for k, f in runs.items():
            times[k].append(_timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = analytic_flops(cfg, args.batch, args.seq)
    peak = 2.0 * PEAK_N ** 3 / med["matmul_peak"]
    tf_frac = flops / med["transformers"] / peak
    return {"model": pattern, "transformers_ms": 1e3 * med["transformers"], "elastic_jax_ms": 1e3 * med["elastic_jax"],
            "matmul_peak_gflop_s": peak / 1e9, "fraction_of_peak": flops / med["elastic_jax"] / peak,
            "transformers_fraction_of_peak": tf_frac,
            "torch_matmul_peak_gflop_s": 2.0 * PEAK_N ** 3 / med["torch_matmul_peak"] / 1e9,
            # elastic_jax at 100% of the peak: the largest tf / ej this row can reach
            "speedup_bound_at_peak": 1.0 / tf_frac,
            "speedup": med["transformers"] / med["elastic_jax"], "gflop": flops / 1e9,
            "elastic_jax_gflop_s": flops / med["elastic_jax"] / 1e9,
            "masked_full_ms": 1e3 * med["masked_full"], "masked_full_over_plain": med["masked_full"] / med["elastic_jax"],
            "masked_50_ms": 1e3 * med["masked_50"], "masked_50_over_plain": med["masked_50"] / med["elastic_jax"],
            "max_abs_logit_diff_vs_transformers": max_diff, "max_abs_diff_masked_full_vs_plain": masked_diff,
            "all_times_s": times}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_vs_transformers.json")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated patterns")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (with `taskset -c 0` and 1: both libraries on one core, "
                         "less sensitive to a loaded machine than two spinning thread pools)")
    args = ap.parse_args(argv)
    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()
    peak_fn = matmul_peak_fn()
    torch_peak_fn = torch_matmul_peak_fn()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in args.models.split(","):
            rows.append(bench_model(pattern, args, tmp, peak_fn, torch_peak_fn))
            print(f"  {pattern}: done ({rows[-1]['elastic_jax_ms']:.0f} ms)", flush=True)
    load_after = os.getloadavg()
    peaks = [r["matmul_peak_gflop_s"] for r in rows]
    tpeaks = [r["torch_matmul_peak_gflop_s"] for r in rows]
    print(f"f32 matmul peak (jitted {PEAK_N}^3, timed interleaved with every row, median per row): "
          f"{min(peaks):.1f}-{max(peaks):.1f} GFLOP/s; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; torch threads "
          f"{torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}; batch {args.batch} x {args.seq}, hidden {args.hidden}, f32, "
          f"median of {args.repeats}")
    print(f"the same matmul in torch: {min(tpeaks):.1f}-{max(tpeaks):.1f} GFLOP/s (the peak is jax's; 'max tf / ej' = "
          f"1 / tf % peak: the ratio elastic_jax would reach at 100% of the peak)")
    hdr = (f"| {'model':10} | {'transformers':>12} | {'elastic_jax':>11} | {'tf / ej':>7} | {'GFLOP':>6} | "
           f"{'% peak':>6} | {'tf % peak':>9} | {'max tf / ej':>11} | {'masked full / plain':>19} | {'masked 50% / plain':>18} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| `{r['model']}`{' ' * (8 - len(r['model']))} | {r['transformers_ms']:9.0f} ms | "
              f"{r['elastic_jax_ms']:8.0f} ms | {r['speedup']:7.2f} | {r['gflop']:6.2f} | "
              f"{100 * r['fraction_of_peak']:5.1f}% | {100 * r['transformers_fraction_of_peak']:8.1f}% | "
              f"{r['speedup_bound_at_peak']:11.2f} | "
              f"{r['masked_full_over_plain']:19.2f} | "
              f"{r['masked_50_over_plain']:18.2f} |")
    out_of_reach = [r["model"] for r in rows if r["speedup_bound_at_peak"] < 1.5]
    if out_of_reach:
        print(f"1.5x transformers is out of reach for {', '.join(out_of_reach)}: transformers already runs these at "
              f"more than 2/3 of the measured peak")
    print("max |logits - transformers|:", {r["model"]: f"{r['max_abs_logit_diff_vs_transformers']:.1e}" for r in rows})
    result = {"args": vars(args), "cpu_affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_before": load_before, "loadavg_after": load_after, "torch_threads": torch.get_num_threads(),
              "backend": jax.default_backend(), "machine": platform.machine(), "jax": jax.__version__,
              "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
