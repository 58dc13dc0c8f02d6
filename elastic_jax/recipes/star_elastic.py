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

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import jax
import numpy as np

from ..config import NemotronHConfig
from ..data import DataConfig, make_dataset
from ..elastic import ElasticConfig, estimate_importance, trained_widths, param_count, permute_params, slice_params
from ..infer.budget import ElasticModel
from ..infer.checkpoint import save_nested, save_standalone, widths_to_dict
from ..model import init_params
from ..eval.accuracy import model_row
from ..eval.config import EvalConfig
from ..eval.latency import LatencyTarget, measure_host_profile
from ..eval.parent_curve import ParentRule, converged_step, gap_row, heldout_loss
from ..eval.rigor import latency_sensitivity
from ..eval.quantized import QuantEvalConfig
from ..tasks import DEFAULT_LEVELS, TaskTokenizer, make_eval_set, make_problems, trace_text, unit_seen, vocab_needed
from ..train import TrainConfig, train_elastic, train_kd, train_lm
from ..train.metrics import read_jsonl
from ..widths import Widths


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
    # fair token accounting (issue 30, seed 0; both off by default: cost): 1x baselines of each smaller size
    # at these extra learning rates (the separate route's LR search), and each smaller size trained from
    # random init with the parent's CE schedule for `scratch_steps` steps (the from-scratch baseline)
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


def budget_name(fraction: float) -> str:
    return f"{round(100 * fraction):d}%"


def nested_tokens(train: TrainConfig, n_budgets: int) -> list[float]:
    """Expected training tokens each budget saw inside the elastic run: per stage, its tokens x the
    budget's sampling probability (uniform when the stage gives none); one budget per micro-batch."""
    out = np.zeros(n_budgets)
    for st in train.stages:
        tokens = st.tokens if st.tokens is not None else st.steps * st.seq_len * st.batch_size
        p = np.full(n_budgets, 1.0 / n_budgets) if st.budget_probs is None else np.asarray(st.budget_probs, float)
        out += tokens * p / p.sum()
    return [float(x) for x in out]


def _history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    keep = ("step", "stage", "loss", "task", "tokens_seen")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("task_budget_")} for r in read_jsonl(path)] \
        if os.path.isfile(path) else []


def _say(msg: str, progress: bool):
    if progress:
        print(f"[star-elastic] {msg}", flush=True)



def seed_offsets(xp: StarElasticExperiment, k: int) -> StarElasticExperiment:
    """Training seed `k` of `xp` (issue 30): the model init, the parent's run and the comparison seed
    (elastic run and baselines) moved by k; the training documents and eval problems stay the same, so
    per-problem scores pair across seeds. Equal to a separate run with `--set seed=K --set
    parent_train.seed=K --set comparison_seed=K` (eval/seeds.py)."""
    return dataclasses.replace(xp, seed=xp.seed + k, comparison_seed=xp.comparison_seed + k, seeds=1,
                               parent_train=dataclasses.replace(xp.parent_train, seed=xp.parent_train.seed + k))


def _train_family(xp: StarElasticExperiment, out_dir: str, data, calib, phases: dict, say) -> dict:
    """Parent (CE) -> importance + permutation -> elastic distillation -> router widths per budget
    (METHOD §3, §6-8), in `out_dir`/parent and /elastic; each run resumes from its checkpoints."""
    cfg, ecfg = xp.model, xp.elastic
    t0 = time.perf_counter()
    say(f"parent: {param_count(cfg):,} params ({param_count(cfg, active=True):,} active), pattern {cfg.pattern}")
    parent0 = init_params(cfg, jax.random.PRNGKey(xp.seed))
    parent_res = train_lm(cfg, xp.parent_train, parent0, data, os.path.join(out_dir, "parent"), progress=xp.progress)
    parent, rule = parent_res.params, None
    if xp.parent_rule is not None:
        parent, rule = _apply_parent_rule(xp, os.path.join(out_dir, "parent"), parent, data)
        say(f"parent rule: snapshot at step {rule['step']} ({rule['reason']})")
    phases["parent"] = phases.get("parent", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    importance = estimate_importance(parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]}
                                                   for b in calib])
    teacher = permute_params(parent, cfg, importance)
    phases["importance"] = phases.get("importance", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"elastic distillation into budgets {ecfg.budgets}")
    el_train = dataclasses.replace(xp.elastic_train, seed=xp.elastic_train.seed + xp.comparison_seed)
    el = train_elastic(cfg, ecfg, el_train, teacher, teacher, data, os.path.join(out_dir, "elastic"),
                       progress=xp.progress)
    phases["elastic"] = phases.get("elastic", 0.0) + time.perf_counter() - t0
    widths = {budget_name(b): trained_widths(el.router_params, cfg, ecfg, b) for b in ecfg.budgets}  # 100%: parent
    return {"parent_res": parent_res, "parent": parent, "importance": importance, "teacher": teacher, "el": el,
            "el_train": el_train, "widths": widths, "rule": rule}


