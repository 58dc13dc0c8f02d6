"""The run report: `results.json` -> `report.md` + PNG plots (matplotlib, Agg backend; the plots
are drawn by `report_plots.py`).

`write_report(results, out_dir)` is pure in `results` (a JSON-able dict, schema below), so
`elastic-jax report RUN_DIR` can redraw everything from a saved `results.json`.

results = {
  "title": str, "config": {...}, "timing": {"total_s": float, "phases": {name: seconds}},
  "parent": {"name", "params", "active_params", "accuracy", "accuracy_no_thinking"},
  "nested": [{"name", "fraction", "widths", "params", "active_params", "accuracy",
              "accuracy_no_thinking"}],
  "baselines": [{"name", "params", "active_params", "accuracy", "accuracy_no_thinking", "train_tokens"}],
  "training": {"parent_tokens", "elastic_tokens", "baseline_tokens": {name: int},
               "histories": {run: [{"step", "loss", ...}]}},
  "memory": {"nested_checkpoint_bytes", "separate_checkpoint_bytes", "files": {name: bytes}},
  "grid": [GridPoint.to_dict()], "grid_budgets": [int], "eval": {"n_problems", "split", ...},
}
"""
from __future__ import annotations

import json
import os

import numpy as np

from .config import VERDICT_MAX_TRACE_GAP, VERDICT_MIN_ANSWER_GAP
from .evaluate import SCHEMES, TRUNCATION_SCHEMES, dominance, latency_key, pareto_front
from .family import family_markdown, family_tokens
from .parent_curve import parent_curve_markdown
from .quantized import quant_markdown
from .report_plots import plot_accuracy, plot_pareto, plot_training
from .rigor import analyze_rigor, rigor_markdown
from .seeds import analyze_seeds, seeds_section
from .stats import bootstrap_ci, bootstrap_diff_ci, half_width, problems_needed, simultaneous_diff_ci

PLOTS = ("pareto.png", "training_curves.png", "accuracy_per_budget.png")




def _ci(scores):
    return list(bootstrap_ci(scores)) if scores else None


def point_key(p: dict) -> str:
    """A grid point's key in `analysis["point_ci"]`: its scheme and label (budget control and
    transplant share labels such as `50%->100%@8`), `(parent)` for the parent's family."""
    return f"{p['scheme']} {p['label']}" + ("" if p.get("family", "nested") == "nested" else " (parent)")


def verdict(results: dict) -> dict:
    """Can this task test the per-phase claim? It needs a clear answer-capacity gap between the
    smallest nested model and the full one given the gold trace, and a smaller trace-quality gap
    (exact-trace rate), so that a small thinker + a large answerer has something to gain."""
    nested = [n for n in results.get("nested", []) if n.get("scores_gold_trace")]
    if len(nested) < 2:
        return {"testable": False, "reason": "no gold-trace diagnostics recorded"}
    full, small = nested[0], nested[-1]
    ans_gap = full["accuracy_gold_trace"] - small["accuracy_gold_trace"]
    lo, hi = bootstrap_diff_ci(full["scores_gold_trace"], small["scores_gold_trace"])
    trace_gap = (full.get("exact_trace") or 0.0) - (small.get("exact_trace") or 0.0)
    testable = bool(lo >= VERDICT_MIN_ANSWER_GAP and trace_gap <= VERDICT_MAX_TRACE_GAP * ans_gap)
    if testable:
        reason = (f"the {small['name']} model answers worse than the {full['name']} model given the gold trace "
                  f"({ans_gap:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]) while it writes the trace about as well "
                  f"(exact-trace gap {trace_gap:+.3f}): small-thinks / large-answers can help")
    elif lo < VERDICT_MIN_ANSWER_GAP:
        reason = (f"no clear answer-capacity gap: given the gold trace the {full['name']} model beats the "
                  f"{small['name']} model by {ans_gap:+.3f} (95% CI [{lo:+.3f}, {hi:+.3f}]; needs a lower bound >= "
                  f"{VERDICT_MIN_ANSWER_GAP}), so handing the answer to the larger model cannot gain accuracy")
    else:
        reason = (f"the trace-quality gap ({trace_gap:+.3f} exact-trace rate) is not small next to the answer "
                  f"gap ({ans_gap:+.3f}): thinking with the small model loses as much as answering with the "
                  "large one gains")
    return {"testable": testable, "reason": reason, "answer_gap": ans_gap, "answer_gap_ci": [lo, hi],
            "trace_gap": trace_gap, "full": full["name"], "smallest": small["name"]}


