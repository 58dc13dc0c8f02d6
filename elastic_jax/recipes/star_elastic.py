"""The main job: a complete Star Elastic run on the embedded reasoning task (METHOD §1, §9, §11).

    parent (CE on the task, or loaded from <out>/parent when its run is complete)
      -> importance + permutation (METHOD §3)
      -> Star Elastic distillation into the budgets, two-stage curriculum (METHOD §6-7)
      -> router argmax per budget -> Widths -> one nested checkpoint + sliced copies (METHOD §8)
      -> independent baselines: the permuted parent pruned to each budget's widths, distilled alone
         (optionally on several multiples of the tokens each nested model saw: the token sweep)
      -> accuracy per model with diagnostics (answer accuracy given the gold trace, exact-trace
         rate); budget-control grid (every think/answer pair x thinking budgets), the truncation
         baselines (each nested model alone, the parent alone), modeled latency per phase on
         hardware profiles (eval/latency.py); report.md, results.json, PNG plots.

`StarElasticExperiment` is the frozen config; `experiments/tiny_star_elastic.py` only builds it.
`run_star_elastic(config, out_dir)` runs it (`StarElasticExperiment.run`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from ..config import NemotronHConfig
from ..data import DataConfig, make_dataset
from ..elastic import ElasticConfig, param_count, slice_params
from ..infer.budget import ElasticModel
from ..infer.checkpoint import save_nested, save_standalone, widths_to_dict
from ..eval.accuracy import model_row
from ..eval.config import EvalConfig
from ..eval.latency import LatencyTarget, measure_host_profile
from ..eval.parent_curve import ParentRule
from ..eval.rigor import latency_sensitivity
from ..eval.quantized import QuantEvalConfig
from ..tasks import DEFAULT_LEVELS, TaskTokenizer, make_eval_set, make_problems, trace_text, unit_seen, vocab_needed
from ..train import TrainConfig, train_kd
from ..train.runctl import relay_sigterm
from ..widths import Widths
from .family import (BackgroundSeeds, CompileCache, announce, baseline_steps_config, config_dict, embedded_model,
                     extra_baseline_rows, extra_baselines, history, nested_tokens, parent_curve_rows, train_family,
                     warmup_fraction)


@dataclass(frozen=True)
class StarElasticExperiment:
    """One complete run. `baseline_train=None`: each baseline gets the elastic run's stages (same
    steps and tokens), i.e. the same training budget as the whole elastic run."""

    model: NemotronHConfig
    elastic: ElasticConfig
    parent_train: TrainConfig
    elastic_train: TrainConfig
    data: DataConfig = DataConfig(kind="task", num_documents=20000, seed=0)
    baseline_train: TrainConfig | None = None
    eval: EvalConfig = EvalConfig()
    calibration_batches: int = 4
    calibration_batch_size: int = 32
    seed: int = 0
    title: str = "Star Elastic on the embedded reasoning task"
    progress: bool = True
    # token efficiency: independent baselines of each nested size distilled on these multiples of the
    # tokens that nested model saw inside the elastic run (expected share of the sampled budgets);
    # () = one baseline per size trained with `baseline_train` as given
    token_multiples: tuple[float, ...] = ()
    comparison_seed: int = 0                   # added to the elastic run's and the baselines' seeds
    # quantized nested checkpoints (METHOD §10): FP8 / NVFP4 PTQ and NVFP4 QAD per budget, bytes on disk
    quant: QuantEvalConfig = QuantEvalConfig()
    # training seeds (issue 30): seed 0 is the full run above (token sweep, grid, quantization, checkpoints);
    # seeds 1..seeds-1 train their own parent, elastic run and 1x baselines (`seed_offsets`) and are
    # evaluated on the same problems, so the report's intervals resample seeds x problems
    seeds: int = 1
    # a pre-registered parent (issue 30, eval/parent_curve.py): the snapshot (every
    # `parent_train.checkpoint_every` steps, all kept) whose held-out loss the rule stops at; None = the last
    parent_rule: ParentRule | None = None
    # the gap-vs-parent-steps curve: seed 0's parent snapshots at these steps, each elastified with
    # `parent_curve_train` (a short elastic schedule) and scored given the gold trace; () = none
    parent_curve: tuple[int, ...] = ()
    parent_curve_train: TrainConfig | None = None
    # fair token accounting (issue 30, seed 0; both off here, the main job's config sets `scratch_steps`):
    # 1x baselines of each smaller size at these extra learning rates (the separate route's LR search), and
    # each smaller size trained from random init with the parent's CE schedule for `scratch_steps` steps,
    # evaluated at every quarter of them (the from-scratch route's tokens to match)
    baseline_lrs: tuple[float, ...] = ()
    scratch_steps: int = 0

    def __post_init__(self):
        if self.data.kind != "task":
            raise ValueError(f"StarElasticExperiment.data.kind={self.data.kind!r}: the main job trains on the "
                             "embedded reasoning task (kind='task')")
        need = max(vocab_needed(self.data.task_levels), vocab_needed(self.eval.levels))
        if self.model.vocab_size < need:
            raise ValueError(f"StarElasticExperiment.model.vocab_size={self.model.vocab_size}: the task levels "
                             f"{self.data.task_levels or 'default'} / {self.eval.levels} use token ids up to {need - 1}")
        if self.calibration_batches <= 0:
            raise ValueError(f"StarElasticExperiment.calibration_batches={self.calibration_batches}: must be > 0")
        if isinstance(self.token_multiples, list):
            object.__setattr__(self, "token_multiples", tuple(float(m) for m in self.token_multiples))
        if any(not m > 0 for m in self.token_multiples):
            raise ValueError(f"StarElasticExperiment.token_multiples={self.token_multiples}: must be positive")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"StarElasticExperiment.seeds={self.seeds!r}: must be an integer >= 1")
        if isinstance(self.baseline_lrs, list):
            object.__setattr__(self, "baseline_lrs", tuple(float(x) for x in self.baseline_lrs))
        if any(not lr > 0 for lr in self.baseline_lrs):
            raise ValueError(f"StarElasticExperiment.baseline_lrs={self.baseline_lrs}: must be positive")
        if not isinstance(self.scratch_steps, int) or self.scratch_steps < 0:
            raise ValueError(f"StarElasticExperiment.scratch_steps={self.scratch_steps!r}: must be an integer >= 0")
        if isinstance(self.parent_curve, list):
            object.__setattr__(self, "parent_curve", tuple(int(s) for s in self.parent_curve))
        every, total = self.parent_train.checkpoint_every, self.parent_train.total_steps
        if self.parent_rule is not None or self.parent_curve:
            if self.parent_train.keep_checkpoints < total // every:
                raise ValueError(f"StarElasticExperiment.parent_rule / parent_curve read the parent's snapshots: "
                                 f"parent_train.keep_checkpoints={self.parent_train.keep_checkpoints} must keep all "
                                 f"{total // every} of them (checkpoint_every={every}, {total} steps)")
        if self.parent_rule is not None and self.parent_rule.window % every:
            raise ValueError(f"StarElasticExperiment.parent_rule.window={self.parent_rule.window} must be a multiple "
                             f"of parent_train.checkpoint_every={every} (the snapshots the rule compares)")
        bad = [s for s in self.parent_curve if s <= 0 or s > total or (s % every and s != total)]
        if bad:
            raise ValueError(f"StarElasticExperiment.parent_curve={self.parent_curve}: {bad} are not parent snapshot "
                             f"steps (multiples of checkpoint_every={every} up to {total})")
        if self.parent_curve and self.parent_curve_train is None:
            raise ValueError("StarElasticExperiment.parent_curve needs parent_curve_train (the short elastic schedule)")

    def run(self, out_dir: str):
        """The runner: `run_star_elastic` (below), the whole main job."""
        return run_star_elastic(self, out_dir)


def run_star_elastic(xp: StarElasticExperiment, out_dir: str) -> dict:
    """Run the whole pipeline into `out_dir`; returns the results dict (also in results.json)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with CompileCache(out_dir), contextlib.ExitStack() as background:
        return _run(xp, out_dir, background)


