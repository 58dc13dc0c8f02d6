"""`elastic-jax plan EXPERIMENT.py`: does a pod run's step compile for the target, does it fit in
HBM, how long will a step take, what does the curriculum cost? Answered on a CPU host.

    elastic-jax plan experiments/nemotron3_nano_30b_a3b.py --topology v5p:4x4x8 --json
    elastic-jax plan experiments/nemotron_nano_v2_12b.py --platform gpu --devices 8 --stage long
    elastic-jax plan EXPERIMENT.py --target v5p-256 --stage short --search

The train state is built abstractly (`jax.eval_shape`), the elastic KD step (frozen teacher +
masked student + router + AdamW, the training loop's own step and shardings,
`train.aot_step.abstract_elastic_step`) is lowered for the target's mesh and
- TPU: compiled ahead of time by libtpu (`aot.compile_report`, a real compile): per-chip bytes from
  the compiled program, an out-of-HBM compile reported as `fits: false`;
- CPU (`--platform cpu --devices N`): compiled by XLA:CPU on N host devices (the same sharded
  program; its memory analysis stands in for an accelerator's);
- GPU (`--platform gpu --devices N`): lowered and sharded only (no GPU compiler here): argument
  bytes are exact, temporaries unknown, `fits` judges the arguments alone (the report says so).

FLOPs, HBM bytes and interconnect bytes per step are analytic (XLA's cost analysis counts a scanned
loop body once, so the compiler's figure, reported as `compiler_flops`, undercounts scanned layers
and micro-batches). The roofline step time max(FLOPs / peak, HBM bytes / bandwidth, gathered
weight bytes / interconnect bandwidth) is a LOWER BOUND (`step_seconds_lower_bound`: perfect
overlap, peak rates); the step time the stage hours use is an estimate at a stated MFU
(`assumed_mfu`, `--mfu`, default 0.4), never below the bound (`step_seconds_estimate`). The fsdp
axis all-gathers the weights (in the compute dtype) for every micro-batch's teacher forward,
student forward, backward and remat recompute, and reduce-scatters the gradients, so more
micro-batches cost more interconnect time.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .plan_report import GiB, format_report


@dataclass(frozen=True)
class Chip:
    """Peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), HBM capacity (bytes) and the published
    per-chip interconnect bandwidth (bytes/s: TPU ICI, GPU NVLink) of one chip."""

    name: str
    bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    source: str
    interconnect_bandwidth: float = 0.0


# The chip figures every roofline here uses (dense bf16, no sparsity), with their sources.
CHIPS = {
    # interconnect: TPU ICI Gbps per chip / 8; NVLink 900 GB/s per GPU
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GiB, "Google Cloud TPU v5p documentation (system architecture)",
                4800e9 / 8),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GiB, "Google Cloud TPU v5e documentation (system architecture)",
                1600e9 / 8),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 1640e9, 32 * GiB, "Google Cloud TPU v6e documentation", 3584e9 / 8),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3.35e12, 80 * 10 ** 9, "NVIDIA H100 Tensor Core GPU datasheet", 900e9),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 4.8e12, 141 * 10 ** 9, "NVIDIA H200 Tensor Core GPU datasheet", 900e9),
}

REMAT_SEARCH = ("none", "minimal", "save_dots", "full")
_TERM_ADVICE = {
    "temporaries": "activations: a remat policy (--remat full), a smaller micro-batch (--microbatches x2), or more chips",
    "params": "student weights: more chips on the fsdp axis (a larger slice or mesh)",
    "teacher": "teacher weights: more chips on the fsdp axis (a larger slice or mesh)",
    "optimizer_state": "optimizer state: more chips on the fsdp axis (a larger slice or mesh)",
    "router": "router: it is replicated; a smaller router_dim",
    "outputs": "outputs: the new train state; more chips on the fsdp axis",
}


def _advice(term: str, plan: dict) -> str:
    """What to change when `term` dominates a plan that does not fit; for activations only the
    levers not already pulled (a full remat cannot remat more, one sequence per chip cannot be
    split into more micro-batches without splitting the sequence itself)."""
    if term != "temporaries":
        return _TERM_ADVICE.get(term, "more chips")
    mesh = plan["mesh"]
    per_chip = plan["micro_batch"] / max(1, mesh["data"] * mesh["fsdp"])
    levers = []
    if plan["remat"] != "full":
        levers.append("a remat policy (--remat full)")
    if per_chip >= 2:
        levers.append(f"a smaller micro-batch (--microbatches x2; now {per_chip:g} sequences per chip)")
    levers.append("split each sequence's activations over chips: a tensor axis in the mesh "
                  "(--mesh fsdp=N/2,tensor=2 with half the micro-batch), or a shorter context")
    return "activations: " + "; ".join(levers)


# --------------------------------------------------------------------------- counts (cost model)
def _expected(widths) -> dict:
    return {k: getattr(widths, k) for k in (f.name for f in dataclasses.fields(widths))
            if getattr(widths, k) is not None}


def model_counts(cfg, widths=None, *, context: int = 131072, batch: int = 1, bytes_per_param: float = 2.0) -> dict:
    """Parameter counts and inference memory of the model at `widths` (None: the parent), from the
    one cost model (`model.cost`; equal to the sliced model's sizes). `active`: what one token
    touches without the input embedding table (a lookup, no FLOPs); `active_with_embeddings` adds
    it. Memory: weights at `bytes_per_param` (all experts resident) + bf16 KV cache + f32 SSM state
    + conv window (weight dtype) at `context` tokens x `batch` sequences."""
    from .model.cost import CostModel, ElementBytes
    cm = CostModel(cfg, widths)
    total, active_emb = cm.param_count(), cm.param_count(active=True)
    mem = cm.memory_bytes(batch=batch, context=context,
                          nbytes=ElementBytes(weights=bytes_per_param, kv=2.0, ssm=4.0, conv=bytes_per_param))
    return {"params_total": total, "params_active": active_emb - cfg.vocab_size * cm.hidden,
            "params_active_with_embeddings": active_emb,
            "inference_memory": {"context": context, "batch": batch, "weights_bytes": int(mem["weights"]),
                                 "kv_cache_bytes": int(mem.get("kv", 0)),
                                 "ssm_state_bytes": int(mem.get("ssm", 0) + mem.get("conv", 0)),
                                 "total_bytes": int(mem["total"])}}


def nominal_widths(cfg, ecfg) -> list:
    """One homogeneous width choice per budget from the option lists: the combination whose costs
    come closest (squared relative error, summed over the budget-loss terms of `ecfg`) to the
    budget's targets; the full budget is the parent. It stands for what the trained router picks
    (METHOD §8), for sizing only. Returns [(budget, Widths, error)]."""
    import jax
    import jax.numpy as jnp

    from .elastic.cost import cost
    from .widths import Widths

    opts = ecfg.options(cfg)
    axes = [a for a, v in opts.items() if np.ndim(v) == 1]
    grid = list(itertools.product(*[range(len(opts[a])) for a in axes]))
    vals = {a: jnp.asarray([opts[a][g[i]] for g in grid], jnp.float32) for i, a in enumerate(axes)}
    targets = ecfg.targets()
    kinds = sorted({t.cost_kind for t in targets})
    costs = {k: np.asarray(jax.vmap(lambda e, k=k: cost(cfg, ecfg, e, k))(vals)) for k in kinds}
    full = {k: float(cost(cfg, ecfg, {}, k)) for k in kinds}
    out = []
    for bi, b in enumerate(ecfg.budgets):
        if b == 1.0:
            out.append((b, Widths(), 0.0))
            continue
        err = np.zeros(len(grid))
        for t in targets:
            ratio = b if t.ratios is None else t.ratios[bi]
            err += t.weight * (costs[t.cost_kind] / (ratio * full[t.cost_kind]) - 1.0) ** 2
        i = int(np.argmin(err))
        out.append((b, Widths(**{a: int(opts[a][grid[i][j]]) for j, a in enumerate(axes)}), float(err[i])))
    return out


# --------------------------------------------------------------------------- analytic step cost
def step_flops(cfg, tokens: int, seq_len: int, remat: str) -> dict:
    """FLOPs of one elastic KD step over `tokens` tokens of `seq_len`-long rows, from the cost
    model (`model.cost`, `Mode.train`). The student is trained masked, at the parent's full width
    (masks zero components, they do not skip them): teacher forward (1x) + student forward and
    backward (3x), + 1x forward when `remat="full"` recomputes it ("minimal" / "save_dots":
    the token-mixing work, attention and SSD, again)."""
    from .model.cost import CostModel, Mode
    mode = Mode.train(seq_len, batch=max(1, tokens // seq_len))
    terms = CostModel(cfg).flops_terms(mode)
    fwd = tokens * float(sum(terms.values()))
    mixing = tokens * float(terms.get("mixing", 0.0))
    recompute = fwd if remat == "full" else (mixing if remat in ("minimal", "save_dots") else 0.0)
    return {"model_flops": 4 * fwd, "hardware_flops": 4 * fwd + recompute}


def step_bytes(cfg, *, tokens_per_chip: int, microbatches: int, chips: int, remat: str,
               param_bytes: float = 2.0, compute_bytes: float = 2.0) -> float:
    """Analytic HBM bytes per chip per step: every micro-batch reads the gathered weights (in the
    compute dtype) for the teacher forward, the student forward and backward (2 reads) and a
    recomputed forward under remat; the AdamW update reads and writes the chip's shard (master
    params, f32 gradient, mu, nu: `param_bytes` each); the activations (`CostModel.activation_bytes`)."""
    from .model.cost import CostModel
    cm = CostModel(cfg)
    total = cm.param_count()
    passes = 4 + (1 if remat != "none" else 0)
    weights = microbatches * passes * total * compute_bytes
    optim = total / chips * (2 * param_bytes + 4 + 4 * param_bytes)
    acts = cm.activation_bytes(tokens_per_chip)
    return weights + optim + acts


def step_gather_bytes(cfg, *, microbatches: int, fsdp: int, remat: str, compute_bytes: float = 2.0,
                      grad_bytes: float = 4.0) -> float:
    """Analytic interconnect bytes received per chip per step on the fsdp axis: per micro-batch,
    the weights all-gathered (the (fsdp-1)/fsdp of them a chip does not hold, in the compute
    dtype) for the teacher forward, the student forward, the backward and a remat recompute, and
    the gradients reduce-scattered (`grad_bytes`)."""
    if fsdp <= 1:
        return 0.0
    from .model.cost import CostModel
    total = CostModel(cfg).param_count()
    passes = 3 + (1 if remat != "none" else 0)
    frac = (fsdp - 1) / fsdp
    return microbatches * total * frac * (passes * compute_bytes + grad_bytes)


# --------------------------------------------------------------------------- targets and meshes
def chip_for(target) -> Chip:
    """The target's row of CHIPS (its `hbm_gib` replacing the capacity when set)."""
    chip = _chip(target)
    if target.hbm_gib is not None:
        chip = dataclasses.replace(chip, hbm_bytes=int(target.hbm_gib * GiB), source=chip.source + " (HBM: the target's hbm_gib)")
    return chip