def _snapshots(parent_dir: str, every: int, total: int) -> list[int]:
    """The parent run's kept snapshot steps (multiples of `every`, and the last): a preemption's
    checkpoint at another step is not a snapshot."""
    from ..train.checkpoint import Checkpointer
    ck = Checkpointer(os.path.join(parent_dir, "checkpoints"), async_save=False)
    try:
        return sorted(s for s in ck.complete_steps() if s % every == 0 or s == total)
    finally:
        ck.close()


def _apply_parent_rule(xp: StarElasticExperiment, parent_dir: str, final_params, data) -> tuple:
    """(the parent's params at the snapshot `xp.parent_rule` picks, the rule's record): held-out loss
    at every snapshot of the parent run (eval/parent_curve.py `converged_step`)."""
    from ..train.checkpoint import load_run
    rule, st, total = xp.parent_rule, xp.parent_train.stages[0], xp.parent_train.total_steps
    held = make_dataset(dataclasses.replace(xp.data, seed=xp.data.seed + 101,
                                            num_documents=max(64, 4 * rule.heldout_batches * st.batch_size)),
                        xp.model.vocab_size)
    stream = held.batches(st.seq_len, st.batch_size, epoch_seed=20_000)
    batches = [next(stream) for _ in range(rule.heldout_batches)]
    params = {s: (final_params if s == total else load_run(parent_dir, s)[1])
              for s in _snapshots(parent_dir, xp.parent_train.checkpoint_every, total)}
    curve = [(s, heldout_loss(p, xp.model, batches)) for s, p in params.items()]
    res = converged_step(curve, rule, total)
    return params.get(res["step"], final_params), res


def baseline_steps_config(base_train: TrainConfig, multiple: float | None, seen: float,
                          warmup_fraction: float | None = None) -> TrainConfig:
    """The baseline's one-stage schedule on `multiple` x the `seen` tokens (None: `base_train` as given).
    `warmup_fraction`: its warmup is that share of its steps (issue 30: the elastic run's share, so a
    short baseline is not mostly warmup); None keeps `base_train`'s warmup steps."""
    if multiple is None:
        return base_train
    st = base_train.stages[0]
    steps = max(1, int(round(multiple * seen / (st.seq_len * st.batch_size))))
    optim = base_train.optim if warmup_fraction is None else dataclasses.replace(
        base_train.optim, warmup_steps=int(round(warmup_fraction * steps)))
    return dataclasses.replace(base_train, optim=optim, stages=(dataclasses.replace(st, steps=steps, tokens=None),))


def warmup_fraction(train: TrainConfig) -> float:
    """The share of `train`'s steps spent in warmup."""
    return min(1.0, train.optim.warmup_steps / max(1, train.total_steps))



_NOT_IN_SEED_ROWS = ("seeds", "parent_curve", "parent_curve_train", "quant", "title", "progress", "baseline_lrs",
                     "scratch_steps")


