"""The run report's PNG plots (matplotlib, Agg backend): accuracy against latency per scheme with
the Pareto frontier (`plot_pareto`), the training curves (`plot_training`), accuracy per budget
against the independent baselines (`plot_accuracy`). Each takes the `results` dict of
`report.write_report` and a path."""
from __future__ import annotations

import numpy as np

from .evaluate import SCHEMES, latency_key, pareto_front
from .stats import bootstrap_ci

SCHEME_STYLE = {"truncation": ("tab:gray", "s", "truncation (one model, thinking cut at the budget)"),
                "budget_control": ("tab:red", "o", "elastic budget control (A thinks, B answers)"),
                "parent_truncation": ("black", "x", "truncation, the parent alone (the paper's baseline)"),
                "transplant": ("tab:blue", "^", "budget control + cache transplant (experiment)")}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False) if matplotlib.get_backend().lower() != "agg" and not _inline() else None
    import matplotlib.pyplot as plt
    return plt


def _inline() -> bool:
    import matplotlib
    return "inline" in matplotlib.get_backend().lower()


def _axis_label(results: dict, x: str) -> str:
    if x == "latency_model_s":
        lat = results.get("latency", {})
        desc = lat.get("targets", {}).get(lat.get("primary"), {}).get("description", lat.get("primary"))
        return f"modeled latency per request (s): {desc}"
    return {"latency_s": "wall-clock latency of the eval set on this machine (s)",
            "flops": "analytic FLOPs of the eval set (re-prefill charged per token)"}[x]


def plot_pareto(results: dict, path: str):
    """Accuracy vs the primary (modeled) latency with 95% intervals on the frontier points, beside
    the same grid against wall clock and FLOPs."""
    plt = _plt()
    grid = results.get("grid", [])
    x0 = latency_key(grid)
    axes_x = [x0] + [k for k in ("latency_s", "flops") if k != x0]
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6.5 * len(axes_x), 5), squeeze=False)
    for ax, x in zip(axes[0], axes_x):
        for s in SCHEMES:
            pts = [p for p in grid if p["scheme"] == s]
            if not pts:
                continue
            color, marker, label = SCHEME_STYLE[s]
            ax.scatter([p[x] for p in pts], [p["accuracy"] for p in pts], c=color, marker=marker, alpha=0.45,
                       s=28, label=label)
            front = [pts[i] for i in pareto_front(pts, x)]
            ax.step([p[x] for p in front], [p["accuracy"] for p in front], where="post", color=color, lw=2)
            for p in front:
                if p.get("correct"):
                    lo, hi = bootstrap_ci(p["correct"], n_boot=500)
                    ax.errorbar([p[x]], [p["accuracy"]], yerr=[[p["accuracy"] - lo], [hi - p["accuracy"]]],
                                color=color, capsize=2, lw=1)
                if x == x0:
                    ax.annotate(p["label"], (p[x], p["accuracy"]), fontsize=6, color=color,
                                xytext=(3, -8), textcoords="offset points")
        ax.set_xlabel(_axis_label(results, x), fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.set_title("primary axis" if x == x0 else "for comparison", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy vs cost: Pareto frontier per scheme, 95% bootstrap intervals (METHOD §9)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
