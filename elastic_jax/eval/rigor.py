"""What a reviewer checks before believing the report (issue 30): accuracy on scoring units seen and
unseen in training, dominance counted only outside the paired interval, and the latency model's
sensitivity to batch size, achieved bandwidth and per-call overhead (METHOD §9).

Pure functions of the results dict (`analyze_rigor`, `rigor_markdown`) plus `latency_sensitivity`,
which the run computes from the model config and the nested widths.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .evaluate import pareto_front
from .stats import bootstrap_ci, bootstrap_diff_ci

SENS_BATCHES = (1, 32, 128)
SENS_BANDWIDTH = (1.0, 0.9, 0.75, 0.6)        # achieved fraction of the datasheet HBM bandwidth
SENS_OVERHEAD_S = (0.0, 15e-6, 50e-6)          # per forward call


# ------------------------------------------------------------------------------ seen / unseen units
def seen_unseen(results: dict) -> list[dict] | None:
    """Per model with per-part gold-trace scores: answer accuracy given the gold trace over the scoring
    units that occur in training (seen) and those that do not (unseen), and full-thinking accuracy of
    the problems whose units are all seen / all unseen. None when the run recorded no unit flags."""
    flags = results.get("eval", {}).get("units_seen")
    if not flags:
        return None
    flat = np.asarray([f for fs in flags for f in fs], bool)
    all_seen = np.asarray([all(fs) for fs in flags])
    none_seen = np.asarray([not any(fs) for fs in flags])
    rows = ([results["parent"]] if results.get("parent") else []) + results.get("nested", []) \
        + [dict(b, name=f"baseline {b['name']}") for b in results.get("baselines", [])]
    out = []
    for r in rows:
        parts = r.get("parts_gold_trace")
        row = {"name": r["name"], "units_seen": int(flat.sum()), "units_unseen": int((~flat).sum())}
        if parts and len(parts) == len(flags):
            p = np.asarray([s for ps in parts for s in ps], float)
            for key, sel in (("seen", flat), ("unseen", ~flat)):
                row[f"gold_{key}"] = float(p[sel].mean()) if sel.any() else None
                row[f"gold_{key}_ci"] = list(bootstrap_ci(p[sel], n_boot=500)) if sel.any() else None
        sc = r.get("scores")
        if sc and len(sc) == len(flags):
            sc = np.asarray(sc, float)
            row["own_all_seen"] = float(sc[all_seen].mean()) if all_seen.any() else None
            row["own_none_seen"] = float(sc[none_seen].mean()) if none_seen.any() else None
        out.append(row)
    return out


# ------------------------------------------------------------------------------ dominance with intervals
def dominance_with_intervals(challengers, baseline, x: str, level: float = 0.95, n_boot: int = 1000) -> dict:
    """Frontier dominance where a challenger frontier point dominates a baseline frontier point only when
    it costs no more on `x` AND its accuracy is higher beyond the paired `level` interval of the
    difference (lower bound > 0). Points without per-problem scores cannot dominate. Returns
    `dominance`'s fields plus `point_estimate_dominated_frac` (the old, point-estimate count)."""
    cf = [challengers[i] for i in pareto_front(challengers, x)]
    bf = [baseline[i] for i in pareto_front(baseline, x)]
    wins, dominated, point_dominated = [], set(), set()
    for c in cf:
        beaten = []
        for b in bf:
            if c[x] > b[x]:
                continue
            if c["accuracy"] >= b["accuracy"] and (c[x] < b[x] or c["accuracy"] > b["accuracy"]):
                point_dominated.add(b["label"])
            if c.get("correct") and b.get("correct") and len(c["correct"]) == len(b["correct"]):
                lo, hi = bootstrap_diff_ci(c["correct"], b["correct"], n_boot=n_boot, level=level)
                if lo > 0:
                    beaten.append({"point": b["label"], "diff": c["accuracy"] - b["accuracy"], "ci": [lo, hi]})
        if beaten:
            wins.append({"point": c["label"], "dominates": [w["point"] for w in beaten], "details": beaten})
            dominated.update(w["point"] for w in beaten)
    n = len(bf)
    return {"challenger_frontier": [c["label"] for c in cf], "baseline_frontier": [b["label"] for b in bf],
            "dominating": wins, "baseline_undominated": [b["label"] for b in bf if b["label"] not in dominated],
            "baseline_dominated_frac": len(dominated) / n if n else 0.0,
            "point_estimate_dominated_frac": len(point_dominated) / n if n else 0.0, "level": level}


