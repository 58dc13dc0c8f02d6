"""Quick check of whether a task config can test the per-phase claim, without the whole main job:
train the parent and the elastic run of an experiment, then print per model the accuracy, the
exact-trace rate and the answer accuracy given the gold trace (per level), and the full-minus-
smallest gold-trace gap with its 95% bootstrap interval (the verdict's inputs, eval/report.py).

    python experiments/diagnose_task.py OUT [--experiment experiments/tiny_star_elastic.py]
        [--task recurrence|combine|sum|query] [--pattern M*EM*E] [--parent-steps N] [--levels 13,14]
        [--n-eval 200] [--seed 0]

Rerun with the same OUT to reuse the trained runs (they resume).
"""
import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from elastic_jax.data import make_dataset
from elastic_jax.elastic import budget_widths, estimate_importance, permute_params
from elastic_jax.eval.stats import bootstrap_diff_ci
from elastic_jax.experiment import load_experiment
from elastic_jax.infer.budget import ElasticModel
from elastic_jax.model import init_params
from elastic_jax.eval.accuracy import model_row as _model_row
from elastic_jax.recipes.family import budget_name
from elastic_jax.tasks import TaskTokenizer, make_eval_set, trace_text
from elastic_jax.train import train_elastic, train_lm
from elastic_jax.widths import Widths

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--experiment", default=os.path.join(HERE, "tiny_star_elastic.py"))
    ap.add_argument("--parent-steps", type=int, default=None)
    ap.add_argument("--levels", default=None, help="training levels, e.g. 5,6,7,8 (default: the experiment's)")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--task", default=None,
                    help="the experiment's task (tiny_star_elastic.py: sum | query | recurrence | combine)")
    ap.add_argument("--seed", type=int, default=0, help="added to the model, data, parent and elastic seeds (a "
                    "repeat of the whole run)")
    ap.add_argument("--pattern", default=None, help="the parent's hybrid_override_pattern, e.g. M*EM*E")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    xp = load_experiment(a.experiment, **({"task": a.task} if a.task else {}))
    if a.pattern:
        xp = dataclasses.replace(xp, model=dataclasses.replace(xp.model, hybrid_override_pattern=a.pattern))
    if a.parent_steps:
        st = dataclasses.replace(xp.parent_train.stages[0], steps=a.parent_steps)
        xp = dataclasses.replace(xp, parent_train=dataclasses.replace(xp.parent_train, stages=(st,)))
    if a.seed:
        xp = dataclasses.replace(
            xp, seed=xp.seed + a.seed, data=dataclasses.replace(xp.data, seed=xp.data.seed + a.seed),
            parent_train=dataclasses.replace(xp.parent_train, seed=xp.parent_train.seed + a.seed),
            elastic_train=dataclasses.replace(xp.elastic_train, seed=xp.elastic_train.seed + a.seed))
    if a.levels:
        levels = tuple(int(c) for c in a.levels.split(","))
        xp = dataclasses.replace(xp, data=dataclasses.replace(xp.data, task_levels=levels))
    cfg, ecfg, ev = xp.model, xp.elastic, dataclasses.replace(xp.eval, n_problems=a.n_eval, grid_problems=None)
    tok = TaskTokenizer.default()
    data = make_dataset(xp.data, cfg.vocab_size)
    t0 = time.perf_counter()
    parent = train_lm(cfg, xp.parent_train, init_params(cfg, jax.random.PRNGKey(xp.seed)), data,
                      os.path.join(out, "parent"), progress=False).params
    print(f"parent trained: {time.perf_counter() - t0:.0f} s", flush=True)
    stream = data.batches(xp.elastic_train.stages[0].seq_len, xp.calibration_batch_size, epoch_seed=10_000)
    calib = [next(stream) for _ in range(xp.calibration_batches)]
    teacher = permute_params(parent, cfg, estimate_importance(
        parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]} for b in calib]))
    el = train_elastic(cfg, ecfg, xp.elastic_train, teacher, teacher, data, os.path.join(out, "elastic"),
                       progress=False)
    print(f"elastic trained: {time.perf_counter() - t0:.0f} s", flush=True)
    names = [budget_name(b) for b in ecfg.budgets]
    widths = {n: budget_widths(el.router_params, cfg, ecfg, b) for n, b in zip(names, ecfg.budgets)}
    es = make_eval_set(ev.seed, ev.n_problems, ev.split, ev.levels, tokenizer=tok)
    gold = [tok.encode(trace_text(p)) for p in es.problems]
    rows = {"parent": _model_row(ElasticModel(cfg, parent, {"parent": Widths()}, mode="sliced"), "parent", es, tok,
                                 ev, gold)}
    nested = ElasticModel(cfg, el.params, widths, mode="sliced")
    rows.update({n: _model_row(nested, n, es, tok, ev, gold) for n in names})
    level = np.asarray([p.difficulty for p in es.problems])
    print("| model | accuracy | exact trace | given gold trace | no thinking | given gold trace per level |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        g = np.asarray(r["scores_gold_trace"])
        per = " ".join(f"{l}: {g[level == l].mean():.2f}" for l in sorted(set(level.tolist())))
        print(f"| {n} | {r['accuracy']:.3f} | {r['exact_trace']:.3f} | {r['accuracy_gold_trace']:.3f} | "
              f"{r['accuracy_no_thinking']:.3f} | {per} |")
    full, small = rows[names[0]], rows[names[-1]]
    lo, hi = bootstrap_diff_ci(full["scores_gold_trace"], small["scores_gold_trace"])
    print(f"gold-trace answer gap {names[0]} - {names[-1]}: "
          f"{full['accuracy_gold_trace'] - small['accuracy_gold_trace']:+.3f} [{lo:+.3f}, {hi:+.3f}]; "
          f"exact-trace gap {full['exact_trace'] - small['exact_trace']:+.3f}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