def _chip(target) -> Chip:
    if target.chip is not None:
        if target.chip not in CHIPS:
            raise ValueError(f"unknown chip {target.chip!r}; known: {sorted(CHIPS)}")
        return CHIPS[target.chip]
    if target.platform == "tpu":
        gen = target.topology.split(":")[0]
        if gen not in CHIPS:
            raise ValueError(f"no chip figures for TPU generation {gen!r} (known: {sorted(CHIPS)}); pass --chip")
        return CHIPS[gen]
    return CHIPS["h100"]


def target_devices(target) -> list:
    import jax
    if target.platform == "tpu":
        from . import aot
        reason = aot.tpu_unavailable_reason()
        if reason:
            raise ValueError(f"cannot compile for TPU here: {reason}")
        return aot.tpu_devices(target.topology)
    devs = jax.devices("cpu")
    if len(devs) < target.devices:
        raise ValueError(f"--devices {target.devices} needs {target.devices} host devices but this process has "
                         f"{len(devs)}; set XLA_FLAGS=--xla_force_host_platform_device_count={target.devices} "
                         f"before jax starts (`elastic-jax plan` does this itself when it can)")
    return devs[:target.devices]


def _shard_bytes(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _tree_bytes(tree) -> int:
    import jax
    return int(sum(_shard_bytes(x) for x in jax.tree.leaves(tree)))


def _family(path, cfg) -> str:
    keys = []
    for k in path:
        k = getattr(k, "key", getattr(k, "idx", k))
        keys.append(k)
    if len(keys) >= 2 and keys[0] == "layers" and isinstance(keys[1], int):
        return f"layers[{cfg.hybrid_override_pattern[keys[1]]}]." + ".".join(str(k) for k in keys[2:])
    return ".".join(str(k) for k in keys)


def sharding_table(params_abstract, cfg) -> tuple[dict, list]:
    """{parameter family: partition spec} (layers grouped by kind) and the families left replicated
    (with their bytes per chip)."""
    import jax
    fams, repl = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params_abstract)[0]:
        fam = _family(path, cfg)
        spec = str(tuple(leaf.sharding.spec)) if leaf.sharding is not None else "()"
        fams.setdefault(fam, spec)
        if leaf.sharding is not None and leaf.sharding.is_fully_replicated:
            repl[fam] = repl.get(fam, 0) + _shard_bytes(leaf)
    return fams, [{"family": k, "bytes_per_chip": v} for k, v in sorted(repl.items(), key=lambda kv: -kv[1])]


