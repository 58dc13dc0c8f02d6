"""`elastic-jax eval` and `elastic-jax report` (the lead wires `add_cli` into elastic_jax/cli.py).

    elastic-jax eval RUN_OR_CHECKPOINT [--out DIR] [--budgets 8,16,24,32] [--n 200] [--transplant 50%:100%]
        loads a nested checkpoint (a folder with config.json, model.safetensors, budgets.json, or a
        run folder holding checkpoints/nested), measures every nested model's accuracy and the
        budget-control grid, writes report.md / results.json / PNG plots into --out.
    elastic-jax report RUN_DIR_OR_RESULTS_JSON [--out DIR]
        redraws report.md and the plots from results.json.
"""
from __future__ import annotations

import argparse
import os


def _nested_dir(path: str) -> str:
    from ..infer.checkpoint import check_not_legacy
    for cand in (path, os.path.join(path, "checkpoints", "nested"), os.path.join(path, "nested")):
        check_not_legacy(cand)
        if os.path.isfile(os.path.join(cand, "elastic_budgets.json")):
            return cand
    raise ValueError(f"{path!r} holds no nested checkpoint (an HF folder with elastic_budgets.json), "
                     "neither directly nor under checkpoints/nested")


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"thinking budgets must be positive ints, got {text!r}")
    return vals


def run_eval(path: str, out: str | None = None, thinking_budgets=(8, 16, 24, 32), n_problems: int = 200,
             split: str = "test", seed: int = 1234, transplant=(), mode: str = "sliced") -> dict:
    """Evaluate a saved nested checkpoint: per-submodel accuracy (full thinking / none) and the
    budget-control grid. Returns the results dict written to `out`."""
    import numpy as np

    from ..elastic import param_count
    from ..infer.budget import ElasticModel
    from ..infer.checkpoint import load_nested, widths_to_dict
    from ..tasks import TaskTokenizer, make_eval_set, trace_text
    from .accuracy import model_row
    from .config import EvalConfig
    from .evaluate import evaluate_grid
    from .latency import LatencyTarget
    from .report import check_writer, analyze, write_report

    d = _nested_dir(path)
    out = out or os.path.join(os.path.dirname(os.path.abspath(d)), "eval")
    check_writer(out, "eval")         # before the work: never replace another job's results
    cfg, params, budgets, fractions = load_nested(d)
    tok_path = os.path.join(d, "tokenizer.json")
    tok = TaskTokenizer.load(tok_path) if os.path.isfile(tok_path) else TaskTokenizer.default()
    model = ElasticModel(cfg, params, budgets, mode=mode)
    for a, b in transplant:
        model.check_name(a)
        model.check_name(b)
    ev = EvalConfig(n_problems=n_problems, split=split, seed=seed, thinking_budgets=tuple(thinking_budgets),
                    full_thinking=max(32, max(thinking_budgets)))
    eval_set = make_eval_set(ev.seed, ev.n_problems, ev.split, ev.levels, tokenizer=tok)
    gold = [tok.encode(trace_text(p)) for p in eval_set.problems]
    nested = [{"name": n, "fraction": fractions.get(n), "widths": widths_to_dict(w), "params": param_count(cfg, w),
               "active_params": param_count(cfg, w, True), **model_row(model, n, eval_set, tok, ev, gold)}
              for n, w in budgets.items()]
    target = LatencyTarget.make(ev.latency_profile, ev.latency_reference)
    grid = evaluate_grid(model, eval_set, tok, ev.thinking_budgets, transplant_pairs=tuple(transplant),
                         max_answer_tokens=ev.max_answer_tokens, max_thinking=ev.full_thinking,
                         latency_targets=[target], primary=target.key, gold_traces=gold)
    results = {"title": f"elastic-jax eval of {os.path.abspath(d)}", "nested": nested,
               "latency": {"primary": target.key, "batch": 1,
                           "targets": {target.key: {"description": target.describe(), **target.profile.to_dict()}}},
               "grid": [p.to_dict() for p in grid], "grid_budgets": list(ev.thinking_budgets),
               "eval": {"n_problems": len(eval_set), "split": split, "levels": list(ev.levels),
                        "max_trace_tokens": int(max(eval_set.trace_lengths)),
                        "mean_trace_tokens": float(np.mean(eval_set.trace_lengths))}}
    results["analysis"] = analyze(results)
    write_report(results, out, writer="eval")
    return results


def _eval_cmd(args) -> int:
    transplant = []
    for t in args.transplant:
        if ":" not in t:
            raise SystemExit(f"--transplant expects THINK:ANSWER budget names (e.g. 50%:100%), got {t!r}")
        transplant.append(tuple(t.split(":", 1)))
    # expected failures (ValueError / OSError) become one `error:` line in elastic_jax/cli.py
    run_eval(args.checkpoint, args.out, args.budgets, args.n, args.split, args.seed, transplant, args.mode)
    print(f"elastic-jax eval: wrote {os.path.abspath(args.out) if args.out else 'the eval folder'}")
    return 0


def _report_cmd(args) -> int:
    from .report import load_results, write_report
    from ..errors import JSONFileError
    results = load_results(args.results)
    src = args.results if os.path.isdir(args.results) else os.path.dirname(os.path.abspath(args.results))
    try:       # the analysis and the markdown are computed before anything is written
        paths = write_report(results, args.out or src)
    except (KeyError, TypeError, IndexError) as e:
        raise JSONFileError(f"{os.path.join(src, 'results.json') if os.path.isdir(args.results) else args.results}: "
                            f"a field the report needs is missing or of the wrong type "
                            f"({type(e).__name__}: {e})") from None
    print(f"elastic-jax report: wrote {paths['report.md']}")
    return 0


def add_cli(subparsers) -> None:
    """Register `eval` and `report` on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate a nested checkpoint: accuracy per budget + budget-control grid")
    p.add_argument("checkpoint", help="nested checkpoint folder, or a run folder holding checkpoints/nested")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint parent>/eval)")
    p.add_argument("--budgets", type=_ints, default=(8, 16, 24, 32), help="thinking budgets, e.g. 8,16,24,32")
    p.add_argument("--n", type=int, default=200, help="number of held-out problems")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--transplant", action="append", default=[], metavar="THINK:ANSWER",
                   help="also run the cache-transplant experiment for this pair (repeatable)")
    p.add_argument("--mode", default="sliced", choices=("sliced", "masked"),
                   help="run submodels as sliced copies (fast) or masked views of the one parameter set")
    p.set_defaults(func=_eval_cmd)
    r = subparsers.add_parser("report", help="redraw report.md and the plots from results.json")
    r.add_argument("results", help="results.json or the run folder holding it")
    r.add_argument("--out", default=None, help="output folder (default: next to results.json)")
    r.set_defaults(func=_report_cmd)
