"""Per-chip memory, FLOPs and compile time of the elastic KD step (frozen teacher + student +
router + AdamW) of the real Nemotron 3 Nano 30B-A3B architecture, compiled ahead of time for a TPU
slice on this CPU host (needs the `tpu-aot` extra; nothing runs, nothing is allocated).

Full width (hidden 2688, 128 experts top-6, 32 query / 2 KV heads, 64 Mamba heads, vocabulary
131072), the depth cut to a few layers (rows: patterns), bf16 parameters (the bf16 compute policy),
FSDP over the embedding axis, one sequence per chip.

    python experiments/bench_pod_memory.py                       # v5p:2x2x2, rows M / * / MEM*E, 8K and 49K
    python experiments/bench_pod_memory.py --rows '*' --contexts 8192 --attention xla   # the old attention
Prints a table and writes JSON (default runs/bench/pod_memory.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp

import elastic_jax as ej
from elastic_jax import aot
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.train.aot_step import abstract_elastic_step
from elastic_jax.train.config import MeshConfig
from elastic_jax.train.sharding import make_mesh

# the 30B-A3B parent's HF config.json fields, from its experiment file (this folder)
from nemotron3_nano_30b_a3b import HF_CONFIG as NANO3  # noqa: E402


def row(pattern: str, length: int, topology: str, attention: str, kernel_impl: str | None,
        remat: str = "none", scan: bool = False) -> dict:
    cfg = ej.NemotronHConfig.from_hf(dict(NANO3, num_hidden_layers=len(pattern), hybrid_override_pattern=pattern))
    devices = aot.tpu_devices(topology)
    mesh = make_mesh(MeshConfig(fsdp=len(devices)), devices=devices)
    policy = ej.ComputePolicy(attention_impl=attention, kernel_impl=kernel_impl, remat=remat, scan_layers=scan)
    fn, args = abstract_elastic_step(cfg, ElasticConfig(), mesh, batch=len(devices), length=length,
                                     param_dtype=jnp.bfloat16, policy=policy)
    rep = aot.compile_report(fn, *args, mesh=mesh, available_bytes=aot.hbm_bytes(topology))
    out = {"pattern": pattern, "length": length, "topology": topology, "attention": attention,
           "kernel_impl": kernel_impl or "default", "remat": remat, "scan_layers": scan, **rep.to_dict()}
    out["params"] = ej.param_count(cfg)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--rows", default="M,*,MEM*E", help="comma-separated layer patterns")
    ap.add_argument("--contexts", default="8192,49152")
    ap.add_argument("--attention", default="auto", help="ComputePolicy.attention_impl")
    ap.add_argument("--kernel-impl", default=None, help="ComputePolicy.kernel_impl (xla | pallas)")
    ap.add_argument("--remat", default="none", help="ComputePolicy.remat (none | full | ...)")
    ap.add_argument("--scan", action="store_true", help="ComputePolicy.scan_layers")
    ap.add_argument("--json", default="runs/bench/pod_memory.json")
    a = ap.parse_args(argv)
    reason = aot.tpu_unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"elastic KD step, Nemotron 3 Nano 30B-A3B at full width, bf16 params, FSDP, {a.topology}, "
          f"one sequence per chip, remat {a.remat}, scan {a.scan} (machine shared with other jobs: compile times are inflated)")
    hdr = f"{'layers':8} {'context':>8} {'fits':>5} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'total GiB':>10} " \
          f"{'TFLOPs':>8} {'compile s':>10}"
    print(hdr, flush=True)
    t0 = time.time()
    for length in [int(x) for x in a.contexts.split(",")]:
        for pattern in a.rows.split(","):
            r = row(pattern, length, a.topology, a.attention, a.kernel_impl, a.remat, a.scan)
            results.append(r)
            g = lambda k: "-" if r[k] is None else f"{r[k] / aot.GiB:.2f}"
            total = g("total_bytes") if r["fits"] else f">{g('required_bytes')}"
            fl = "-" if r["flops"] is None else f"{r['flops'] / 1e12:.1f}"
            print(f"{pattern:8} {length:>8} {str(r['fits']):>5} {g('argument_bytes'):>9} {g('temp_bytes'):>9} "
                  f"{g('output_bytes'):>8} {total:>10} {fl:>8} {r['compile_seconds']:>10.1f}", flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"topology": a.topology, "attention": a.attention, "rows": results}, indent=1))
            os.replace(tmp, path)
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