def _matched(challengers, baseline, x):
    """For each baseline-frontier point, the best challenger no slower on `x`, with a paired interval
    of the accuracy difference corrected for the `k` challengers it was picked from (Bonferroni:
    `stats.simultaneous_diff_ci`; the best of k noisy points is biased up, issue 30)."""
    out = []
    for i in pareto_front(baseline, x):
        t = baseline[i]
        ok = [p for p in challengers if p[x] <= t[x]]
        best = max(ok, key=lambda p: p["accuracy"]) if ok else None
        row = {"baseline": t["label"], "baseline_accuracy": t["accuracy"], "x": t[x],
               "best": None if best is None else best["label"],
               "best_accuracy": None if best is None else best["accuracy"], "diff": None, "diff_ci": None,
               "k": len(ok)}
        if best is not None:
            row["diff"] = best["accuracy"] - t["accuracy"]
            if best.get("correct") and t.get("correct") and len(best["correct"]) == len(t["correct"]) > 1:
                row["diff_ci"] = list(simultaneous_diff_ci(best["correct"], t["correct"], len(ok)))
        out.append(row)
    return out


def tokens_to_match(nested_scores, sweep: list, multiples_key: str = "multiple", n_boot: int = 500,
                    seed: int = 0) -> dict:
    """The token multiple at which the baseline accuracy curve (linear in log multiple between the
    swept points) reaches the nested model's accuracy; interval by resampling problems (paired)."""
    pts = sorted([r for r in sweep if r.get(multiples_key) is not None and r.get("scores")],
                 key=lambda r: r[multiples_key])
    if len(pts) < 2 or not nested_scores:
        return {"multiple": None, "ci": None, "note": "needs >= 2 swept baselines with per-problem scores"}
    m = np.log(np.asarray([r[multiples_key] for r in pts], float))
    S = np.asarray([r["scores"] for r in pts], float)          # [n_points, n_problems]
    nest = np.asarray(nested_scores, float)

    def crossing(idx):
        acc = S[:, idx].mean(axis=1)
        target = nest[idx].mean()
        if acc[0] >= target:
            return -np.inf                                      # matched already at the smallest multiple
        best = np.maximum.accumulate(acc)                       # the baseline's best so far
        j = int(np.argmax(best >= target)) if (best >= target).any() else -1
        if j < 0:
            return np.inf
        a0, a1 = best[j - 1], best[j]
        f = 0.0 if a1 == a0 else (target - a0) / (a1 - a0)
        return float(m[j - 1] + f * (m[j] - m[j - 1]))

    n = len(nest)
    point = crossing(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = np.asarray([crossing(rng.integers(0, n, n)) for _ in range(n_boot)])
    lo, hi = np.quantile(boots, 0.025, method="lower"), np.quantile(boots, 0.975, method="higher")
    lo_m, hi_m = float(np.exp(m[0])), float(np.exp(m[-1]))
    fmt = lambda v: (f"<= {lo_m:g}" if v == -np.inf else f"> {hi_m:g}" if v == np.inf else float(np.exp(v)))
    return {"multiple": fmt(point), "ci": [fmt(lo), fmt(hi)], "swept": [float(np.exp(v)) for v in m],
            "baseline_accuracies": [float(a) for a in S.mean(axis=1)], "nested_accuracy": float(nest.mean())}


def analyze(results: dict) -> dict:
    """Derived numbers the report states: frontiers (primary modeled latency, wall clock, FLOPs),
    dominance with intervals, diagnostics and verdict, statistical power, token efficiency, ratios."""
    grid = results.get("grid", [])
    x = latency_key(grid)
    by = {s: [p for p in grid if p["scheme"] == s] for s in SCHEMES}
    out = {"x_axis": x, "frontiers": {s: [by[s][i]["label"] for i in pareto_front(by[s], x)] for s in SCHEMES
                                      if by[s]},
           "point_ci": {point_key(p): _ci(p["correct"]) for p in grid if p.get("correct")}}
    for base in TRUNCATION_SCHEMES:
        if by["budget_control"] and by[base]:
            suffix = "" if base == "truncation" else "_parent"
            out["budget_control_vs_truncation" + suffix] = dominance(by["budget_control"], by[base], x)
            out["truncation_vs_budget_control" + suffix] = dominance(by[base], by["budget_control"], x)
            out["matched_latency" + suffix] = _matched(by["budget_control"], by[base], x)
            out["flops_axis" + suffix] = dominance(by["budget_control"], by[base], "flops")
            out["wall_axis" + suffix] = dominance(by["budget_control"], by[base], "latency_s")
    out.update(analyze_rigor(results, by, x))     # seen / unseen units, dominance with intervals (rigor.py)
    out["verdict"] = verdict(results)
    out.update(analyze_seeds(results))    # issue 30: >= 2 seeds: intervals over seeds x problems, verdict over seeds
    # statistical power: the 95% half-width at each observed accuracy, and the problems +-2 points needs
    n = results.get("eval", {}).get("n_problems")
    rows = ([results["parent"]] if results.get("parent") else []) + results.get("nested", []) \
        + [dict(b, name=f"baseline {b['name']}") for b in results.get("baselines", [])]
    if n:
        power = []
        for r in rows:
            if "accuracy" not in r:
                continue
            power.append({"name": r["name"], "accuracy": r["accuracy"], "ci": _ci(r.get("scores")),
                          "half_width": half_width(r["accuracy"], n), "needed_for_2pt": problems_needed(r["accuracy"])})
        out["power"] = {"n_problems": n, "rows": power,
                        "all_within_2pt": all(p["half_width"] <= 0.02 for p in power),
                        "grid_problems": results.get("eval", {}).get("grid_problems") or n}
    base = {b["name"]: b for b in results.get("baselines", [])}
    diffs = {}
    for r in results.get("nested", []):
        b = base.get(r["name"])
        if b and r.get("scores") and b.get("scores"):
            diffs[r["name"]] = {"diff": r["accuracy"] - b["accuracy"],
                                "ci": list(bootstrap_diff_ci(r["scores"], b["scores"]))}
    if diffs:
        out["nested_minus_baseline"] = diffs
    sweep = results.get("token_sweep", [])
    if sweep:
        eff = {}
        for r in results.get("nested", []):
            pts = [s for s in sweep if s["name"] == r["name"]]
            if pts:
                eff[r["name"]] = tokens_to_match(r.get("scores"), pts)
        out["token_efficiency"] = eff
    scratch = [r for r in results.get("scratch") or [] if r.get("multiple") is not None]
    if scratch:       # from-scratch snapshots: the tokens each smaller size needs from random init
        out["scratch_to_match"] = {r["name"]: tokens_to_match(r.get("scores"), [s for s in scratch if s["name"] == r["name"]])
                                   for r in results.get("nested", []) if any(s["name"] == r["name"] for s in scratch)}
    if sweep or scratch:
        out["family_tokens"] = family_tokens(results, out)     # issue 30: tokens counted for the whole family
    tr = results.get("training", {})
    if tr.get("elastic_tokens") and tr.get("baseline_tokens"):
        s = sum(tr["baseline_tokens"].values())
        out["tokens"] = {"elastic": tr["elastic_tokens"], "baselines_sum": s,
                         "ratio_baselines_over_elastic": s / tr["elastic_tokens"]}
    mem = results.get("memory", {})
    if mem.get("nested_checkpoint_bytes") and mem.get("separate_checkpoint_bytes"):
        out["memory_ratio_nested_over_separate"] = mem["nested_checkpoint_bytes"] / mem["separate_checkpoint_bytes"]
    return out


# ------------------------------------------------------------------------------ markdown
def _fmt(x, nd=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mb(n):
    return f"{n / 2**20:.2f} MiB"


def _ms(mod) -> str:
    return "n/a" if mod is None else f"{1e3 * mod['think_s']:.2f} / {1e3 * mod['answer_s']:.2f}"


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _cis(ci) -> str:
    return "" if not ci else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _acc(r: dict) -> str:
    s = _fmt(r.get("accuracy"))
    if r.get("scores"):
        lo, hi = bootstrap_ci(r["scores"], n_boot=1000)
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s


def _diagnostics_md(results: dict, analysis: dict) -> list[str]:
    rows = ([results["parent"]] if results.get("parent") else []) + results.get("nested", []) \
        + [dict(b, name=f"baseline {b['name']}") for b in results.get("baselines", [])]
    rows = [r for r in rows if r.get("accuracy_gold_trace") is not None]
    if not rows:
        return []
    L = ["## Diagnostics: can this task test the per-phase claim?", "",
         "Answer accuracy given the gold (reference) trace measures answer capacity; the exact-trace rate "
         "(thinking, full budget, equal to the reference trace) measures thinking quality.", "",
         "| model | answer accuracy given the gold trace | exact-trace rate | accuracy (own trace) |",
         "|---|---|---|---|"]
    for r in rows:
        ci = bootstrap_ci(r["scores_gold_trace"], n_boot=1000) if r.get("scores_gold_trace") else None
        L.append(f"| {r['name']} | {_fmt(r['accuracy_gold_trace'])}{'' if ci is None else f' [{ci[0]:.3f}, {ci[1]:.3f}]'}"
                 f" | {_fmt(r.get('exact_trace'))} | {_fmt(r['accuracy'])} |")
    v = analysis.get("verdict", {})
    L += ["", f"**Verdict: the task {'CAN' if v.get('testable') else 'CANNOT'} test the per-phase claim** — "
              f"{v.get('reason', '')}.", ""]
    return L


def _power_md(analysis: dict) -> list[str]:
    pw = analysis.get("power")
    if not pw:
        return []
    L = ["## Statistical power", "",
         f"{pw['n_problems']} eval problems. 95% half-width at each observed accuracy (normal approximation) "
         "and the problems a +-2-point interval would need:", "",
         "| model | accuracy | bootstrap 95% CI | half-width | problems for +-0.02 |", "|---|---|---|---|---|"]
    for r in pw["rows"]:
        ci = r.get("ci")
        L.append(f"| {r['name']} | {r['accuracy']:.3f} | {'n/a' if not ci else f'[{ci[0]:.3f}, {ci[1]:.3f}]'} | "
                 f"{r['half_width']:.3f} | {r['needed_for_2pt']} |")
    L += ["", "Every interval is within +-2 points." if pw["all_within_2pt"] else
          "**Not every interval is within +-2 points** at this eval-set size (see the last column).", ""]
    k = pw["grid_problems"]
    if k < pw["n_problems"]:
        L += [f"The budget-control grid runs on the first {k} of these problems (95% half-width up to "
              f"+-{half_width(0.5, k):.3f} per grid point; its differences are paired on those problems).", ""]
    return L


def _token_md(results: dict, analysis: dict) -> list[str]:
    eff = analysis.get("token_efficiency")
    if not eff:
        return []
    seen = results.get("nested_tokens", {})
    L = ["## Token efficiency: nested models vs independently distilled baselines", "",
         "Each baseline is the permuted parent pruned to the nested model's router-chosen widths and distilled "
         "alone on a multiple of the tokens that nested model saw inside the elastic run (its expected share of "
         "the sampled budgets). The baselines inherit the router's width search for free: the cost of finding "
         "their architecture is not charged to them.", "",
         "| size | tokens the nested model saw | baseline multiple | baseline tokens | baseline accuracy |",
         "|---|---|---|---|---|"]
    for r in results.get("token_sweep", []):
        L.append(f"| {r['name']} | {seen.get(r['name'], 0):,.0f} | {_fmt(r.get('multiple'))} | "
                 f"{r['train_tokens']:,} | {_acc(r)} |")
    L += ["", "| size | nested accuracy | tokens-to-match multiple (95% CI) |", "|---|---|---|"]
    for n, e in eff.items():
        m = e.get("multiple")
        ci = e.get("ci")
        fm = lambda v: v if isinstance(v, str) else f"{v:.2f}x"
        L.append(f"| {n} | {_fmt(e.get('nested_accuracy'))} | "
                 f"{'n/a' if m is None else fm(m)}{'' if not ci else f' [{fm(ci[0])}, {fm(ci[1])}]'} |")
    L += ["", "A multiple above 1 means a baseline needs more tokens than the nested model saw to match it "
              "(the paper's claim, in miniature: 7x / 360x fewer tokens); '<= m' means the smallest swept "
              "baseline already matches, '> m' that none does.", ""]
    return L


def render_markdown(results: dict, analysis: dict) -> str:
    L = [f"# {results.get('title', 'Star Elastic run')}", ""]
    t = results.get("timing", {})
    ev = results.get("eval", {})
    if t:
        L += [f"Wall time of the run: **{t.get('total_s', 0):.1f} s**"
              + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in t.get("phases", {}).items()) + ")"
                 if t.get("phases") else "") + ".", ""]
    if ev:
        L += [f"Evaluation: {ev.get('n_problems')} held-out `{ev.get('split', 'test')}` problems of the embedded "
              f"task (difficulty levels {ev.get('levels')}), greedy decoding, exact match of the answer"
              + ("; the query and recurrence levels (5-12) score partial credit per queried step, the combine "
                 "levels (13-16) per group" if any(l >= 5 for l in ev.get("levels") or ()) else "")
              + (f"; the budget-control grid on the first {ev['grid_problems']}"
                 if ev.get("grid_problems", ev.get("n_problems")) != ev.get("n_problems") else "") + ".", ""]
    L += seeds_section(analysis) + parent_curve_markdown(results)
    # ---- accuracy table
    par = results.get("parent")
    base = {b["name"]: b for b in results.get("baselines", [])}
    nmb = analysis.get("nested_minus_baseline", {})
    L += ["## Accuracy of each nested model vs its independent baseline and the parent", "",
          "Intervals: 95% bootstrap over the eval problems (differences: paired, the same problems).", "",
          "| model | params | active params | accuracy (full thinking) | accuracy (no thinking) | "
          "baseline accuracy | baseline no-thinking | nested - baseline |",
          "|---|---|---|---|---|---|---|---|"]
    if par:
        L.append(f"| parent | {par['params']:,} | {par['active_params']:,} | {_acc(par)} | "
                 f"{_fmt(par.get('accuracy_no_thinking'))} | - | - | - |")
    for n in results.get("nested", []):
        b = base.get(n["name"])
        diff = None if b is None else n["accuracy"] - b["accuracy"]
        ci = nmb.get(n["name"], {}).get("ci")
        L.append(f"| nested {n['name']} | {n['params']:,} | {n['active_params']:,} | {_acc(n)} | "
                 f"{_fmt(n.get('accuracy_no_thinking'))} | {'n/a' if b is None else _acc(b)} | "
                 f"{_fmt(None if b is None else b.get('accuracy_no_thinking'))} | "
                 f"{'n/a' if diff is None else f'{diff:+.3f}'}{_cis(ci)} |")
    L.append("")
    L += _diagnostics_md(results, analysis) + _power_md(analysis) + _token_md(results, analysis) \
        + family_markdown(results, analysis)
    wins = [n["name"] for n in results.get("nested", []) if n["name"] in base
            and n["accuracy"] >= base[n["name"]]["accuracy"]]
    loses = [n["name"] for n in results.get("nested", []) if n["name"] in base
             and n["accuracy"] < base[n["name"]]["accuracy"]]
    if base:
        L += [f"Nested >= baseline for: {', '.join(wins) or 'none'}; nested < baseline for: "
              f"{', '.join(loses) or 'none'} (the paper claims nested >= baselines, METHOD §11.4).", ""]
    # ---- tokens
    tok = analysis.get("tokens")
    tr = results.get("training", {})
    if tok:
        L += ["## Training tokens", "",
              "| run | tokens |", "|---|---|",
              f"| parent (CE, shared by both approaches) | {tr.get('parent_tokens', 0):,} |",
              f"| Star Elastic distillation (all budgets at once) | {tok['elastic']:,} |"]
        for k, v in tr.get("baseline_tokens", {}).items():
            L.append(f"| independent baseline {k} (KD alone) | {v:,} |")
        L += [f"| sum of the baselines | {tok['baselines_sum']:,} |", "",
              f"The baselines together used **{tok['ratio_baselines_over_elastic']:.2f}x** the elastic run's "
              f"tokens (paper: 7x fewer tokens than sequential compression, METHOD §11.2). The parent's own "
              f"training is shared by both approaches and not counted on either side.", ""]
    # ---- memory
    mem = results.get("memory", {})
    if mem.get("nested_checkpoint_bytes"):
        L += ["## Checkpoint memory", "",
              f"One nested checkpoint (all budgets sliceable zero-shot): **{_mb(mem['nested_checkpoint_bytes'])}**; "
              f"separate checkpoints of the same sizes: **{_mb(mem['separate_checkpoint_bytes'])}** "
              f"(ratio {analysis.get('memory_ratio_nested_over_separate', 0):.2f}; paper Table 3: 58.9 GB vs "
              f"126.1 GB = 0.47, METHOD §10).", ""]
        if mem.get("files"):
            L += ["| file | size |", "|---|---|"] + [f"| {k} | {_mb(v)} |" for k, v in mem["files"].items()] + [""]
    # ---- budget control
    grid = results.get("grid", [])
    if grid:
        x = analysis.get("x_axis", "latency_s")
        modeled = x == "latency_model_s"
        lat = results.get("latency", {})
        prim = lat.get("primary")
        L += ["## Budget control vs thinking-token truncation (METHOD §9)", "",
              f"Thinking budgets: {results.get('grid_budgets')}. Two truncation baselines: the parent alone "
              "(`parent_truncation`, the paper's baseline) and every nested model alone (`truncation`); "
              "budget control = A thinks, B answers after re-prefilling prompt + trace (bucketed to a multiple "
              "of 8).", ""]
        if modeled:
            L += [f"**Primary axis: modeled latency per request on `{prim}`** "
                  f"({lat.get('targets', {}).get(prim, {}).get('description', '')}; {lat.get('note', '')}). "
                  "A decode step costs max(FLOPs / peak, bytes / bandwidth) + a per-step overhead, bytes = weights "
                  "read (routed experts actually hit) + KV cache + SSM state (elastic_jax/eval/latency.py). "
                  "Wall clock on this CPU and analytic FLOPs are shown for comparison.", "",
                  "| target | peak FLOP/s | bandwidth (B/s) | overhead per step (s) |", "|---|---|---|---|"]
            L += [f"| {k} ({t.get('description', '')}) | {t['peak_flops']:.3g} | {t['hbm_bandwidth']:.3g} | "
                  f"{t['step_overhead_s']:.2g} |" for k, t in lat.get("targets", {}).items()]
            L.append("")
        pci = analysis.get("point_ci", {})
        L += ["| scheme | think -> answer | thinking budget | accuracy [95% CI] | modeled think / answer (ms) | "
              "wall (s) | mean thinking tokens | forced </think> | exact trace | GFLOPs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(grid, key=lambda p: (p["scheme"], p["think_model"], p["answer_model"], p["thinking_budget"])):
            ci = pci.get(point_key(p))
            mod = p.get("modeled", {}).get(prim) if modeled else None
            L.append(f"| {p['scheme']} | {p['think_model']} -> {p['answer_model']} | {p['thinking_budget']} | "
                     f"{p['accuracy']:.3f}{'' if not ci else f' [{ci[0]:.3f}, {ci[1]:.3f}]'} | "
                     f"{_ms(mod)} | "
                     f"{p['latency_s']:.3f} | {p['mean_thinking_tokens']:.1f} | {p['forced_frac']:.2f} | "
                     f"{_fmt(p.get('exact_trace'), 2)} | {p['flops'] / 1e9:.3f} |")
        L.append("")
        for s, front in analysis.get("frontiers", {}).items():
            L.append(f"- Pareto frontier of **{s}** ({x}): {', '.join(front)}")
        L.append("")
        v = analysis.get("verdict", {})
        if v and not v.get("testable"):
            L += [f"**No conclusion about the per-phase claim is drawn from this grid**: the diagnostics say the "
                  f"task cannot test it ({v.get('reason', '')}). The comparisons below are reported, not "
                  "interpreted.", ""]
        for suffix, what in (("_parent", "the parent alone"), ("", "each nested model alone")):
            d = analysis.get("budget_control_vs_truncation" + suffix)
            if not d:
                continue
            L += [f"### Against truncation of {what}", "",
                  f"Budget-control frontier points that dominate truncation-frontier points on the primary axis, "
                  f"**by point estimates** ({100 * d['baseline_dominated_frac']:.0f}% of the truncation frontier; "
                  f"outside the paired intervals: "
                  f"{100 * analysis.get('dominance_ci' + suffix, {}).get('baseline_dominated_frac', float('nan')):.0f}%, "
                  f"see 'Dominance with intervals'):"]
            L += [f"- {w['point']} dominates {', '.join(w['dominates'])}" for w in d["dominating"]] or ["- none"]
            L += [f"Truncation-frontier points no budget-control point dominates: "
                  f"{', '.join(d['baseline_undominated']) or 'none'}."]
            r = analysis.get("truncation_vs_budget_control" + suffix)
            L += [f"Conversely, {100 * r['baseline_dominated_frac']:.0f}% of the budget-control frontier is "
                  f"dominated by truncation points."]
            fl, wl = analysis.get("flops_axis" + suffix), analysis.get("wall_axis" + suffix)
            L += [f"On the FLOPs axis {100 * fl['baseline_dominated_frac']:.0f}% and on wall clock "
                  f"{100 * wl['baseline_dominated_frac']:.0f}% of the truncation frontier is dominated.", ""]
            m = analysis.get("matched_latency" + suffix)
            if m:
                L += ["Accuracy at matched cost (best budget-control point no slower on the primary axis than each "
                      "truncation frontier point, picked from k candidates; paired 95% interval of the difference, "
                      "Bonferroni-corrected for the k candidates, so a best-of-k pick is not a winner's curse):", "",
                      "| truncation point | its accuracy | cost | best budget control | of k | its accuracy | difference |",
                      "|---|---|---|---|---|---|---|"]
                L += [f"| {r['baseline']} | {r['baseline_accuracy']:.3f} | {r['x']:.4g} | {r['best'] or 'none'} | "
                      f"{r.get('k', 'n/a')} | {_fmt(r['best_accuracy'])} | {_signed(r['diff'])}"
                      f"{_cis(r['diff_ci'])} |" for r in m]
                L.append("")
        if any(p["scheme"] == "transplant" for p in grid):
            L += ["Cache transplant (B continues from A's caches, no re-prefill) is an approximation, reported "
                  "separately; its latency is measured on the masked (unsliced) views, so compare its accuracy "
                  "with the matching budget-control rows rather than its latency.", ""]
    L += rigor_markdown(results, analysis)
    L += quant_markdown(results)
    if results.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOTS] + [""]
    if results.get("config"):
        L += ["## Config", "", "```json", json.dumps(results["config"], indent=1, default=str)[:6000], "```", ""]
    return "\n".join(L)


