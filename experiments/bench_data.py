"""Read + pack throughput of the streamed token shards on this machine, per host, beside what the
30B-A3B run's step needs per host (tokens per step / planned step time / hosts).

    python experiments/bench_data.py [--tokens 40e6] [--seconds 20] [--threads 8] [--workers 0] [--json OUT]

Writes a synthetic 70/30 corpus (reasoning documents of ~4K tokens with a long tail past 8K,
pretraining documents of ~1.5K) as two shard folders (`write_documents`, the `elastic-jax tokenize`
layout), then for each stage of experiments/nemotron3_nano_30b_a3b.py streams one host's rows (the
stage's global batch / 32 hosts, the mixture, min_doc_len, first-fit packing) and times it. The need
uses the planned step time from `elastic-jax plan` (BUILD_NOTES, issue 26: the v5p-256 (`v5p:4x4x8`) roofline
step 7.47 s at 8K, 19.26 s at 49K): a lower bound on the real step time, so an upper bound on the need.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

# elastic-jax plan experiments/nemotron3_nano_30b_a3b.py --topology v5p:4x4x8 --stage {short,long}
# (BUILD_NOTES.md, issue 26, re-planned with f32 master weights): roofline step seconds (lower bounds);
# v5p-256 = 128 chips, 4 per host
PLANNED = {"short": 7.47, "long": 19.26}
HOSTS = 128 // 4


def write_corpus(root: str, tokens: float, seed: int = 0):
    from elastic_jax.data.tokenize import write_documents
    rng = np.random.default_rng(seed)
    ident = {"sha256": "bench", "chat_template_sha256": None, "vocab_size": 131072, "eos_id": 2, "bos_id": 1}

    def docs(total, mean, long_frac):
        n = 0
        while n < total:
            k = int(np.clip(rng.lognormal(np.log(mean), 0.6), 16, 60_000))
            if rng.random() < long_frac:
                k = int(rng.integers(8193, 60_000))
            n += k
            yield rng.integers(3, 131_072, size=k, dtype=np.int64)

    paths = {}
    for name, share, mean, long_frac in (("reasoning", 0.7, 4000, 0.08), ("pretraining", 0.3, 1500, 0.02)):
        paths[name] = os.path.join(root, name)
        write_documents(paths[name], docs(tokens * share, mean, long_frac), ident)
    return paths


def measure(paths, stage, seconds: float, threads: int, workers: int) -> dict:
    from elastic_jax.data import DataConfig
    from elastic_jax.pod import DataMix, _load_mix
    mix = DataMix(reasoning=DataConfig(kind="shards", path=paths["reasoning"], read_threads=threads,
                                       prefetch_workers=workers),
                  pretraining=DataConfig(kind="shards", path=paths["pretraining"]), reasoning_ratio=0.7)
    ds = _load_mix(mix, 131072)
    t0 = time.perf_counter()
    stream = ds.batches(stage.seq_len, stage.batch_size, min_doc_len=stage.min_doc_len, process_index=0,
                        process_count=HOSTS)
    next(stream)                                               # open + first batch: not timed
    t_first = time.perf_counter() - t0
    rows = tok = batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(stream)
        batches += 1
        rows += b["tokens"].shape[0]
        tok += int((b["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    per_step = stage.seq_len * stage.batch_size
    need = per_step / PLANNED[stage.name] / HOSTS
    return {"stage": stage.name, "seq_len": stage.seq_len, "rows_per_host": stage.batch_size // HOSTS,
            "min_doc_len": stage.min_doc_len, "batches": batches, "seconds": dt, "first_batch_s": t_first,
            "tokens_per_s": tok / dt, "row_tokens_per_s": rows * stage.seq_len / dt, "fill": tok / (rows * stage.seq_len),
            "need_tokens_per_s": need, "ratio": tok / dt / need, "planned_step_s": PLANNED[stage.name],
            "tokens_per_step": per_step, "hosts": HOSTS}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=40e6, help="corpus size (tokens, both sources)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per stage")
    ap.add_argument("--threads", type=int, default=8, help="grain read threads")
    ap.add_argument("--workers", type=int, default=0, help="grain prefetch processes (mp_prefetch)")
    ap.add_argument("--dir", default=None, help="where the corpus goes (default: a temporary folder)")
    ap.add_argument("--json", default="runs/bench_data.json")
    args = ap.parse_args()
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "xp", os.path.join(os.path.dirname(os.path.abspath(__file__)), "nemotron3_nano_30b_a3b.py"))
    xp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xp)
    stages = xp.config().train.stages
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        t0 = time.perf_counter()
        paths = write_corpus(root, args.tokens)
        write_s = time.perf_counter() - t0
        rows = [measure(paths, st, args.seconds, args.threads, args.workers) for st in stages]
    print(f"corpus: {args.tokens:.3g} tokens written in {write_s:.1f} s; read threads {args.threads}, "
          f"prefetch workers {args.workers}; one host of {HOSTS}")
    print(f"| stage | rows/host x seq | tokens/s/host (read + pack) | fill | need/host (tokens/step / step s / hosts) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['rows_per_host']} x {r['seq_len']} | {r['tokens_per_s']:,.0f} | {r['fill']:.3f} | "
              f"{r['need_tokens_per_s']:,.0f} ({r['tokens_per_step']:,} / {r['planned_step_s']} / {r['hosts']}) | "
              f"{r['ratio']:.1f}x |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"tokens": args.tokens, "write_s": write_s, "threads": args.threads, "workers": args.workers,
                   "stages": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
