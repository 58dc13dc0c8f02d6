"""The text report of an `elastic-jax plan` result (`plan.plan`'s dict): counts, per-stage memory,
FLOPs, step time and stage cost."""
from __future__ import annotations

GiB = 1024 ** 3


def _g(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def format_report(res: dict) -> str:
    L = [f"# plan: {res['experiment']} on {res['target']}", "",
         f"parent: {res['params_total'] / 1e9:.2f}B total, {res['params_active'] / 1e9:.2f}B active "
         f"({res['params_active_with_embeddings'] / 1e9:.2f}B with embeddings)"]
    im = res["inference_memory"]
    L.append(f"nested budgets (inference memory at {im['context']} tokens x {im['batch']}: bf16 weights + KV + SSM state):")
    for b in res["budgets"]:
        m = b["inference_memory"]
        L.append(f"  {b['budget']:<5} {b['params_total'] / 1e9:6.2f}B total {b['params_active'] / 1e9:5.2f}B active "
                 f"({b['params_active_with_embeddings'] / 1e9:.2f}B w/ emb)  memory {_g(m['total_bytes'])} GiB "
                 f"(weights {_g(m['weights_bytes'])}, KV {_g(m['kv_cache_bytes'])}, SSM {_g(m['ssm_state_bytes'])})  "
                 f"widths {b['widths']}")
    for p in res["stages"]:
        c = p["chip"]
        L += ["", f"## stage {p['stage']}: {p['batch_size']} x {p['seq_len']} tokens, {p['microbatches']} micro-batches "
              f"of {p['micro_batch']}, remat {p['remat']}, mesh {p['mesh']} ({p['devices']} x {c['name']})"]
        if not p["compiled"] and "note" in p:
            L.append(f"  NOTE: {p['note']}")
        t = p["memory"]["terms"]
        L.append("  per chip GiB: " + ", ".join(f"{k} {_g(v)}" for k, v in t.items()) +
                 f"; total {_g(p['per_device_bytes'])} of {_g(p['hbm_bytes'])} HBM -> "
                 + (f"fits, headroom {_g(p['memory']['headroom_bytes'])}" if p["fits"] else
                    "fits: unknown (temporaries not compiled; the arguments alone fit)" if p["fits"] is None else
                    f"DOES NOT FIT: dominant term {p['dominant_term']}; try {p['advice']}"))
        L.append(f"  FLOPs/step {p['flops_per_step']:.3e} (model {p['model_flops_per_step']:.3e}), HBM bytes/step/chip "
                 f"{p['bytes_per_step_per_chip']:.3e}, weight all-gather bytes/step/chip "
                 f"{p['interconnect_bytes_per_step_per_chip']:.3e} ({p['microbatches']} micro-batches)")
        L.append(f"  step time: >= {p['step_seconds_lower_bound']:.2f} s (roofline lower bound at {c['bf16_flops'] / 1e12:.0f} "
                 f"TFLOP/s, {c['hbm_bandwidth'] / 1e9:.0f} GB/s HBM, {c['interconnect_bandwidth'] / 1e9:.0f} GB/s "
                 f"interconnect; {p['bound']}-bound, MFU <= {p['mfu_upper_bound']:.2f}); estimate "
                 f"{p['step_seconds_estimate']:.2f} s at an assumed MFU of {p['assumed_mfu']:.2f}, "
                 f"{p['tokens_per_second']:.3g} tokens/s")
        L.append(f"  stage: {p['stage_steps']} steps, {p['stage_tokens'] / 1e9:.1f}B tokens, {p['stage_hours']:.1f} h, "
                 f"{p['stage_chip_hours']:.0f} chip-hours; "
                 + (f"compile {p['compile_seconds']:.0f} s" if p["compiled"] else "not compiled")
                 + f" (lower {p['lower_seconds']:.0f} s)")
        if p["replicated"]:
            L.append("  replicated: " + ", ".join(f"{r['family']} ({r['bytes_per_chip'] / 2**20:.1f} MiB)"
                                                   for r in p["replicated"][:8]))
        if "search" in p:
            L.append("  search (remat x micro-batches): " + "; ".join(
                f"{r['remat']}/{r['microbatches']}: {'fits' if r['fits'] else 'no'} {_g(r['per_device_bytes'])} GiB "
                f"{r['step_seconds_estimate']:.2f} s" for r in p["search"]))
            L.append("  cheapest that fits: " + (f"remat {p['remat']}, {p['microbatches']} micro-batches"
                                                 if p["search_found"] else "none"))
    L += ["", f"total: {res['total_hours']:.1f} h, {res['total_chip_hours']:.0f} chip-hours (at the assumed MFU); "
          f"fits: {'unknown' if res['fits'] is None else res['fits']}"]
    return "\n".join(L)