# ------------------------------------------------------------------------------ latency sensitivity
def latency_sensitivity(target, cfg, widths: dict, *, prompt_len: int, think_steps: int, answer_steps: int,
                        batches=SENS_BATCHES, bandwidth=SENS_BANDWIDTH, overheads=SENS_OVERHEAD_S) -> dict:
    """Modeled per-request latency of each model in `widths` ({name: Widths}, the first = the full
    model) thinking `think_steps` and answering `answer_steps` on itself, on `target`
    (`latency.LatencyTarget`, its reference architecture when it has one) with the profile's bandwidth
    scaled by each fraction, each per-call overhead and each batch; the ratios to the full model are
    what budget control trades on. Rows: {"batch", "bandwidth_frac", "overhead_s", "full_ms",
    "ratio": {name: x}}."""
    from .latency import generation_latency, scale_widths
    names = list(widths)
    ref_cfg = target.reference if target.reference is not None else cfg
    mapped = {n: scale_widths(cfg, w, ref_cfg) if target.reference is not None else w for n, w in widths.items()}
    rows = []
    for batch in batches:
        for bw in bandwidth:
            for oh in overheads:
                prof = dataclasses.replace(target.profile, hbm_bandwidth=target.profile.hbm_bandwidth * bw,
                                           step_overhead_s=oh)
                sec = {n: generation_latency(prof, think_cfg=ref_cfg, think_widths=w, batch=batch,
                                             prompt_len=prompt_len, think_steps=think_steps,
                                             answer_steps=answer_steps)["total_s"] for n, w in mapped.items()}
                full = sec[names[0]]
                rows.append({"batch": batch, "bandwidth_frac": bw, "overhead_s": oh, "full_ms": 1e3 * full,
                             "ratio": {n: sec[n] / full for n in names}})
    return {"target": target.key, "prompt_len": prompt_len, "think_steps": think_steps,
            "answer_steps": answer_steps, "models": names, "rows": rows}


# ------------------------------------------------------------------------------ analysis + markdown
def analyze_rigor(results: dict, by_scheme: dict, x: str) -> dict:
    """The reviewer-facing numbers `report.analyze` adds: seen / unseen accuracy and dominance with
    intervals against both truncation baselines."""
    out = {}
    su = seen_unseen(results)
    if su is not None:
        out["seen_unseen"] = su
    for base, suffix in (("parent_truncation", "_parent"), ("truncation", "")):
        if by_scheme.get("budget_control") and by_scheme.get(base):
            out["dominance_ci" + suffix] = dominance_with_intervals(by_scheme["budget_control"], by_scheme[base], x)
    return out


def _pct(v):
    return "n/a" if v is None else f"{v:.3f}"


def rigor_markdown(results: dict, analysis: dict) -> list[str]:
    L = []
    su = analysis.get("seen_unseen")
    if su:
        r0 = su[0]
        L += ["## Held-out problems: seen and unseen scoring units", "",
              f"A scoring unit is one answer part: (the walk or digits it depends on, its queried steps). Of the "
              f"eval set's units, **{r0['units_seen']} occur in some training document and {r0['units_unseen']} "
              f"do not** (the recurrence / combine levels hold out whole walks: a test start pair never appears in "
              f"training). Gold-trace answer accuracy per unit, and full-thinking accuracy of the problems whose "
              f"units are all seen / none seen:", "",
              "| model | gold trace, seen units | gold trace, unseen units | own trace, all seen | own trace, none seen |",
              "|---|---|---|---|---|"]
        for r in su:
            ci = lambda k: "" if not r.get(k + "_ci") else f" [{r[k + '_ci'][0]:.3f}, {r[k + '_ci'][1]:.3f}]"
            L.append(f"| {r['name']} | {_pct(r.get('gold_seen'))}{ci('gold_seen')} | "
                     f"{_pct(r.get('gold_unseen'))}{ci('gold_unseen')} | {_pct(r.get('own_all_seen'))} | "
                     f"{_pct(r.get('own_none_seen'))} |")
        L.append("")
    for suffix, what in (("_parent", "the parent alone"), ("", "each nested model alone")):
        d = analysis.get("dominance_ci" + suffix)
        if not d:
            continue
        L += [f"### Dominance with intervals: budget control vs truncation of {what}", "",
              f"A budget-control frontier point dominates a truncation frontier point only when it costs no more "
              f"on the primary axis and its accuracy is higher beyond the paired {100 * d['level']:.0f}% interval: "
              f"**{100 * d['baseline_dominated_frac']:.0f}%** of the truncation frontier is dominated "
              f"(point estimates alone: {100 * d['point_estimate_dominated_frac']:.0f}%).", ""]
        for w in d["dominating"]:
            L.append(f"- {w['point']} dominates " + ", ".join(
                f"{x['point']} ({x['diff']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}])" for x in w["details"]))
        L.append("")
    sens = results.get("latency", {}).get("sensitivity")
    if sens:
        models = sens["models"]
        L += ["## Latency model sensitivity", "",
              f"Modeled latency of one request on `{sens['target']}` (prompt {sens['prompt_len']}, "
              f"{sens['think_steps']} thinking + {sens['answer_steps']} answer tokens, each model on its own), "
              "relative to the full model, as the batch, the achieved fraction of peak HBM bandwidth and the "
              "per-call overhead vary. The main figure uses batch 1, 100% of peak bandwidth and the profile's "
              "overhead; a modeled ratio is a roofline estimate, not a measurement.", "",
              "| batch | bandwidth | overhead per call (us) | full model (ms) | "
              + " | ".join(f"{m} / full" for m in models[1:]) + " |",
              "|---|---|---|---|" + "---|" * (len(models) - 1)]
        for r in sens["rows"]:
            L.append(f"| {r['batch']} | {100 * r['bandwidth_frac']:.0f}% | {1e6 * r['overhead_s']:.0f} | "
                     f"{r['full_ms']:.2f} | " + " | ".join(f"{r['ratio'][m]:.2f}" for m in models[1:]) + " |")
        L.append("")
    return L
