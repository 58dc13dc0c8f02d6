"""Several training seeds of one experiment, read together (issue 30): every interval resamples seeds
and problems (`stats.hierarchical_ci`), so seed-to-seed variation (the parent's, the elastic run's and
the baselines') is inside it, and the verdict's answer gap is judged on the seeds' intervals.

    python experiments/seeds_report.py RUN_DIR [RUN_DIR ...]     # each a finished main-job run

A seed run is the main job with its seeds moved, e.g. `elastic-jax run experiments/tiny_star_elastic.py
--out runs/s1 --set seed=1 --set parent_train.seed=1 --set comparison_seed=1` (the eval problems and
the training documents stay the same, so per-problem scores pair across seeds).
"""
from __future__ import annotations

import numpy as np

from .config import VERDICT_MAX_TRACE_GAP, VERDICT_MIN_ANSWER_GAP
from .stats import hierarchical_ci, hierarchical_diff_ci


def _rows(results: dict) -> dict:
    out = {}
    if results.get("parent"):
        out["parent"] = results["parent"]
    for r in results.get("nested", []):
        out[f"nested {r['name']}"] = r
    for r in results.get("baselines", []):
        out[f"baseline {r['name']}"] = r
    return out


def combine_seeds(runs: list[dict]) -> dict:
    """`runs`: the results dicts of one experiment at different seeds (same eval problems). Returns
    per model the accuracy (full thinking) and gold-trace accuracy with seeds x problems intervals,
    the nested-minus-baseline differences, and the verdict's answer gap over seeds."""
    if not runs:
        raise ValueError("combine_seeds: no runs")
    n = {len(r.get("parent", {}).get("scores") or []) for r in runs}
    if len(n) != 1:
        raise ValueError(f"combine_seeds: the runs were evaluated on different numbers of problems {sorted(n)}")
    rows = [_rows(r) for r in runs]
    names = [k for k in rows[0] if all(k in r for r in rows)]
    models = {}
    for k in names:
        m = {}
        for key in ("scores", "scores_gold_trace"):
            if all(r[k].get(key) for r in rows):
                m[key] = hierarchical_ci([r[k][key] for r in rows])
        models[k] = m
    out = {"seeds": len(runs), "models": models}
    diffs = {}
    for k in names:
        if k.startswith("nested ") and f"baseline {k[7:]}" in names and "scores" in models[k]:
            diffs[k[7:]] = hierarchical_diff_ci([r[k]["scores"] for r in rows],
                                                [r[f"baseline {k[7:]}"]["scores"] for r in rows])
    out["nested_minus_baseline"] = diffs
    nested = [k for k in names if k.startswith("nested ") and "scores_gold_trace" in models[k]]
    if len(nested) >= 2:
        full, small = nested[0], nested[-1]
        gap = hierarchical_diff_ci([r[full]["scores_gold_trace"] for r in rows],
                                   [r[small]["scores_gold_trace"] for r in rows])
        trace = float(np.mean([(r[full].get("exact_trace") or 0.0) - (r[small].get("exact_trace") or 0.0)
                               for r in rows]))
        out["verdict"] = {"answer_gap": gap, "trace_gap": trace, "full": full, "smallest": small,
                          "testable": bool(gap["ci"][0] >= VERDICT_MIN_ANSWER_GAP
                                           and trace <= VERDICT_MAX_TRACE_GAP * gap["mean"])}
    return out


def seed_runs(results: dict) -> list[dict]:
    """The results of every training seed of one main-job run: seed 0 (the run itself) and the rows of
    seeds 1.. (`results["seed_runs"]`, recipes/star_elastic.py)."""
    return [results] + list(results.get("seed_runs") or [])