def _seed_rows(xp: StarElasticExperiment, k: int, out_dir: str, data, calib, eval_set, tok, gold, phases: dict,
               say) -> dict:
    """Training seed k >= 1 (`seed_offsets`) in `out_dir`/seeds/seed{k}: its parent, elastic run and
    one baseline per nested size (the 1x token multiple, or `baseline_train` as given), each model
    evaluated on `eval_set` with the gold-trace diagnostics. The rows are cached in rows.json (written
    atomically, reused by a rerun of the same config and eval set); the runs resume from checkpoints."""
    from ..fileio import write_text_atomic
    xk = seed_offsets(xp, k)
    seed_dir = os.path.join(out_dir, "seeds", f"seed{k}")
    cache = os.path.join(seed_dir, "rows.json")
    # what the seed's rows depend on (not the seed count, the curve, the grid or quantization of seed 0)
    key = {"config": {f: v for f, v in _config_dict(xk).items() if f not in _NOT_IN_SEED_ROWS},
           "n_problems": len(eval_set)}
    if os.path.isfile(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            say(f"seed {k}: rows of a finished seed run reused ({cache})")
            return cached["rows"]
    cfg, ecfg, ev = xk.model, xk.elastic, xk.eval
    say(f"seed {k} of {xp.seeds}: parent, elastic run and 1x baselines in {seed_dir}")
    fam = _train_family(xk, seed_dir, data, calib, phases, say)
    widths, teacher, el = fam["widths"], fam["teacher"], fam["el"]
    names = list(widths)
    t0 = time.perf_counter()
    seen = dict(zip(names, nested_tokens(xk.elastic_train, len(names))))
    base_train = xk.baseline_train or xk.elastic_train
    base_train = dataclasses.replace(base_train, seed=base_train.seed + xk.comparison_seed)
    base = {}
    for n, b in zip(names, ecfg.budgets):
        if b >= 1.0:
            continue
        sub_cfg, sub_params = slice_params(teacher, cfg, widths[n])
        tc = baseline_steps_config(base_train, 1.0 if xk.token_multiples else None, seen[n],
                                   warmup_fraction(xk.elastic_train))
        res = train_kd(sub_cfg, tc, cfg, teacher, sub_params, data, os.path.join(seed_dir, f"baseline_{n.rstrip('%')}"),
                       progress=xk.progress)
        base[n] = (sub_cfg, res)
    phases["baselines"] = phases.get("baselines", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    say(f"seed {k}: evaluating the parent, nested models and baselines on {len(eval_set)} problems")
    parent_model = ElasticModel(cfg, fam["parent"], {"parent": Widths()}, mode="sliced")
    nested_model = ElasticModel(cfg, el.params, widths, mode="sliced")
    rows = {"seed": k, "parent": {"name": "parent", **model_row(parent_model, "parent", eval_set, tok, ev, gold)},
            "nested": [{"name": n, "fraction": b, "widths": widths_to_dict(widths[n]),
                        "params": param_count(cfg, widths[n]), "active_params": param_count(cfg, widths[n], True),
                        **model_row(nested_model, n, eval_set, tok, ev, gold)} for n, b in zip(names, ecfg.budgets)],
            "baselines": [{"name": n, "params": param_count(c), "active_params": param_count(c, active=True),
                           "train_tokens": int(r.tokens_seen),
                           **model_row(ElasticModel(c, r.params, {n: Widths()}, mode="masked"), n, eval_set, tok, ev,
                                       gold)} for n, (c, r) in base.items()],
            "training": {"parent_tokens": int(fam["parent_res"].tokens_seen), "elastic_tokens": int(el.tokens_seen),
                         "baseline_tokens": {n: int(r.tokens_seen) for n, (_, r) in base.items()}},
            "parent_rule": None if fam["rule"] is None else {"seed": k, **fam["rule"]}}
    phases["eval_seeds"] = phases.get("eval_seeds", 0.0) + time.perf_counter() - t0
    write_text_atomic(cache, json.dumps({"key": key, "rows": rows}, default=float))
    return rows



def _parent_curve(xp: StarElasticExperiment, out_dir: str, data, calib, eval_set, tok, say, main: dict) -> list[dict]:
    """The gap-vs-parent-steps curve (issue 30): each of seed 0's parent snapshots `xp.parent_curve`
    permuted by its own importance and elastified with `xp.parent_curve_train` (in
    `out_dir`/parent_curve/step{S}, resumable), then the parent, the full and the smallest nested model
    answer given the gold trace. `main` {"steps", "parent", "full", "small"} (gold-trace scores): the main
    run's own point, used as is when its parent is that snapshot and the schedules are the same.
    Cached in curve.json (atomic) for a rerun of the same config."""
    from ..eval.accuracy import answer_texts
    from ..fileio import write_text_atomic
    from ..tasks import score_answer
    from ..train.checkpoint import load_run
    cfg, ecfg, ev = xp.model, xp.elastic, xp.eval
    cache = os.path.join(out_dir, "parent_curve", "curve.json")
    key = {"config": _config_dict(xp), "n_problems": len(eval_set)}
    if os.path.isfile(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["rows"]
    gold = [tok.encode(trace_text(p)) for p in eval_set.problems]
    tc = dataclasses.replace(xp.parent_curve_train, seed=xp.parent_curve_train.seed + xp.comparison_seed)
    sched = " + ".join(f"{st.steps} {st.name}" for st in tc.stages) + " steps"
    full, small = budget_name(max(ecfg.budgets)), budget_name(min(ecfg.budgets))
    score = lambda m, n: [score_answer(p, t) for p, t in zip(eval_set.problems,
                                                             answer_texts(m, n, eval_set, tok, ev, gold))]
    rows = []
    for steps in xp.parent_curve:
        if steps == main["steps"] and xp.parent_curve_train == xp.elastic_train:
            rows.append(gap_row(steps, main["parent"], main["full"], main["small"], sched + " (the main run)"))
            continue
        say(f"gap vs parent steps: the parent at step {steps}, elastified for {sched}")
        parent = load_run(os.path.join(out_dir, "parent"), steps)[1]
        imp = estimate_importance(parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]} for b in calib])
        teacher = permute_params(parent, cfg, imp)
        el = train_elastic(cfg, ecfg, tc, teacher, teacher, data, os.path.join(out_dir, "parent_curve", f"step{steps}"),
                           progress=xp.progress)
        widths = {budget_name(b): trained_widths(el.router_params, cfg, ecfg, b) for b in ecfg.budgets}
        nested = ElasticModel(cfg, el.params, {full: widths[full], small: widths[small]}, mode="sliced")
        par = score(ElasticModel(cfg, parent, {"parent": Widths()}, mode="sliced"), "parent")
        rows.append(gap_row(steps, par, score(nested, full), score(nested, small), sched))
    write_text_atomic(cache, json.dumps({"key": key, "rows": rows}))
    return rows



