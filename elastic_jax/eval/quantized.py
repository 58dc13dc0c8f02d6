"""The main job's quantization stage (METHOD §10): one elastic checkpoint per precision, every nested
model still sliced zero-shot from it.

From the trained elastic model (the high-precision teacher) and its router-chosen budgets:
  * FP8 PTQ and NVFP4 PTQ: fixed scales from the full parent tensors (`quant.init_quant_state`),
    activation scales calibrated over a few task batches at every budget (`quant.calibrate`);
  * NVFP4 QAD: a short `TrainConfig(qad="nvfp4")` run from the elastic model, frozen router, the
    teacher at the same sampled widths, the PTQ state's scales (so PTQ and QAD differ only in the
    trained weights);
  * per budget and precision: task accuracy with full thinking (per-problem scores kept for
    bootstrap intervals, paired QAD - PTQ difference) and the KL(teacher || quantized nested
    model) on held-out task tokens of the eval split;
  * one nested checkpoint per precision (BF16, FP8, NVFP4 PTQ, NVFP4 QAD) written in the ModelOpt
    layout, its bytes on disk, and export -> `load_hf` logits against the simulated model.
A rerun resumes the QAD run from its checkpoint (skipped when finished) and rewrites the exports.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import quant
from .stats import bootstrap_ci, bootstrap_diff_ci

PRECISIONS = ("fp8_ptq", "nvfp4_ptq", "nvfp4_qad")
LABELS = {"high": "f32 (trained)", "bf16": "BF16", "f32": "f32", "fp8_ptq": "FP8 PTQ", "nvfp4_ptq": "NVFP4 PTQ", "nvfp4_qad": "NVFP4 QAD"}


@dataclass(frozen=True)
class QuantEvalConfig:
    """The quantization stage of the main job. `enabled=False` (CLI: `--set quant.enabled=false`)
    skips it. `qad_steps` of QAD at `qad_lr` (constant, router frozen), batches shaped like the
    elastic run's first stage; `activations`: simulate the activation quantization too (FP8 per
    tensor, NVFP4 16-blocks), else weights only; `kl_batches` held-out batches for the KL."""

    enabled: bool = True
    qad_steps: int = 40
    qad_lr: float = 1e-4
    activations: bool = True
    kl_batches: int = 4
    export_dtype: str = "bfloat16"           # the high-precision tensors of every export

    def __post_init__(self):
        if self.qad_steps <= 0:
            raise ValueError(f"QuantEvalConfig.qad_steps={self.qad_steps}: must be > 0")
        if self.kl_batches <= 0:
            raise ValueError(f"QuantEvalConfig.kl_batches={self.kl_batches}: must be > 0")
        if self.export_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"QuantEvalConfig.export_dtype={self.export_dtype!r}: 'bfloat16' or 'float32'")


def qad_train_config(base, qcfg: QuantEvalConfig):
    """The QAD run: `base` (the elastic TrainConfig) with one stage of `qad_steps` shaped like its
    first stage, uniform budgets, constant `qad_lr`, router frozen, qad='nvfp4'."""
    from ..train import OptimConfig, Stage
    st = base.stages[0]
    return dataclasses.replace(
        base, qad="nvfp4", stages=(Stage("qad", seq_len=st.seq_len, batch_size=st.batch_size, steps=qcfg.qad_steps),),
        optim=OptimConfig(lr=qcfg.qad_lr, warmup_steps=0, schedule="constant", freeze_router=True),
        checkpoint_every=qcfg.qad_steps)


def _quantized(params, qs):
    """The params the simulated quantized model runs (`QWeight` projections; None: high precision)."""
    return params if qs is None else quant.qweight_params(params, qs)


def _kl_fn(cfg):
    from ..model import forward

    @jax.jit
    def kl(teacher, student, qs, tokens, seg, widths):
        lt = jax.nn.log_softmax(forward(teacher, tokens, cfg, widths, segment_ids=seg).astype(jnp.float32))
        ls = jax.nn.log_softmax(
            forward(_quantized(student, qs), tokens, cfg, widths, segment_ids=seg).astype(jnp.float32))
        per = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
        valid = (seg > 0).astype(jnp.float32)
        return jnp.sum(per * valid), jnp.sum(valid)
    return kl


def run_quant_stage(qcfg: QuantEvalConfig, *, cfg, ecfg, el_train, teacher, router_params, widths: dict,
                    data_cfg, data, calib_tokens, eval_fn, eval_size: int, out_dir: str, say=print,
                    progress: bool = True) -> dict:
    """Run the stage; `widths` {budget name: Widths} of the trained budgets; `calib_tokens` int
    [B, L] arrays; `eval_fn(model: ElasticModel) -> {name: row with accuracy and scores}` on an
    eval set of `eval_size` problems. Returns the JSON-able results (`results["quantization"]`),
    also written to `<out_dir>/quantization.json`; a rerun with the same configuration, widths and
    eval size returns that file's results instead of running again."""
    from ..data import make_dataset
    from ..elastic import slice_quant_state
    from ..hf import load_hf, save_hf
    from ..infer.budget import ElasticModel
    from ..model import forward
    from ..hf import checkpoint_bytes
    from ..train import train_elastic

    cache_path = os.path.join(out_dir, "quantization.json")
    key = json.loads(json.dumps({"config": dataclasses.asdict(qcfg), "eval_problems": eval_size,
                                 "widths": {n: dataclasses.asdict(w) for n, w in widths.items()}}, default=str))
    if os.path.isfile(cache_path):           # a finished stage of this same configuration: skip it
        with open(cache_path) as f:
            cached = json.load(f)
        if cached.get("key") == key and os.path.isdir(cached.get("qad_run", "")):
            say("quantization: results of a finished stage reused (quantization.json)")
            return cached
    t_all = time.perf_counter()
    timing = {}
    names = list(widths)
    resolved = {n: w.resolve(cfg) for n, w in widths.items()}

    # ---------------------------------------------------------------- PTQ states (scales from the parent)
    t0 = time.perf_counter()
    states = {}
    for fmt in ("fp8", "nvfp4"):
        spec = quant.QuantSpec(fmt, activations=qcfg.activations)
        qs = quant.init_quant_state(teacher, cfg, spec)
        for n, w in widths.items():            # named error now if a budget is not whole NVFP4 blocks
            slice_quant_state(qs, teacher, cfg, w)
        states[fmt] = quant.calibrate(teacher, cfg, qs, calib_tokens, widths=tuple(resolved.values()))
    timing["calibrate"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- NVFP4 QAD
    t0 = time.perf_counter()
    tc = qad_train_config(el_train, qcfg)
    say(f"quantization: NVFP4 QAD for {qcfg.qad_steps} steps from the elastic model (router frozen)")
    qad = train_elastic(cfg, ecfg, tc, teacher, teacher, data, os.path.join(out_dir, "qad_nvfp4"),
                        router_params=router_params, quant_state=states["nvfp4"], progress=progress)
    timing["qad"] = time.perf_counter() - t0
    variants = {"fp8_ptq": (teacher, states["fp8"]), "nvfp4_ptq": (teacher, states["nvfp4"]),
                "nvfp4_qad": (qad.params, states["nvfp4"])}

    # ---------------------------------------------------------------- KL to the teacher per budget
    t0 = time.perf_counter()
    held = make_dataset(dataclasses.replace(data_cfg, task_split="test", seed=data_cfg.seed + 7,
                                            num_documents=max(64, 64 * qcfg.kl_batches)), cfg.vocab_size)
    st = el_train.stages[0]
    stream = held.batches(st.seq_len, st.batch_size, epoch_seed=30_000)
    kl_data = [next(stream) for _ in range(qcfg.kl_batches)]
    kl_fn = _kl_fn(cfg)
    kl = {}
    for v, (params, qs) in variants.items():
        kl[v] = {}
        for n in names:
            tot = cnt = 0.0
            for b in kl_data:
                s, c = kl_fn(teacher, params, qs, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]), resolved[n])
                tot, cnt = tot + float(s), cnt + float(c)
            kl[v][n] = tot / max(cnt, 1.0)
    timing["kl"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- accuracy per budget
    t0 = time.perf_counter()
    rows = {}
    for v, (params, qs) in variants.items():
        say(f"quantization: evaluating {LABELS[v]} at every budget")
        rows[v] = eval_fn(ElasticModel(cfg, params, widths, mode="masked", quant=qs))
    timing["eval"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- one nested checkpoint per precision
    t0 = time.perf_counter()
    dt = jnp.bfloat16 if qcfg.export_dtype == "bfloat16" else jnp.float32
    ck = os.path.join(out_dir, "checkpoints")
    exports = {"bf16" if dt == jnp.bfloat16 else "f32": (teacher, None)}
    exports.update({v: variants[v] for v in PRECISIONS})
    sizes, paths = {}, {}
    for v, (params, qs) in exports.items():
        path = os.path.join(ck, f"nested_{v}")
        save_hf(path, cfg, params, dtype=dt, quant_state=qs, budgets=widths, overwrite=True)
        sizes[v], paths[v] = checkpoint_bytes(path), path
    # export -> load_hf -> the simulated-quantization forward, on one held-out batch, every budget
    b = kl_data[0]
    tok, seg = jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"])
    roundtrip = {}
    fwd = jax.jit(forward, static_argnums=2)
    for v in PRECISIONS:
        params, qs = variants[v]
        cfg2, params2, qs2 = load_hf(paths[v], with_quant=True, dtype=jnp.float32)
        ref_params = _stored_precision(params, qs, dt)
        diffs = []
        for n in names:
            a = fwd(_quantized(params2, qs2), tok, cfg2, resolved[n], segment_ids=seg)
            r = fwd(_quantized(ref_params, qs), tok, cfg, resolved[n], segment_ids=seg)
            diffs.append(float(jnp.max(jnp.abs(a - r))))
        roundtrip[v] = max(diffs)
    timing["export"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_all

    out = {"precisions": list(PRECISIONS), "labels": LABELS, "budgets": names,
           "activations": qcfg.activations, "qad_steps": qad.steps, "qad_tokens": int(qad.tokens_seen),
           "qad_run": os.path.join(out_dir, "qad_nvfp4"),
           "accuracy": {v: {n: {"accuracy": r["accuracy"], "scores": r["scores"]} for n, r in rows[v].items()}
                        for v in rows},
           "kl": kl, "kl_tokens": int(sum(int(np.sum(np.asarray(b["segment_ids"]) > 0)) for b in kl_data)),
           "checkpoint_bytes": sizes, "export_dtype": qcfg.export_dtype,
           "export_roundtrip_max_abs_logit_diff": roundtrip, "timing": timing, "key": key}
    tmp = cache_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, cache_path)              # atomic: a half-written file is never taken as finished
    return out


def _stored_precision(params, qs, dt):
    """`params` as the export stores them: the tensors kept in high precision rounded to `dt`, except
    the MoE router weight and correction bias (float32 on disk, hf/keys.py) and the quantized
    projections (exported from the unrounded weights with their fixed scales)."""
    def rnd(x):
        return x.astype(dt).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    out = jax.tree.map(rnd, params)
    for i, entry in enumerate(qs.layers):
        mixer = params["layers"][i]["mixer"]
        for k in list(entry) + [k for k in ("gate", "e_score_correction_bias") if k in mixer]:
            out["layers"][i]["mixer"][k] = mixer[k]
    return out


def quant_markdown(results: dict) -> list[str]:
    """The report's quantization section (empty when the stage did not run)."""
    q = results.get("quantization")
    if not q:
        return []
    high = {r["name"]: r for r in results.get("nested", [])}
    names = q["budgets"]
    L = ["## Quantized nested checkpoints: FP8 / NVFP4 PTQ and NVFP4 QAD (METHOD §10)", "",
         f"One checkpoint per precision; every nested model is sliced from it zero-shot with the parent's "
         f"scales. Activations {'simulated too (FP8 per tensor, NVFP4 16-element blocks)' if q['activations'] else 'not simulated (weights only)'}; "
         f"QAD: {q['qad_steps']} steps ({q['qad_tokens']:,} tokens) from the trained elastic model, router "
         f"frozen. Accuracy with full thinking, 95% bootstrap intervals; QAD - PTQ paired.", "",
         "| budget | " + " | ".join([LABELS["high"]] + [LABELS[v] for v in q["precisions"]]) + " | NVFP4 QAD - PTQ |",
         "|---|" + "---|" * (len(q["precisions"]) + 2)]
    for n in names:
        cells = []
        if n in high:
            lo, hi = bootstrap_ci(high[n]["scores"], n_boot=1000)
            cells.append(f"{high[n]['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]")
        else:
            cells.append("n/a")
        for v in q["precisions"]:
            r = q["accuracy"][v][n]
            lo, hi = bootstrap_ci(r["scores"], n_boot=1000)
            cells.append(f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]")
        a, b = q["accuracy"]["nvfp4_qad"][n]["scores"], q["accuracy"]["nvfp4_ptq"][n]["scores"]
        lo, hi = bootstrap_diff_ci(a, b, n_boot=1000)
        cells.append(f"{np.mean(a) - np.mean(b):+.3f} [{lo:+.3f}, {hi:+.3f}]")
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    L += ["", f"KL(teacher || quantized nested model) per token on {q['kl_tokens']:,} held-out tokens of the eval "
              f"split (teacher: the trained elastic model at the same budget, high precision):", "",
          "| budget | " + " | ".join(LABELS[v] for v in q["precisions"]) + " | QAD / PTQ (NVFP4) |",
          "|---|" + "---|" * (len(q["precisions"]) + 1)]
    for n in names:
        k = {v: q["kl"][v][n] for v in q["precisions"]}
        ratio = k["nvfp4_qad"] / k["nvfp4_ptq"] if k["nvfp4_ptq"] > 0 else float("nan")
        L.append(f"| {n} | " + " | ".join(f"{k[v]:.2e}" for v in q["precisions"]) + f" | {ratio:.2f} |")
    sizes = q["checkpoint_bytes"]
    ref = sizes.get("bf16") or sizes.get("f32")
    L += ["", f"Nested checkpoint on disk per precision (high-precision tensors — embeddings, lm_head, norms, "
              f"conv, SSM parameters — in {q['export_dtype']}, the MoE router in float32; ModelOpt layout):", "",
          "| checkpoint | bytes | vs " + ("BF16" if sizes.get("bf16") else "f32") + " | export -> load_hf max |logit diff| |",
          "|---|---|---|---|"]
    for v, nbytes in sizes.items():
        rt = q["export_roundtrip_max_abs_logit_diff"].get(v)
        L.append(f"| {LABELS.get(v, v.upper())} | {nbytes:,} | {nbytes / ref:.3f} | "
                 f"{'—' if rt is None else f'{rt:.1e}'} |")
    L.append("")
    return L
