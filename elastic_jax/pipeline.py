"""The main job: a complete Star Elastic run on the embedded reasoning task (spec §1, §9, §11).

    parent (CE on the task, or loaded from <out>/parent when its run is complete)
      -> importance + permutation (spec §3)
      -> Star Elastic distillation into the budgets, two-stage curriculum (spec §6-7)
      -> router argmax per budget -> Widths -> one nested checkpoint + sliced copies (spec §8)
      -> independent baselines: the permuted parent pruned to each budget's widths, distilled alone
      -> accuracy per model; budget-control grid (every think/answer pair x thinking budgets) and
         the truncation baseline (spec §9); report.md, results.json, PNG plots.

`StarElasticExperiment` is the frozen config; `experiments/tiny_star_elastic.py` only builds it.
`run_star_elastic(config, out_dir)` is registered with `elastic_jax.experiment.register_runner`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from .config import NemotronHConfig
from .data import DataConfig, make_dataset
from .elastic import ElasticConfig, budget_widths, estimate_importance, param_count, permute_params, slice_params
from .experiment import register_runner
from .infer.budget import ElasticModel, Specials, answer_generate
from .infer.checkpoint import save_nested, save_standalone, widths_to_dict
from .model import init_params
from .tasks import TaskTokenizer, check_answer, make_eval_set
from .train import TrainConfig, train_elastic, train_kd, train_lm
from .train.metrics import read_jsonl
from .widths import Widths


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: `n_problems` held-out problems of `split`; the grid's `thinking_budgets`
    (tokens); cache-transplant pairs (think, answer) by budget fraction; `repeats` timed runs."""

    n_problems: int = 200
    split: str = "test"
    seed: int = 1234
    levels: tuple[int, ...] = (1, 2, 3, 4)
    thinking_budgets: tuple[int, ...] = (8, 16, 24, 32)
    full_thinking: int = 32                    # "no truncation": >= the longest trace (30 tokens); also the
                                               # grid's decode capacity, so both share compiled programs
    max_answer_tokens: int = 6
    transplant_pairs: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.75, 1.0))
    batch_size: int | None = None              # None: the whole eval set in one batch
    repeats: int = 1

    def __post_init__(self):
        if self.n_problems <= 0:
            raise ValueError(f"EvalConfig.n_problems={self.n_problems}: must be > 0")
        if not self.thinking_budgets or min(self.thinking_budgets) <= 0:
            raise ValueError(f"EvalConfig.thinking_budgets={self.thinking_budgets}: must be positive token counts")
        if self.full_thinking < max(self.thinking_budgets):
            raise ValueError(f"EvalConfig.full_thinking={self.full_thinking}: must be >= the largest thinking budget")
        for name in ("levels", "thinking_budgets", "transplant_pairs"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, list) else x for x in v))


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

    def __post_init__(self):
        if self.data.kind != "task":
            raise ValueError(f"StarElasticExperiment.data.kind={self.data.kind!r}: the main job trains on the "
                             "embedded reasoning task (kind='task')")
        tok = TaskTokenizer.default()
        if self.model.vocab_size < tok.vocab_size:
            raise ValueError(f"StarElasticExperiment.model.vocab_size={self.model.vocab_size}: must be >= the task "
                             f"tokenizer's {tok.vocab_size}")
        if self.calibration_batches <= 0:
            raise ValueError(f"StarElasticExperiment.calibration_batches={self.calibration_batches}: must be > 0")


def budget_name(fraction: float) -> str:
    return f"{round(100 * fraction):d}%"