def _extra_baselines(xp: StarElasticExperiment, out_dir: str, data, teacher, widths: dict, base_train: TrainConfig,
                     seen: dict, say) -> list[dict]:
    """Seed 0's optional baselines for the family's token accounting (issue 30): each smaller size's 1x
    baseline at every `xp.baseline_lrs` learning rate (run `baseline_<n>_lr<lr>`), and each smaller size
    from random init with the parent's CE schedule for `xp.scratch_steps` steps (run `scratch_<n>`)."""
    cfg, out = xp.model, []
    frac = warmup_fraction(xp.elastic_train)
    for n, b in zip(widths, xp.elastic.budgets):
        if b >= 1.0:
            continue
        sub_cfg, sub_params = slice_params(teacher, cfg, widths[n])
        for lr in xp.baseline_lrs:
            tc = baseline_steps_config(base_train, 1.0 if xp.token_multiples else None, seen[n], frac)
            tc = dataclasses.replace(tc, optim=dataclasses.replace(tc.optim, lr=lr))
            run = f"baseline_{n.rstrip('%')}_lr{lr:g}"
            say(f"baseline {n} at lr {lr:g}: KD alone for {tc.total_steps} steps")
            res = train_kd(sub_cfg, tc, cfg, teacher, sub_params, data, os.path.join(out_dir, run), progress=xp.progress)
            out.append({"kind": "lr", "name": n, "lr": lr, "run": run, "cfg": sub_cfg, "res": res, "steps": tc.total_steps})
        if xp.scratch_steps:
            pt = xp.parent_train
            tc = dataclasses.replace(
                pt, seed=pt.seed + xp.comparison_seed, checkpoint_every=10_000, keep_checkpoints=1,
                optim=dataclasses.replace(pt.optim, warmup_steps=int(round(warmup_fraction(pt) * xp.scratch_steps))),
                stages=(dataclasses.replace(pt.stages[0], steps=xp.scratch_steps, tokens=None),))
            run = f"scratch_{n.rstrip('%')}"
            say(f"from scratch {n}: {param_count(sub_cfg):,} params, CE for {xp.scratch_steps} steps")
            res = train_lm(sub_cfg, tc, init_params(sub_cfg, jax.random.PRNGKey(xp.seed + 17)), data,
                           os.path.join(out_dir, run), progress=xp.progress)
            out.append({"kind": "scratch", "name": n, "run": run, "cfg": sub_cfg, "res": res, "steps": tc.total_steps})
    return out