def analyze_seeds(results: dict) -> dict:
    """For `report.analyze`: with >= 2 seeds in the run, {"seeds": combine_seeds(...), "verdict": the
    verdict judged on the seeds x problems interval (the report's headline), "verdict_seed0": the one
    seed's}; otherwise {}."""
    runs = seed_runs(results)
    if len(runs) < 2:
        return {}
    combined = combine_seeds(runs)
    out = {"seeds": combined}
    v = combined.get("verdict")
    if v:
        g = v["answer_gap"]
        lo, hi = g["ci"]
        S = combined["seeds"]
        if v["testable"]:
            reason = (f"over {S} training seeds the {v['smallest']} model answers worse than the {v['full']} model "
                      f"given the gold trace ({g['mean']:+.3f}, 95% CI over seeds x problems [{lo:+.3f}, {hi:+.3f}]) "
                      f"while it writes the trace about as well (mean exact-trace gap {v['trace_gap']:+.3f})")
        elif lo < VERDICT_MIN_ANSWER_GAP:
            reason = (f"no clear answer-capacity gap over {S} training seeds: given the gold trace the {v['full']} "
                      f"model beats the {v['smallest']} model by {g['mean']:+.3f} (95% CI over seeds x problems "
                      f"[{lo:+.3f}, {hi:+.3f}]; needs a lower bound >= {VERDICT_MIN_ANSWER_GAP})")
        else:
            reason = (f"the trace-quality gap ({v['trace_gap']:+.3f} mean exact-trace rate over {S} seeds) is not "
                      f"small next to the answer gap ({g['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}])")
        out["verdict"] = {"testable": v["testable"], "reason": reason + "; a property of the models this run "
                          "trained, not of the task at convergence", "answer_gap": g["mean"], "answer_gap_ci": [lo, hi],
                          "trace_gap": v["trace_gap"], "full": v["full"], "smallest": v["smallest"], "seeds": S,
                          "per_seed": g["seed_means"]}
    return out


def seeds_section(analysis: dict) -> list[str]:
    """The report's section (markdown lines) of `analyze_seeds`; [] without seeds."""
    combined = analysis.get("seeds")
    if not combined:
        return []
    L = seeds_markdown(combined, heading="##").splitlines()
    g = (combined.get("verdict") or {}).get("answer_gap")
    if g and g.get("se"):
        share = min(1.0, (g["se_problems"] / g["se"]) ** 2)
        L += [f"Power: of the verdict gap's standard error {g['se']:.3f}, the eval problems alone account for "
              f"{100 * share:.0f}% of the variance (SE {g['se_problems']:.3f}); the rest is seed-to-seed variation, "
              f"which more problems per seed cannot shrink. The single-seed tables below are seed 0's; their "
              "intervals resample problems only.", ""]
    return L


def seeds_markdown(combined: dict, heading: str = "#") -> str:
    S = combined["seeds"]
    L = [f"{heading} Seeds x problems: {S} training seed(s)", "",
         "Intervals: 95%, hierarchical bootstrap over seeds, then problems within seed (eval/stats.py "
         "`hierarchical_ci`: mean ± t_{S-1}·SE)" + ("; with one seed the interval leaves seed variation out"
                                                   if S == 1 else "") + ".", "",
         "| model | accuracy [95% CI] | per-seed | gold-trace accuracy [95% CI] | per-seed |", "|---|---|---|---|---|"]
    f = lambda c: "n/a" if c is None else f"{c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
    s = lambda c: "n/a" if c is None else ", ".join(f"{v:.3f}" for v in c["seed_means"])
    for k, m in combined["models"].items():
        a, g = m.get("scores"), m.get("scores_gold_trace")
        L.append(f"| {k} | {f(a)} | {s(a)} | {f(g)} | {s(g)} |")
    L.append("")
    if combined.get("nested_minus_baseline"):
        L += ["| size | nested - baseline [95% CI] | per-seed |", "|---|---|---|"]
        L += [f"| {k} | {f(d)} | {s(d)} |" for k, d in combined["nested_minus_baseline"].items()]
        L.append("")
    v = combined.get("verdict")
    if v:
        g = v["answer_gap"]
        L += [f"Gold-trace answer gap {v['full']} - {v['smallest']}: **{g['mean']:+.3f} [{g['ci'][0]:+.3f}, "
              f"{g['ci'][1]:+.3f}]** over {S} seed(s) (per seed: {s(g)}); mean exact-trace gap {v['trace_gap']:+.3f}. "
              f"**Verdict over seeds: {'CAN' if v['testable'] else 'CANNOT'}** (the bar: lower bound >= "
              f"{VERDICT_MIN_ANSWER_GAP}, trace gap <= {VERDICT_MAX_TRACE_GAP} x the answer gap). A property of the "
              "models these runs trained, not of the task at convergence.", ""]
    return "\n".join(L)