def _run(xp: StarElasticExperiment, out_dir: str, background: contextlib.ExitStack) -> dict:
    from ..eval.evaluate import evaluate_grid
    from ..eval.report import analyze, write_report

    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    say = lambda m: announce(m, xp.progress)
    cfg, ecfg = xp.model, xp.elastic
    levels = sorted(set(xp.data.task_levels or DEFAULT_LEVELS) | set(xp.eval.levels))
    tok = TaskTokenizer.default(levels)        # only the words these levels use: fits the model's vocab
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    data = make_dataset(xp.data, cfg.vocab_size)

    stream = data.batches(xp.elastic_train.stages[0].seq_len, xp.calibration_batch_size, epoch_seed=10_000)
    calib = [next(stream) for _ in range(xp.calibration_batches)]
    fam = train_family(xp, out_dir, data, calib, phases, say)
    ev = xp.eval
    eval_set = make_eval_set(ev.seed, ev.n_problems, ev.split, ev.levels, tokenizer=tok)
    gold = [tok.encode(trace_text(p)) for p in eval_set.problems]
    # training seeds 1.. (issue 30) train in a worker thread beside seed 0's stages up to the grid; started
    # after seed 0's family, whose compiled parent and elastic steps they then read from the persistent cache
    # (started together, both threads compiled them: measured slower)
    seeds = None
    if xp.seeds > 1:
        seeds = background.enter_context(BackgroundSeeds(xp, out_dir, data, calib, eval_set, tok, gold, say))
        background.enter_context(relay_sigterm(out_dir))
    rules = [] if fam["rule"] is None else [{"seed": 0, **fam["rule"]}]
    parent_res, parent, importance, teacher, el, el_train, widths = (
        fam["parent_res"], fam["parent"], fam["importance"], fam["teacher"], fam["el"], fam["el_train"], fam["widths"])
    names = list(widths)
    fractions = dict(zip(names, ecfg.budgets))

    # ---------------------------------------------------------------- checkpoints (nested + sliced)
    t0 = time.perf_counter()
    ck = os.path.join(out_dir, "checkpoints")
    nested_files = save_nested(os.path.join(ck, "nested"), cfg, el.params, widths, fractions=fractions,
                               router_params=el.router_params, elastic_cfg=ecfg, tokenizer=tok)
    sliced_bytes = {}
    for n, w in widths.items():
        sub_cfg, sub_params = slice_params(el.params, cfg, w)
        sliced_bytes[n] = save_standalone(os.path.join(ck, f"sliced_{n.rstrip('%')}"), sub_cfg, sub_params)
    phases["checkpoints"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- independent baselines
    t0 = time.perf_counter()
    base_train = xp.baseline_train or xp.elastic_train
    base_train = dataclasses.replace(base_train, seed=base_train.seed + xp.comparison_seed)
    seen = dict(zip(names, nested_tokens(xp.elastic_train, len(names))))
    multiples = xp.token_multiples or (None,)
    baselines, sweep = {}, []           # baselines: the 1x (or the only) baseline per size
    for n, b in zip(names, ecfg.budgets):
        if b >= 1.0:
            continue          # the full-size "independent model" is the parent itself
        sub_cfg, sub_params = slice_params(teacher, cfg, widths[n])
        for m in multiples:
            tc = baseline_steps_config(base_train, m, seen[n], warmup_fraction(xp.elastic_train))
            tag = "" if m is None or m == 1.0 else f"_x{m:g}"
            say(f"baseline {n}{tag}: prune the parent to {param_count(sub_cfg):,} params by importance, then KD "
                f"alone for {tc.stages[0].steps if len(tc.stages) == 1 else 'the elastic stages'} steps")
            run = f"baseline_{n.rstrip('%')}{tag}"
            res = train_kd(sub_cfg, tc, cfg, teacher, sub_params, data, os.path.join(out_dir, run),
                           progress=xp.progress)
            sweep.append({"name": n, "multiple": m, "run": run, "train_tokens": int(res.tokens_seen),
                          "steps": tc.total_steps, "warmup_steps": tc.optim.warmup_steps,
                          "cfg": sub_cfg, "res": res})
            if m is None or m == 1.0 or (1.0 not in multiples and m == multiples[0]):
                baselines[n] = (sub_cfg, res)
                save_standalone(os.path.join(ck, f"baseline_{n.rstrip('%')}"), sub_cfg, res.params)
    phases["baselines"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra = extra_baselines(xp, out_dir, data, teacher, widths, base_train, seen, say)
    if extra:
        phases["baselines_lr_scratch"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- evaluation
    t0 = time.perf_counter()
    # per answer part: does its scoring unit occur in a training document? (the report's seen / unseen split)
    units_seen = unit_seen(eval_set.problems, make_problems(xp.data.seed, xp.data.num_documents,
                                                            xp.data.task_split, xp.data.task_levels))
    # quantized nested checkpoints first: resumed runs reach (and cache) this stage before the long grid
    quant_results = None
    if xp.quant.enabled:
        from ..eval.quantized import run_quant_stage
        tq = time.perf_counter()
        quant_results = run_quant_stage(
            xp.quant, cfg=cfg, ecfg=ecfg, el_train=el_train, teacher=el.params, router_params=el.router_params,
            widths=widths, data_cfg=xp.data, data=data, calib_tokens=[b["tokens"] for b in calib],
            eval_fn=lambda m: {n: model_row(m, n, eval_set, tok, ev, gold, diagnostics=False) for n in names},
            eval_size=len(eval_set), out_dir=out_dir, say=say, progress=xp.progress)
        phases["quantization"] = time.perf_counter() - tq
    t0 = time.perf_counter()
    # every model runs the masked forward at the parent's shapes (masked == sliced, tests/test_model.py): one
    # set of compiled programs for the parent, the nested models, every baseline and snapshot (embedded at
    # the parent's shapes), every seed and the grid, where sliced copies compiled their own per size
    nested_model = ElasticModel(cfg, el.params, widths, mode="masked")
    parent_model = ElasticModel(cfg, parent, {"parent": Widths()}, mode="masked")
    say(f"evaluating the parent, nested models and baselines on {len(eval_set)} problems")
    parent_row = {"name": "parent", "params": param_count(cfg), "active_params": param_count(cfg, active=True),
                  **model_row(parent_model, "parent", eval_set, tok, ev, gold)}
    nested_rows = []
    for n in names:
        nested_rows.append({"name": n, "fraction": fractions[n], "widths": widths_to_dict(widths[n]),
                            "params": param_count(cfg, widths[n]), "active_params": param_count(cfg, widths[n], True),
                            "train_tokens_expected": seen[n],
                            **model_row(nested_model, n, eval_set, tok, ev, gold)})
    base_rows, sweep_rows = [], []
    for item in sweep:
        n, sub_cfg, res = item["name"], item["cfg"], item["res"]
        bm = embedded_model(cfg, n, widths[n], res.params)
        headline = baselines.get(n, (None, None))[1] is res
        row = {"name": n, "params": param_count(sub_cfg), "active_params": param_count(sub_cfg, active=True),
               "train_tokens": item["train_tokens"], "multiple": item["multiple"], "run": item["run"],
               "steps": item["steps"], "warmup_steps": item["warmup_steps"],
               **model_row(bm, n, eval_set, tok, ev, gold, diagnostics=headline)}
        sweep_rows.append(row)
        if headline:
            base_rows.append(row)
    extra_rows = extra_baseline_rows(
        extra, out_dir, seen, lambda p, n: model_row(embedded_model(cfg, n, widths[n], p), n, eval_set, tok, ev, gold,
                                                     diagnostics=False))
    phases["eval_models"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    main_point = {"steps": parent_res.steps if fam["rule"] is None else fam["rule"]["step"],
                  "parent": parent_row["scores_gold_trace"], "full": nested_rows[0]["scores_gold_trace"],
                  "small": nested_rows[-1]["scores_gold_trace"]}
    curve = parent_curve_rows(xp, out_dir, data, calib, eval_set, tok, say, main_point) if xp.parent_curve else []
    if curve:
        phases["parent_curve"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- training seeds 1..seeds-1 (issue 30)
    # joined before the grid, whose wall clock and host profile are measured on an otherwise idle machine
    t0 = time.perf_counter()
    seed_runs = [] if seeds is None else seeds.result(phases)
    background.close()              # the SIGTERM relay: nothing trains any more
    rules += [r["parent_rule"] for r in seed_runs if r.get("parent_rule")]
    if seeds is not None:
        phases["seeds_wait"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets = [LatencyTarget.make(ev.latency_profile, ev.latency_reference)]
    for prof in ev.latency_profiles:
        for ref in dict.fromkeys((ev.latency_reference, None)):
            t = LatencyTarget.make(prof, ref)
            if t.key not in {x.key for x in targets}:
                targets.append(t)
    host = None
    if ev.measure_host:
        host = measure_host_profile()
        targets.append(LatencyTarget(key="host", profile=host))
    primary = targets[0].key
    grid_set = eval_set.head(ev.grid_problems or len(eval_set))
    say(f"budget-control grid on {len(grid_set)} problems: {len(names)}x{len(names)} pairs x "
        f"thinking budgets {list(ev.thinking_budgets)}; "
        f"modeled latency on {primary} (primary) and {[t.key for t in targets[1:]]}")
    by_frac = {b: n for n, b in fractions.items()}
    tp = [(by_frac[a], by_frac[b]) for a, b in ev.transplant_pairs if a in by_frac and b in by_frac]
    grid_kw = dict(max_answer_tokens=ev.max_answer_tokens, batch_size=ev.batch_size, repeats=ev.repeats,
                   max_thinking=ev.full_thinking, latency_targets=targets, primary=primary,
                   gold_traces=gold[:len(grid_set)])
    grid = evaluate_grid(nested_model, grid_set, tok, ev.thinking_budgets, transplant_pairs=tp, **grid_kw)
    if ev.parent_truncation:
        grid += evaluate_grid(parent_model, grid_set, tok, ev.thinking_budgets, family="parent", **grid_kw)
    phases["grid"] = time.perf_counter() - t0

    # the latency model's sensitivity (batch, achieved bandwidth, per-call overhead) at full thinking
    sensitivity = latency_sensitivity(
        targets[0], cfg, widths, prompt_len=int(round(np.mean([len(p) for p in eval_set.prompts]))),
        think_steps=int(round(np.mean(eval_set.trace_lengths))) + 1, answer_steps=ev.max_answer_tokens)

    # ---------------------------------------------------------------- report
    results = {
        "title": xp.title,
        "config": config_dict(xp),
        "latency": {"primary": primary, "targets": {t.key: {"description": t.describe(), **t.profile.to_dict()}
                                                     for t in targets},
                    "batch": 1, "note": "modeled per request at batch 1: prefill the prompt, decode the trace; "
                                        "the answering model re-prefills prompt + trace (bucketed to a multiple "
                                        "of 8) when it differs, then decodes the answer",
                    "sensitivity": sensitivity},
        "token_sweep": [{k: v for k, v in r.items() if k not in ("scores_gold_trace",)} for r in sweep_rows],
        "nested_tokens": seen, "comparison_seed": xp.comparison_seed,
        "eval": {"n_problems": len(eval_set), "grid_problems": len(grid_set), "split": ev.split,
                 "levels": list(ev.levels), "units_seen": units_seen,
                 "max_trace_tokens": int(max(eval_set.trace_lengths)),
                 "mean_trace_tokens": float(np.mean(eval_set.trace_lengths))},
        "parent": parent_row, "nested": nested_rows, "baselines": base_rows, "seed_runs": seed_runs,
        "parent_rule": None if not rules else {"rule": xp.parent_rule.to_dict(), "cap": xp.parent_train.total_steps,
                                               "seeds": rules},
        "parent_curve": curve,
        "lr_sweep": [r for r in extra_rows if r["kind"] == "lr"],
        "scratch": [r for r in extra_rows if r["kind"] == "scratch"],
        "training": {"parent_tokens": int(parent_res.tokens_seen), "elastic_tokens": int(el.tokens_seen),
                     "baseline_tokens": {n: int(r.tokens_seen) for n, (_, r) in baselines.items()},
                     "histories": {"parent": history(os.path.join(out_dir, "parent")),
                                   "elastic": history(os.path.join(out_dir, "elastic")),
                                   **{f"baseline {n}": history(os.path.join(out_dir, f"baseline_{n.rstrip('%')}"))
                                      for n in baselines}}},
        "memory": {"nested_checkpoint_bytes": int(sum(b for f, b in nested_files.items()     # model + router
                                                      if f.endswith(".safetensors"))),
                   "separate_checkpoint_bytes": int(sum(sliced_bytes.values())),
                   "files": {"nested model.safetensors": nested_files["model.safetensors"],
                             "nested elastic/router.safetensors": nested_files.get(os.path.join("elastic", "router.safetensors"), 0),
                             **{f"separate {n}": v for n, v in sliced_bytes.items()}}},
        "grid": [p.to_dict() for p in grid],
        "quantization": quant_results,
        "grid_budgets": list(ev.thinking_budgets),
        "notes": [("parent loaded from the finished run in parent/ (training skipped)"
                   if parent_res.resumed_from is not None and not parent_res.history else
                   f"parent trained with next-token CE for {parent_res.steps} steps"),
                  f"importance: {type(importance).__name__} on {xp.calibration_batches} calibration batches; "
                  f"the teacher of every distillation is the permuted parent",
                  "every model is evaluated through the masked forward at the parent's shapes (baselines and "
                  "from-scratch models embedded, zeros elsewhere); masked == sliced, so the scores are those of the "
                  "zero-shot sliced checkpoints in checkpoints/; wall clock is therefore the parent-shaped program's "
                  "for every size",
                  (f"'full thinking' = a thinking budget of {ev.full_thinking} tokens, >= the longest reference "
                   f"trace ({max(eval_set.trace_lengths)} tokens)" if ev.full_thinking >= max(eval_set.trace_lengths)
                   else f"WARNING: full_thinking={ev.full_thinking} is below the longest reference trace "
                        f"({max(eval_set.trace_lengths)} tokens), so 'full thinking' accuracy is truncated too"),
                  "wall-clock latency is measured on this machine's CPU(s) (median of repeats; compile time "
                  "excluded); the plots' primary axis is the modeled latency (see Latency)",
                  "the independent baselines start from the same router-chosen widths as the nested models: "
                  "they inherit the elastic run's width search for free"],
    }
    phases["report"] = 0.0
    results["timing"] = {"total_s": time.perf_counter() - t_start, "phases": phases}
    results["analysis"] = analyze(results)
    write_report(results, out_dir)
    say(f"done in {results['timing']['total_s']:.1f} s: {os.path.join(out_dir, 'report.md')}")
    return results
