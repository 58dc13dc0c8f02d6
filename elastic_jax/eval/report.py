"""The run report: `results.json` -> `report.md` + PNG plots (matplotlib, Agg backend).

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

from .evaluate import SCHEMES, dominance, pareto_front

PLOTS = ("pareto.png", "training_curves.png", "accuracy_per_budget.png")
SCHEME_STYLE = {"truncation": ("tab:gray", "s", "truncation (one model, thinking cut at the budget)"),
                "budget_control": ("tab:red", "o", "elastic budget control (A thinks, B answers)"),
                "transplant": ("tab:blue", "^", "budget control + cache transplant (experiment)")}


def analyze(results: dict) -> dict:
    """Derived numbers the report states: frontiers, dominance, token and memory ratios."""
    grid = results.get("grid", [])
    by = {s: [p for p in grid if p["scheme"] == s] for s in SCHEMES}
    out = {"frontiers": {s: [by[s][i]["label"] for i in pareto_front(by[s])] for s in SCHEMES if by[s]}}
    if by["budget_control"] and by["truncation"]:
        out["budget_control_vs_truncation"] = dominance(by["budget_control"], by["truncation"])
        out["truncation_vs_budget_control"] = dominance(by["truncation"], by["budget_control"])
        # accuracy at matched latency: for each truncation frontier point, the best budget-control
        # point that is no slower
        matched = []
        for i in pareto_front(by["truncation"]):
            t = by["truncation"][i]
            ok = [p for p in by["budget_control"] if p["latency_s"] <= t["latency_s"]]
            best = max(ok, key=lambda p: p["accuracy"]) if ok else None
            matched.append({"truncation": t["label"], "truncation_accuracy": t["accuracy"],
                            "latency_s": t["latency_s"],
                            "best_budget_control": None if best is None else best["label"],
                            "best_budget_control_accuracy": None if best is None else best["accuracy"]})
        out["matched_latency"] = matched
    tr = results.get("training", {})
    if tr.get("elastic_tokens") and tr.get("baseline_tokens"):
        s = sum(tr["baseline_tokens"].values())
        out["tokens"] = {"elastic": tr["elastic_tokens"], "baselines_sum": s,
                         "ratio_baselines_over_elastic": s / tr["elastic_tokens"]}
    mem = results.get("memory", {})
    if mem.get("nested_checkpoint_bytes") and mem.get("separate_checkpoint_bytes"):
        out["memory_ratio_nested_over_separate"] = mem["nested_checkpoint_bytes"] / mem["separate_checkpoint_bytes"]
    return out


# ------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False) if matplotlib.get_backend().lower() != "agg" and not _inline() else None
    import matplotlib.pyplot as plt
    return plt


def _inline() -> bool:
    import matplotlib
    return "inline" in matplotlib.get_backend().lower()


def plot_pareto(results: dict, path: str):
    plt = _plt()
    grid = results.get("grid", [])
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for s in SCHEMES:
        pts = [p for p in grid if p["scheme"] == s]
        if not pts:
            continue
        color, marker, label = SCHEME_STYLE[s]
        ax.scatter([p["latency_s"] for p in pts], [p["accuracy"] for p in pts], c=color, marker=marker, alpha=0.45,
                   s=28, label=label)
        front = [pts[i] for i in pareto_front(pts)]
        ax.step([p["latency_s"] for p in front], [p["accuracy"] for p in front], where="post", color=color, lw=2)
        for p in front:
            ax.annotate(p["label"], (p["latency_s"], p["accuracy"]), fontsize=6, color=color,
                        xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("wall-clock latency of the eval set, think + answer (s)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("accuracy vs latency: Pareto frontier per scheme (spec §9)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if not _inline():
        plt.close(fig)
    return fig


def plot_training(results: dict, path: str):
    plt = _plt()
    hist = results.get("training", {}).get("histories", {})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, h in hist.items():
        h = [r for r in h if "loss" in r and r.get("loss") is not None]
        if not h:
            continue
        x = [r.get("tokens_seen", r["step"]) for r in h]
        ax.plot(x, [r["loss"] for r in h], label=name, lw=1.2)
        if name == "elastic":
            keys = sorted({k for r in h for k in r if k.startswith("task_budget_")})
            for k in keys:
                pts = [(r.get("tokens_seen", r["step"]), r[k]) for r in h if k in r]
                ax.plot(*zip(*pts), lw=0.8, ls=":", label=f"elastic {k.replace('task_budget_', 'KD @ budget ')}")
    if ax.get_legend_handles_labels()[0]:
        ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("loss (CE for the parent, KD otherwise)")
    ax.set_title("training curves" if hist else "training curves (none recorded)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if not _inline():
        plt.close(fig)
    return fig


def plot_accuracy(results: dict, path: str):
    plt = _plt()
    nested = results.get("nested", [])
    base = {b["name"]: b for b in results.get("baselines", [])}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [n["name"] for n in nested]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [n["accuracy"] for n in nested], 0.4, label="nested (Star Elastic, sliced zero-shot)",
           color="tab:red")
    ax.bar(x + 0.2, [base[n]["accuracy"] if n in base else np.nan for n in names], 0.4,
           label="independent baseline (pruned + KD alone)", color="tab:gray")
    par = results.get("parent")
    if par:
        ax.axhline(par["accuracy"], color="k", ls="--", lw=1, label=f"parent ({par['accuracy']:.3f})")
    ax.set_xticks(x, [f"{n}\n{m.get('active_params', 0) / 1e6:.2f}M active" for n, m in zip(names, nested)])
    ax.set_ylabel("exact-match accuracy (full thinking)")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy per budget: nested vs independent baselines")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if not _inline():
        plt.close(fig)
    return fig


# ------------------------------------------------------------------------------ markdown
def _fmt(x, nd=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mb(n):
    return f"{n / 2**20:.2f} MiB"


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
              f"task (difficulty levels {ev.get('levels')}), greedy decoding, exact match of the answer.", ""]
    # ---- accuracy table
    par = results.get("parent")
    base = {b["name"]: b for b in results.get("baselines", [])}
    L += ["## Accuracy of each nested model vs its independent baseline and the parent", "",
          "| model | params | active params | accuracy (full thinking) | accuracy (no thinking) | "
          "baseline accuracy | baseline no-thinking | nested - baseline |",
          "|---|---|---|---|---|---|---|---|"]
    if par:
        L.append(f"| parent | {par['params']:,} | {par['active_params']:,} | {_fmt(par['accuracy'])} | "
                 f"{_fmt(par.get('accuracy_no_thinking'))} | - | - | - |")
    for n in results.get("nested", []):
        b = base.get(n["name"])
        diff = None if b is None else n["accuracy"] - b["accuracy"]
        L.append(f"| nested {n['name']} | {n['params']:,} | {n['active_params']:,} | {_fmt(n['accuracy'])} | "
                 f"{_fmt(n.get('accuracy_no_thinking'))} | {_fmt(None if b is None else b['accuracy'])} | "
                 f"{_fmt(None if b is None else b.get('accuracy_no_thinking'))} | "
                 f"{'n/a' if diff is None else f'{diff:+.3f}'} |")
    L.append("")
    wins = [n["name"] for n in results.get("nested", []) if n["name"] in base
            and n["accuracy"] >= base[n["name"]]["accuracy"]]
    loses = [n["name"] for n in results.get("nested", []) if n["name"] in base
             and n["accuracy"] < base[n["name"]]["accuracy"]]
    if base:
        L += [f"Nested >= baseline for: {', '.join(wins) or 'none'}; nested < baseline for: "
              f"{', '.join(loses) or 'none'} (the paper claims nested >= baselines, spec §11.4).", ""]
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
              f"tokens (paper: 7x fewer tokens than sequential compression, spec §11.2). The parent's own "
              f"training is shared by both approaches and not counted on either side.", ""]
    # ---- memory
    mem = results.get("memory", {})
    if mem.get("nested_checkpoint_bytes"):
        L += ["## Checkpoint memory", "",
              f"One nested checkpoint (all budgets sliceable zero-shot): **{_mb(mem['nested_checkpoint_bytes'])}**; "
              f"separate checkpoints of the same sizes: **{_mb(mem['separate_checkpoint_bytes'])}** "
              f"(ratio {analysis.get('memory_ratio_nested_over_separate', 0):.2f}; paper Table 3: 58.9 GB vs "
              f"126.1 GB = 0.47, spec §10).", ""]
        if mem.get("files"):
            L += ["| file | size |", "|---|---|"] + [f"| {k} | {_mb(v)} |" for k, v in mem["files"].items()] + [""]
    # ---- budget control
    grid = results.get("grid", [])
    if grid:
        L += ["## Budget control vs thinking-token truncation (spec §9)", "",
              f"Thinking budgets: {results.get('grid_budgets')}. Latency: wall-clock seconds to run the whole eval "
              "set as one batch, thinking phase + answering phase (the answering model re-prefills prompt + trace "
              "when it differs from the thinking model; the truncation baseline continues from its own cache). "
              "FLOPs: analytic (2 x active params per token + attention).", "",
              "| scheme | think -> answer | thinking budget | accuracy | latency (s) | think / answer (s) | "
              "mean thinking tokens | forced </think> | GFLOPs |",
              "|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(grid, key=lambda p: (p["scheme"], p["think_model"], p["answer_model"], p["thinking_budget"])):
            L.append(f"| {p['scheme']} | {p['think_model']} -> {p['answer_model']} | {p['thinking_budget']} | "
                     f"{p['accuracy']:.3f} | {p['latency_s']:.3f} | {p['think_latency_s']:.3f} / "
                     f"{p['answer_latency_s']:.3f} | {p['mean_thinking_tokens']:.1f} | {p['forced_frac']:.2f} | "
                     f"{p['flops'] / 1e9:.3f} |")
        L.append("")
        for s, front in analysis.get("frontiers", {}).items():
            L.append(f"- Pareto frontier of **{s}**: {', '.join(front)}")
        L.append("")
        d = analysis.get("budget_control_vs_truncation")
        if d:
            L += [f"Budget-control frontier points that dominate truncation-frontier points "
                  f"({100 * d['baseline_dominated_frac']:.0f}% of the truncation frontier is dominated):"]
            L += [f"- {w['point']} dominates {', '.join(w['dominates'])}" for w in d["dominating"]] or ["- none"]
            L += [f"Truncation-frontier points no budget-control point dominates: "
                  f"{', '.join(d['baseline_undominated']) or 'none'}."]
            r = analysis.get("truncation_vs_budget_control")
            L += [f"Conversely, {100 * r['baseline_dominated_frac']:.0f}% of the budget-control frontier is "
                  f"dominated by truncation points.", ""]
        m = analysis.get("matched_latency")
        if m:
            L += ["Accuracy at matched latency (best budget-control point no slower than each truncation frontier "
                  "point):", "", "| truncation point | its accuracy | latency (s) | best budget control | its accuracy |",
                  "|---|---|---|---|---|"]
            L += [f"| {r['truncation']} | {r['truncation_accuracy']:.3f} | {r['latency_s']:.3f} | "
                  f"{r['best_budget_control'] or 'none'} | {_fmt(r['best_budget_control_accuracy'])} |" for r in m]
            L.append("")
        if any(p["scheme"] == "transplant" for p in grid):
            L += ["Cache transplant (B continues from A's caches, no re-prefill) is an approximation, reported "
                  "separately; its latency is measured on the masked (unsliced) views, so compare its accuracy "
                  "with the matching budget-control rows rather than its latency.", ""]
    if results.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOTS] + [""]
    if results.get("config"):
        L += ["## Config", "", "```json", json.dumps(results["config"], indent=1, default=str)[:6000], "```", ""]
    return "\n".join(L)


def write_report(results: dict, out_dir: str) -> dict:
    """Write results.json, report.md and the PNG plots into `out_dir`. Returns {name: path}."""
    if not isinstance(results, dict) or not results.get("nested"):
        raise ValueError("report: the results hold no evaluated models ('nested' is empty); nothing to report")
    os.makedirs(out_dir, exist_ok=True)
    results = dict(results)
    results["analysis"] = analyze(results)
    paths = {"results.json": os.path.join(out_dir, "results.json"), "report.md": os.path.join(out_dir, "report.md")}
    with open(paths["results.json"], "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    plot_pareto(results, os.path.join(out_dir, "pareto.png"))
    plot_training(results, os.path.join(out_dir, "training_curves.png"))
    plot_accuracy(results, os.path.join(out_dir, "accuracy_per_budget.png"))
    for p in PLOTS:
        paths[p] = os.path.join(out_dir, p)
    with open(paths["report.md"], "w") as f:
        f.write(render_markdown(results, results["analysis"]))
    return paths


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