# --------------------------------------------------------------------------- one stage
ASSUMED_MFU = 0.4


def plan_stage(xp, target, stage, *, microbatches: int | None = None, remat: str | None = None, mfu: float = ASSUMED_MFU,
               compile: bool = True) -> dict:
    """Compile (or, for GPU, lower) the step of `stage` for `target`; the per-chip memory, the
    shardings, the roofline and the stage's wall time and chip-hours."""
    import jax.numpy as jnp

    from . import aot
    from .sharding import merge_rules
    from .train import MeshConfig
    from .train.aot_step import abstract_elastic_step
    from .train.sharding import make_mesh

    chip = chip_for(target)
    devices = target_devices(target)
    n = len(devices)
    mesh_cfg = target.mesh or MeshConfig(fsdp=n)
    M = int(microbatches or target.microbatches or xp.train.microbatches)
    policy = xp.policy()
    remat = remat or target.remat or policy.remat
    policy = dataclasses.replace(policy, remat=remat)
    if stage.batch_size % M:
        raise ValueError(f"stage {stage.name!r}: batch_size {stage.batch_size} does not split into {M} micro-batches")
    micro = stage.batch_size // M
    mesh = make_mesh(mesh_cfg, devices=devices)
    rules = merge_rules(xp.train.sharding_rules)
    t0 = time.perf_counter()
    fn, args = abstract_elastic_step(xp.model, xp.elastic, mesh, batch=micro, length=stage.seq_len,
                                     param_dtype=jnp.dtype(xp.param_dtype),
                                     teacher_dtype=jnp.dtype(xp.teacher_dtype), policy=policy,
                                     vocab_chunk=xp.train.vocab_chunk, optim=xp.train.optim, rules=rules,
                                     microbatches=M)
    build_s = time.perf_counter() - t0
    state, teacher = args[0], args[1]
    terms = {"params": _tree_bytes(state["params"]), "optimizer_state": _tree_bytes(state["opt_state"]),
             "teacher": _tree_bytes(teacher), "router": _tree_bytes(state["router"])}
    terms["batch"] = _tree_bytes(args[2:])
    hbm = chip.hbm_bytes
    out = {"experiment": xp.name, "target": target.name, "platform": target.platform,
           "topology": target.topology, "devices": n, "chip": dataclasses.asdict(chip),
           "mesh": dict(zip(("data", "fsdp", "tensor", "expert"), mesh_cfg.shape)),
           "stage": stage.name, "seq_len": stage.seq_len, "batch_size": stage.batch_size, "microbatches": M,
           "micro_batch": micro, "remat": remat, "scan_layers": policy.scan_layers,
           "attention_impl": policy.attention_impl, "param_dtype": xp.param_dtype,
           "teacher_dtype": xp.teacher_dtype, "compute_dtype": policy.compute_dtype or xp.param_dtype}
    if target.platform == "gpu" or not compile:
        platform = "cpu"            # trace the portable (XLA) kernels: the GPU ones need a GPU to lower
        t1 = time.perf_counter()
        with aot.compile_target(platform), _set_mesh(mesh):
            fn.lower(*args)
        out.update(compiled=False, lower_seconds=time.perf_counter() - t1, compile_seconds=0.0,
                   note="lowered and sharded only (no GPU compiler on this host): argument bytes are exact, "
                        "temporaries unknown, so fits is unknown (null) unless the arguments alone exceed "
                        "the memory; fits_arguments judges the arguments alone")
        args_b = sum(terms.values())
        mem = {"argument_bytes": args_b, "temp_bytes": None, "output_bytes": None, "alias_bytes": None}
        per_device = args_b
        out["fits_arguments"] = per_device <= hbm
        fits = None if per_device <= hbm else False
        compiler_flops = None
    else:
        rep = aot.compile_report(fn, *args, mesh=mesh, available_bytes=hbm)
        out.update(compiled=rep.error is None, lower_seconds=rep.lower_seconds, compile_seconds=rep.compile_seconds)
        if rep.error is not None:
            out["compile_error"] = rep.error
        mem = {k: getattr(rep, k) for k in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes")}
        per_device = rep.total_bytes if rep.total_bytes is not None else rep.required_bytes
        fits = bool(rep.fits) and per_device is not None and per_device <= hbm
        compiler_flops = rep.flops
        if rep.temp_bytes is not None:
            terms["temporaries"] = rep.temp_bytes
            terms["outputs"] = max(0, rep.output_bytes - rep.alias_bytes)
        elif rep.required_bytes is not None:           # out of HBM: what the compiler asked for, minus inputs
            terms["temporaries"] = max(0, rep.required_bytes - sum(terms.values()))
    out["build_seconds"] = build_s
    out["memory"] = {**mem, "terms": terms, "per_device_bytes": per_device, "hbm_bytes": hbm,
                     "headroom_bytes": None if per_device is None else hbm - per_device}
    out["per_device_bytes"], out["hbm_bytes"], out["fits"] = per_device, hbm, (None if fits is None else bool(fits))
    if fits is False:
        dom = max(terms, key=terms.get)
        out["dominant_term"] = dom
        out["advice"] = _advice(dom, out)
    fams, repl = sharding_table(state["params"], xp.model)
    out["sharding"], out["replicated"] = fams, repl
    tokens = stage.batch_size * stage.seq_len
    fl = step_flops(xp.model, tokens, stage.seq_len, remat)
    cbytes = np.dtype(policy.compute_dtype or xp.param_dtype).itemsize
    by = step_bytes(xp.model, tokens_per_chip=tokens // n, microbatches=M, chips=n, remat=remat,
                    param_bytes=np.dtype(xp.param_dtype).itemsize, compute_bytes=cbytes)
    gathered = step_gather_bytes(xp.model, microbatches=M, fsdp=mesh_cfg.fsdp, remat=remat, compute_bytes=cbytes)
    t_compute = fl["hardware_flops"] / n / chip.bf16_flops
    t_mem = by / chip.hbm_bandwidth
    t_comm = gathered / chip.interconnect_bandwidth if chip.interconnect_bandwidth else 0.0
    bound_s = max(t_compute, t_mem, t_comm)
    step_s = max(bound_s, fl["model_flops"] / (n * chip.bf16_flops * mfu))
    steps = stage.num_steps
    out.update(flops_per_step=fl["hardware_flops"], model_flops_per_step=fl["model_flops"],
               compiler_flops=compiler_flops, bytes_per_step=by * n, bytes_per_step_per_chip=by,
               interconnect_bytes_per_step_per_chip=gathered,
               step_seconds_lower_bound=bound_s, assumed_mfu=mfu, step_seconds_estimate=step_s,
               bound=max((("compute", t_compute), ("memory", t_mem), ("interconnect", t_comm)), key=lambda x: x[1])[0],
               mfu_estimate=fl["model_flops"] / (n * chip.bf16_flops * step_s),
               mfu_upper_bound=fl["model_flops"] / (n * chip.bf16_flops * bound_s), tokens_per_second=tokens / step_s,
               stage_steps=steps, stage_tokens=steps * tokens, stage_hours=steps * step_s / 3600,
               stage_chip_hours=steps * step_s * n / 3600)
    return out


class _set_mesh:
    def __init__(self, mesh):
        import jax
        self.cm = jax.set_mesh(mesh)

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *a):
        return self.cm.__exit__(*a)