class _CompileCache:
    """JAX's persistent compilation cache in `<out_dir>/jax_cache` for the run, unless the caller set one:
    the training seeds (and a resumed run) compile the same programs again, which then costs a cache
    read instead of an XLA compile. The previous settings are restored on exit."""

    KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")

    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, "jax_cache")

    def __enter__(self):
        from jax.experimental.compilation_cache import compilation_cache as cc
        self.old = {k: getattr(jax.config, k) for k in self.KEYS}
        if self.old["jax_compilation_cache_dir"] is None:
            jax.config.update("jax_compilation_cache_dir", self.dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
            cc.reset_cache()
        return self

    def __exit__(self, *exc):
        from jax.experimental.compilation_cache import compilation_cache as cc
        if self.old["jax_compilation_cache_dir"] is None:
            for k, v in self.old.items():
                jax.config.update(k, v)
            cc.reset_cache()
        return False


def run_star_elastic(xp: StarElasticExperiment, out_dir: str) -> dict:
    """Run the whole pipeline into `out_dir`; returns the results dict (also in results.json)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with _CompileCache(out_dir):
        return _run(xp, out_dir)


def _run(xp: StarElasticExperiment, out_dir: str) -> dict:
    from ..eval.evaluate import evaluate_grid
    from ..eval.report import analyze, write_report

    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    say = lambda m: _say(m, xp.progress)
    cfg, ecfg = xp.model, xp.elastic
    levels = sorted(set(xp.data.task_levels or DEFAULT_LEVELS) | set(xp.eval.levels))
    tok = TaskTokenizer.default(levels)        # only the words these levels use: fits the model's vocab
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    data = make_dataset(xp.data, cfg.vocab_size)

    stream = data.batches(xp.elastic_train.stages[0].seq_len, xp.calibration_batch_size, epoch_seed=10_000)
    calib = [next(stream) for _ in range(xp.calibration_batches)]
    fam = _train_family(xp, out_dir, data, calib, phases, say)
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
    extra = _extra_baselines(xp, out_dir, data, teacher, widths, base_train, seen, say)
    if extra:
        phases["baselines_lr_scratch"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- evaluation
    t0 = time.perf_counter()
    ev = xp.eval
    eval_set = make_eval_set(ev.seed, ev.n_problems, ev.split, ev.levels, tokenizer=tok)
    gold = [tok.encode(trace_text(p)) for p in eval_set.problems]
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
    nested_model = ElasticModel(cfg, el.params, widths, mode="sliced")
    parent_model = ElasticModel(cfg, parent, {"parent": Widths()}, mode="sliced")
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
        bm = ElasticModel(sub_cfg, res.params, {n: Widths()}, mode="masked")
        headline = baselines.get(n, (None, None))[1] is res
        row = {"name": n, "params": param_count(sub_cfg), "active_params": param_count(sub_cfg, active=True),
               "train_tokens": item["train_tokens"], "multiple": item["multiple"], "run": item["run"],
               "steps": item["steps"], "warmup_steps": item["warmup_steps"],
               **model_row(bm, n, eval_set, tok, ev, gold, diagnostics=headline)}
        sweep_rows.append(row)
        if headline:
            base_rows.append(row)
    extra_rows = [{"kind": e["kind"], "name": e["name"], "lr": e.get("lr"), "run": e["run"],
                   "train_tokens": int(e["res"].tokens_seen), "steps": e["steps"],
                   **model_row(ElasticModel(e["cfg"], e["res"].params, {e["name"]: Widths()}, mode="masked"), e["name"],
                               eval_set, tok, ev, gold, diagnostics=False)} for e in extra]
    phases["eval_models"] = time.perf_counter() - t0
    # ---------------------------------------------------------------- training seeds 1..seeds-1 (issue 30)
    seed_runs = [_seed_rows(xp, k, out_dir, data, calib, eval_set, tok, gold, phases, say) for k in range(1, xp.seeds)]
    rules += [r["parent_rule"] for r in seed_runs if r.get("parent_rule")]
    t0 = time.perf_counter()
    main_point = {"steps": parent_res.steps if fam["rule"] is None else fam["rule"]["step"],
                  "parent": parent_row["scores_gold_trace"], "full": nested_rows[0]["scores_gold_trace"],
                  "small": nested_rows[-1]["scores_gold_trace"]}
    curve = _parent_curve(xp, out_dir, data, calib, eval_set, tok, say, main_point) if xp.parent_curve else []
    if curve:
        phases["parent_curve"] = time.perf_counter() - t0

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
        "config": _config_dict(xp),
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
                     "histories": {"parent": _history(os.path.join(out_dir, "parent")),
                                   "elastic": _history(os.path.join(out_dir, "elastic")),
                                   **{f"baseline {n}": _history(os.path.join(out_dir, f"baseline_{n.rstrip('%')}"))
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
                  "nested accuracy is measured on the zero-shot sliced copies (masked == sliced)",
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


def _config_dict(xp: StarElasticExperiment) -> dict:
    def conv(o):
        if dataclasses.is_dataclass(o):
            return {f.name: conv(getattr(o, f.name)) for f in dataclasses.fields(o)}
        if isinstance(o, (tuple, list)):
            return [conv(x) for x in o]
        if isinstance(o, float) and not np.isfinite(o):
            return str(o)
        return o
    return json.loads(json.dumps(conv(xp), default=str))