def _accuracy(model: ElasticModel, name: str, eval_set, tok: TaskTokenizer, ecfg: EvalConfig, thinking: bool):
    """Accuracy of one submodel with full thinking (`thinking`) or none (answer right after `</think>`)."""
    from .eval.evaluate import run_point
    if thinking:
        return run_point(model, eval_set, tok, think_model=name, answer_model=name,
                         thinking_budget=ecfg.full_thinking, max_thinking=ecfg.full_thinking,
                         max_answer_tokens=ecfg.max_answer_tokens, batch_size=ecfg.batch_size, warmup=False).accuracy
    sp = Specials.from_tokenizer(tok)
    prompts = [list(p) + [tok.end_think_id] for p in eval_set.prompts]
    cache_len = eval_set.max_prompt_len + ecfg.full_thinking + 1 + ecfg.max_answer_tokens   # = budget_generate's
    ans, _ = answer_generate(model, prompts, submodel=name, specials=sp, max_answer_tokens=ecfg.max_answer_tokens,
                             cache_len=cache_len)
    return float(np.mean([check_answer(p, tok.decode(a)) for p, a in zip(eval_set.problems, ans)]))


def _history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    keep = ("step", "stage", "loss", "task", "tokens_seen")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("task_budget_")} for r in read_jsonl(path)] \
        if os.path.isfile(path) else []


def _say(msg: str, progress: bool):
    if progress:
        print(f"[star-elastic] {msg}", flush=True)