def write_report(results: dict, out_dir: str, *, writer: str | None = None) -> dict:
    """Write results.json, report.md and the PNG plots into `out_dir`, each file atomically.
    Returns {name: path}. `writer` ("run" for the main job, "eval" for `elastic-jax eval`; default:
    the results' own) is recorded in results.json; a folder whose results.json another writer made
    is refused (FileExistsError naming a free folder), so one job never replaces another's files."""
    from ..fileio import atomic_file, write_text_atomic
    if not isinstance(results, dict) or not results.get("nested"):
        raise ValueError("report: the results hold no evaluated models ('nested' is empty); nothing to report")
    writer = writer or results.get("writer") or "run"
    check_writer(out_dir, writer)
    os.makedirs(out_dir, exist_ok=True)
    results = dict(results)
    results["writer"] = writer
    results["analysis"] = analyze(results)
    paths = {"results.json": os.path.join(out_dir, "results.json"), "report.md": os.path.join(out_dir, "report.md")}
    text = json.dumps(results, indent=1, default=_json_default)
    markdown = render_markdown(results, results["analysis"])       # everything computed before any write
    write_text_atomic(paths["results.json"], text)
    for name, plot in (("pareto.png", plot_pareto), ("training_curves.png", plot_training),
                       ("accuracy_per_budget.png", plot_accuracy)):
        try:
            with atomic_file(os.path.join(out_dir, name)) as tmp:
                plot(results, tmp)
                if not os.path.getsize(tmp):
                    raise _NoPlot
        except _NoPlot:
            pass
    for p in PLOTS:
        paths[p] = os.path.join(out_dir, p)
    write_text_atomic(paths["report.md"], markdown)
    return paths


