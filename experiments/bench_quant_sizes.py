"""Bytes on disk of one nested checkpoint in BF16, FP8 and NVFP4 (ModelOpt layout), METHOD §10.

    python experiments/bench_quant_sizes.py [--out quant_sizes.json]

Prints a table (bytes, ratio to BF16, and the ratio over the quantized projections alone) and
writes JSON. No timing: sizes only. Weight scales from the parent; activation scales calibrated on
two random-token batches (sizes do not depend on them).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

import elastic_jax as ej
from elastic_jax import quant
from elastic_jax.hf import io as hfio


def projection_bytes(directory: str, fmt: str | None) -> int:
    """Bytes of the quantizable projection tensors (weight and their scales) in the file."""
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    tot = 0
    for k, meta in header.items():
        if k == "__metadata__" or "embeddings" in k or "lm_head" in k or ".gate." in k:
            continue
        if any(p in k for p in ("_proj.", "proj.weight")):
            b, e = meta["data_offsets"]
            tot += e - b
    return tot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="quant_sizes.json")
    args = ap.parse_args(argv)
    cfg = ej.NemotronHConfig(vocab_size=1024, hidden_size=256, hybrid_override_pattern="M-M*ME", intermediate_size=512,
                             moe_intermediate_size=128, mamba_head_dim=32, mamba_num_heads=8, n_groups=2,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=32, n_routed_experts=8,
                             num_experts_per_tok=2, moe_shared_expert_intermediate_size=128)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    batches = [jax.random.randint(jax.random.PRNGKey(b), (2, 32), 0, cfg.vocab_size) for b in range(2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in (None, "fp8", "nvfp4"):
            qs = None
            if fmt:
                qs = quant.calibrate(params, cfg, quant.init_quant_state(params, cfg, fmt), batches)
            d = ej.save_hf(os.path.join(tmp, str(fmt)), cfg, params, dtype="bfloat16", quant_state=qs)
            rows.append({"format": fmt or "bf16", "bytes": hfio.checkpoint_bytes(d),
                         "projection_bytes": projection_bytes(d, fmt)})
    base = rows[0]
    print(f"{'format':8s} {'bytes':>12s} {'/ bf16':>8s} {'projections':>12s} {'/ bf16':>8s}")
    for r in rows:
        r["ratio"] = r["bytes"] / base["bytes"]
        r["projection_ratio"] = r["projection_bytes"] / base["projection_bytes"]
        print(f"{r['format']:8s} {r['bytes']:12,d} {r['ratio']:8.3f} {r['projection_bytes']:12,d} "
              f"{r['projection_ratio']:8.3f}")
    with open(args.out, "w") as f:
        json.dump({"config": cfg.to_dict(), "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