def run_star_elastic(xp: StarElasticExperiment, out_dir: str) -> dict:
    """Run the whole pipeline into `out_dir`; returns the results dict (also in results.json)."""
    from .eval.evaluate import evaluate_grid
    from .eval.report import analyze, write_report

    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    say = lambda m: _say(m, xp.progress)
    cfg, ecfg = xp.model, xp.elastic
    tok = TaskTokenizer.default()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    data = make_dataset(xp.data, cfg.vocab_size)

    # ---------------------------------------------------------------- parent
    t0 = time.perf_counter()
    say(f"parent: {param_count(cfg):,} params ({param_count(cfg, active=True):,} active), pattern {cfg.pattern}")
    parent0 = init_params(cfg, jax.random.PRNGKey(xp.seed))
    parent_res = train_lm(cfg, xp.parent_train, parent0, data, os.path.join(out_dir, "parent"), progress=xp.progress)
    parent = parent_res.params
    phases["parent"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- importance + permutation
    t0 = time.perf_counter()
    stream = data.batches(xp.elastic_train.stages[0].seq_len, xp.calibration_batch_size, epoch_seed=10_000)
    calib = [next(stream) for _ in range(xp.calibration_batches)]
    importance = estimate_importance(parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]}
                                                   for b in calib])
    teacher = permute_params(parent, cfg, importance)
    phases["importance"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- elastic distillation
    t0 = time.perf_counter()
    say(f"elastic distillation into budgets {ecfg.budgets}")
    el = train_elastic(cfg, ecfg, xp.elastic_train, teacher, teacher, data, os.path.join(out_dir, "elastic"),
                       progress=xp.progress)
    phases["elastic"] = time.perf_counter() - t0
    names = [budget_name(b) for b in ecfg.budgets]
    widths = {n: budget_widths(el.router_params, cfg, ecfg, b) for n, b in zip(names, ecfg.budgets)}
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
    baselines = {}
    for n, b in zip(names, ecfg.budgets):
        if b >= 1.0:
            continue          # the full-size "independent model" is the parent itself
        sub_cfg, sub_params = slice_params(teacher, cfg, widths[n])
        say(f"baseline {n}: prune the parent to {param_count(sub_cfg):,} params by importance, then KD alone")
        res = train_kd(sub_cfg, base_train, cfg, teacher, sub_params, data,
                       os.path.join(out_dir, f"baseline_{n.rstrip('%')}"), progress=xp.progress)
        baselines[n] = (sub_cfg, res)
        save_standalone(os.path.join(ck, f"baseline_{n.rstrip('%')}"), sub_cfg, res.params)
    phases["baselines"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- evaluation
    t0 = time.perf_counter()
    ev = xp.eval
    eval_set = make_eval_set(ev.seed, ev.n_problems, ev.split, ev.levels, tokenizer=tok)
    nested_model = ElasticModel(cfg, el.params, widths, mode="sliced")
    parent_model = ElasticModel(cfg, parent, {"parent": Widths()}, mode="sliced")
    say("evaluating the parent, nested models and baselines")
    parent_row = {"name": "parent", "params": param_count(cfg), "active_params": param_count(cfg, active=True),
                  "accuracy": _accuracy(parent_model, "parent", eval_set, tok, ev, True),
                  "accuracy_no_thinking": _accuracy(parent_model, "parent", eval_set, tok, ev, False)}
    nested_rows = []
    for n in names:
        nested_rows.append({"name": n, "fraction": fractions[n], "widths": widths_to_dict(widths[n]),
                            "params": param_count(cfg, widths[n]), "active_params": param_count(cfg, widths[n], True),
                            "accuracy": _accuracy(nested_model, n, eval_set, tok, ev, True),
                            "accuracy_no_thinking": _accuracy(nested_model, n, eval_set, tok, ev, False)})
    base_rows = []
    for n, (sub_cfg, res) in baselines.items():
        bm = ElasticModel(sub_cfg, res.params, {n: Widths()}, mode="masked")
        base_rows.append({"name": n, "params": param_count(sub_cfg), "active_params": param_count(sub_cfg, active=True),
                          "accuracy": _accuracy(bm, n, eval_set, tok, ev, True),
                          "accuracy_no_thinking": _accuracy(bm, n, eval_set, tok, ev, False),
                          "train_tokens": int(res.tokens_seen)})
    phases["eval_models"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"budget-control grid: {len(names)}x{len(names)} pairs x thinking budgets {list(ev.thinking_budgets)}")
    by_frac = {b: n for n, b in fractions.items()}
    tp = [(by_frac[a], by_frac[b]) for a, b in ev.transplant_pairs if a in by_frac and b in by_frac]
    grid = evaluate_grid(nested_model, eval_set, tok, ev.thinking_budgets, transplant_pairs=tp,
                         max_answer_tokens=ev.max_answer_tokens, batch_size=ev.batch_size, repeats=ev.repeats,
                         max_thinking=ev.full_thinking)
    phases["grid"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- report
    results = {
        "title": xp.title,
        "config": _config_dict(xp),
        "eval": {"n_problems": len(eval_set), "split": ev.split, "levels": list(ev.levels),
                 "max_trace_tokens": int(max(eval_set.trace_lengths)),
                 "mean_trace_tokens": float(np.mean(eval_set.trace_lengths))},
        "parent": parent_row, "nested": nested_rows, "baselines": base_rows,
        "training": {"parent_tokens": int(parent_res.tokens_seen), "elastic_tokens": int(el.tokens_seen),
                     "baseline_tokens": {n: int(r.tokens_seen) for n, (_, r) in baselines.items()},
                     "histories": {"parent": _history(os.path.join(out_dir, "parent")),
                                   "elastic": _history(os.path.join(out_dir, "elastic")),
                                   **{f"baseline {n}": _history(os.path.join(out_dir, f"baseline_{n.rstrip('%')}"))
                                      for n in baselines}}},
        "memory": {"nested_checkpoint_bytes": int(nested_files["model.safetensors"] + nested_files.get(
                       "router.safetensors", 0)),
                   "separate_checkpoint_bytes": int(sum(sliced_bytes.values())),
                   "files": {"nested model.safetensors": nested_files["model.safetensors"],
                             "nested router.safetensors": nested_files.get("router.safetensors", 0),
                             **{f"separate {n}": v for n, v in sliced_bytes.items()}}},
        "grid": [p.to_dict() for p in grid],
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
                  "latency is wall-clock on this machine's CPU(s); compile time excluded (one warmup per "
                  "compiled shape)"],
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


register_runner(StarElasticExperiment, run_star_elastic)