class _NoPlot(Exception):
    """A plot function that drew nothing (no data for it): the previous file is kept."""


def check_writer(out_dir: str, writer: str) -> None:
    """Refuse `out_dir` when its results.json was written by another job (or cannot be read)."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.lexists(path):
        return
    try:
        with open(path, "rb") as f:
            prev = json.loads(f.read().decode("utf-8"))
        prev_writer = (prev.get("writer") or "run") if isinstance(prev, dict) else None
    except (OSError, ValueError):
        prev_writer = None
    if prev_writer == writer:
        return
    free = os.path.join(out_dir, writer)
    k = 2
    while os.path.lexists(free):
        free, k = os.path.join(out_dir, f"{writer}-{k}"), k + 1
    whose = "an unreadable results file" if prev_writer is None else f"the {prev_writer!r} job's results"
    raise FileExistsError(f"{out_dir} holds {whose} (results.json, report.md); `{writer}` does not replace "
                          f"them. Write elsewhere, e.g. --out {free}")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_results(path: str) -> dict:
    """Read `results.json` (a file or a run folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results.json at {path}")
    from ..errors import JSONFileError, read_json
    results = read_json(path, what="evaluation results", required=("nested",))
    nested = results["nested"]
    if not isinstance(nested, list) or not nested:
        raise JSONFileError(f"{path}: field 'nested' holds no evaluated models; nothing to report "
                            "(run `elastic-jax eval` first)")
    for i, m in enumerate(nested):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise JSONFileError(f"{path}: field 'nested[{i}]' must be an object with a 'name'")
    return results