def search_stage(xp, target, stage, *, remats=REMAT_SEARCH, max_counts: int = 4, log=None) -> dict:
    """Try the remat policies x micro-batch counts (the target's count and the next `max_counts`-1
    larger ones whose micro-batch splits evenly over the chips); return {"best": the fitting plan with
    the lowest step time (None if none fits), "tried": [summary per candidate]}."""
    M0 = int(target.microbatches or xp.train.microbatches)
    mc = target.mesh
    n = mc.data * mc.fsdp * mc.expert if mc is not None else len(target_devices(target))   # batch shards
    # micro-batch counts from the target's upward whose micro-batch still gives every chip whole sequences
    ms = [m for m in range(M0, stage.batch_size + 1)
          if stage.batch_size % m == 0 and (stage.batch_size // m) % n == 0][:max_counts]
    best, tried = None, []
    for remat in remats:
        for m in ms:
            p = plan_stage(xp, target, stage, microbatches=m, remat=remat)
            row = {k: p.get(k) for k in ("remat", "microbatches", "fits", "per_device_bytes", "step_seconds_estimate",
                                         "compile_seconds", "dominant_term")}
            tried.append(row)
            if log:
                log(row)
            if p["fits"] and (best is None or p["step_seconds_estimate"] < best["step_seconds_estimate"]):
                best = p
    return {"best": best, "tried": tried}


# --------------------------------------------------------------------------- the whole plan
def plan(xp, target, *, stages=None, microbatches=None, remat=None, search: bool = False,
         infer_context: int = 131072, infer_batch: int = 1, log=None, mfu: float = ASSUMED_MFU) -> dict:
    """The plan of `xp` on `target` for the named stages (None: all): counts of the parent and
    every nested budget, then one compiled step per stage (or the `search` result per stage)."""
    for name, v in (("microbatches", microbatches), ("infer_context", infer_context), ("infer_batch", infer_batch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"plan {name}={v!r}: must be an int >= 1")
    stage_objs = [xp.stage(s) for s in stages] if stages else list(xp.train.stages)
    parent = model_counts(xp.model, context=infer_context, batch=infer_batch)
    budgets = []
    for b, w, err in nominal_widths(xp.model, xp.elastic):
        c = model_counts(xp.model, w, context=infer_context, batch=infer_batch)
        budgets.append({"budget": b, "widths": {k: v for k, v in _expected(w).items() if not isinstance(v, tuple)},
                        "fit_error": err, **c})
    res = {"experiment": xp.name, "target": target.name, "params_total": parent["params_total"],
           "params_active": parent["params_active"],
           "params_active_with_embeddings": parent["params_active_with_embeddings"],
           "inference_memory": parent["inference_memory"], "budgets": budgets,
           "published": _published(xp), "chip_figures": {k: dataclasses.asdict(v) for k, v in CHIPS.items()},
           "stages": []}
    for st in stage_objs:
        if search:
            s = search_stage(xp, target, st, log=log)
            p = s["best"] or plan_stage(xp, target, st, microbatches=microbatches, remat=remat, mfu=mfu)
            p = {**p, "search": s["tried"], "search_found": s["best"] is not None}
        else:
            p = plan_stage(xp, target, st, microbatches=microbatches, remat=remat, mfu=mfu)
        res["stages"].append(p)
        if log:
            log(p)
    # the headline fields (the JSON schema): the worst stage's memory, the first stage's cost
    worst = max(res["stages"], key=lambda p: p["per_device_bytes"] or 0)
    res.update(per_device_bytes=worst["per_device_bytes"], hbm_bytes=worst["hbm_bytes"],
               fits=_all_fit([p["fits"] for p in res["stages"]]),
               flops_per_step=res["stages"][0]["flops_per_step"],
               step_seconds_estimate=res["stages"][0]["step_seconds_estimate"],
               compile_seconds=sum(p["compile_seconds"] for p in res["stages"]),
               total_chip_hours=sum(p["stage_chip_hours"] for p in res["stages"]),
               total_hours=sum(p["stage_hours"] for p in res["stages"]))
    return res


def _all_fit(fits: list):
    """False if any stage does not fit, None (unknown) if any is unknown, else True."""
    return False if any(f is False for f in fits) else (None if any(f is None for f in fits) else True)


def _published(xp) -> dict | None:
    if not xp.published:
        return None
    return {str(k): {"total": v[0], "active": v[1]} for k, v in xp.published.items()}


# --------------------------------------------------------------------------- command line
def _target_from_args(xp, a):
    from .pod import Target
    from .train import MeshConfig
    if a.target:
        t = xp.target(a.target)
    elif a.topology:           # the experiment's own target for this slice (its mesh, micro-batches), if any
        t = next((t for t in xp.targets if t.platform == "tpu" and t.topology == a.topology), None) \
            or Target(f"cli:{a.topology}", "tpu", topology=a.topology)
    elif a.platform:           # the experiment's own target for this platform and device count, if any
        t = next((t for t in xp.targets if t.platform == a.platform and t.devices == a.devices), None) \
            or Target(f"cli:{a.platform}x{a.devices}", a.platform, devices=a.devices)
    else:
        t = xp.targets[0]
    if a.mesh:
        t = dataclasses.replace(t, mesh=MeshConfig(**a.mesh))
    if a.chip:
        t = dataclasses.replace(t, chip=a.chip)
    if a.hbm_gib:
        t = dataclasses.replace(t, hbm_gib=a.hbm_gib)
    return t


def _positive(kind):
    """argparse type: a number > 0 (refused at parse time, before any work)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (v > 0) or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _mesh_arg(text: str) -> dict:
    """argparse type for --mesh: `axis=N,...` over the mesh axes (data, fsdp, tensor, expert)."""
    from .sharding import MESH_AXES
    sizes = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected axis=N pairs, e.g. data=2,fsdp=64, with axes "
                                             f"{', '.join(MESH_AXES)} and N >= 1 (bad part {part!r})")
        if name in sizes:
            raise argparse.ArgumentTypeError(f"{text!r}: axis {name!r} given twice")
        sizes[name] = int(value)
    return sizes


def _cmd_plan(a) -> int:
    if a.platform in ("cpu", "gpu") and a.devices:
        flag = f"--xla_force_host_platform_device_count={a.devices}"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    if a.platform and a.platform != "tpu" and not a.devices:
        raise ValueError(f"--platform {a.platform} needs --devices N")
    from .experiment import apply_overrides, load_experiment
    from .pod import PodExperiment
    xp = apply_overrides(load_experiment(a.experiment), a.set)
    if not isinstance(xp, PodExperiment):
        raise ValueError(f"{a.experiment}: `plan` needs a PodExperiment config (elastic_jax.pod), got "
                         f"{type(xp).__name__}")
    target = _target_from_args(xp, a)
    log = None if a.json else (lambda row: print(f"  ... {row.get('remat')}/{row.get('microbatches')}: fits "
                                                 f"{row.get('fits')}", file=sys.stderr, flush=True))
    res = plan(xp, target, stages=a.stage, microbatches=a.microbatches, remat=a.remat, search=a.search,
               infer_context=a.infer_context, infer_batch=a.infer_batch, log=log, mfu=a.mfu)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(tmp, a.out)
    print(json.dumps(res, indent=1, default=str) if a.json else format_report(res))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `plan EXPERIMENT.py [--topology T | --platform gpu --devices N] [--stage NAME] ...`."""
    p = subparsers.add_parser("plan", help="compile a pod experiment's step for a target: memory, step time, cost")
    p.add_argument("experiment", help="an experiment file whose config() returns a PodExperiment")
    p.add_argument("--target", default=None, help="one of the experiment's targets by name (default: the first)")
    p.add_argument("--topology", default=None, help="a TPU slice, e.g. v5p:4x4x8 (ahead-of-time libtpu compile)")
    p.add_argument("--platform", choices=("tpu", "gpu", "cpu"), default=None,
                   help="gpu: lower and shard only; cpu: a real XLA:CPU compile on host devices")
    p.add_argument("--devices", type=_positive(int), default=None, help="device count for --platform gpu / cpu")
    p.add_argument("--chip", default=None, help=f"chip figures to use ({', '.join(CHIPS)})")
    p.add_argument("--hbm-gib", type=_positive(float), default=None, help="memory per chip, replacing the chip's figure")
    p.add_argument("--mesh", type=_mesh_arg, default=None, help="mesh axes, e.g. data=2,fsdp=64 (default: all chips on fsdp)")
    p.add_argument("--stage", action="append", default=None, help="a curriculum stage by name (repeatable; default all)")
    p.add_argument("--microbatches", type=_positive(int), default=None, help="micro-batches per step (default: the config's)")
    p.add_argument("--remat", default=None, choices=REMAT_SEARCH, help="remat policy (default: the config's)")
    p.add_argument("--search", action="store_true", help="try remat policies x micro-batch counts; keep the cheapest that fits")
    p.add_argument("--infer-context", type=_positive(int), default=131072, help="context of the per-budget inference memory")
    p.add_argument("--infer-batch", type=_positive(int), default=1, help="batch of the per-budget inference memory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--mfu", type=float, default=ASSUMED_MFU,
                   help=f"model FLOPs utilization the step-time estimate assumes (default {ASSUMED_MFU})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=_cmd_plan)
    return p


__all__ = ["CHIPS", "Chip", "plan", "plan_stage", "search_stage", "model_counts", "nominal_widths", "step_flops",
           "step_bytes", "step_gather_bytes", "format_report", "add_cli"]
