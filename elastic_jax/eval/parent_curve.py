"""A pre-registered parent (issue 30): the parent's training length set by a convergence rule fixed in
the config before any gap is measured, and the verdict's gap at several parent lengths.

    rule = ParentRule(window=250, min_improvement=0.02)
    converged_step([(250, 1.10), (500, 0.95), (750, 0.94), (1000, 0.93)], rule, cap=1000)
    # -> {"step": 750, "converged": True, ...}: 0.95 - 0.94 < 0.02 over the last 250 steps

The loss curve is the parent's held-out loss on the training distribution (documents of the training
split the run never sees, `heldout_loss`) at its checkpoint snapshots (`TrainConfig.checkpoint_every`);
the parent the rest of the run uses is the snapshot the rule picks (METHOD §3: the parent is given; the
rule only states which one). `parent_curve_markdown` is the report's section: the rule, the curve, and
the gold-trace answer gap 100% - 50% of each snapshot distilled with a short elastic schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config_base import ConfigBase
from .config import VERDICT_MIN_ANSWER_GAP


@dataclass(frozen=True)
class ParentRule(ConfigBase):
    """Stop at the first snapshot whose held-out loss improved by less than `min_improvement` (nats per
    token) over the last `window` steps; train to the cap (the parent run's steps) otherwise.
    `heldout_batches`: batches of the parent's stage shape the loss is measured on (documents of the
    training distribution drawn with another seed, so not the run's own training documents)."""

    window: int = 250
    min_improvement: float = 0.02
    heldout_batches: int = 8

    def __post_init__(self):
        if self.window <= 0:
            self.invalid("window", self.window, "must be > 0 steps")
        if not self.min_improvement >= 0:
            self.invalid("min_improvement", self.min_improvement, "must be >= 0 (nats per token)")
        if self.heldout_batches <= 0:
            self.invalid("heldout_batches", self.heldout_batches, "must be > 0")


def converged_step(curve, rule: ParentRule, cap: int) -> dict:
    """`curve`: [(step, held-out loss)] at the snapshots (any order; steps > 0). The first snapshot
    step s with loss(s - window) - loss(s) < min_improvement (both measured), else `cap`. Returns
    {"step", "converged", "reason", "curve"}."""
    pts = sorted((int(s), float(l)) for s, l in curve)
    if not pts:
        raise ValueError("converged_step: an empty loss curve")
    if any(not math.isfinite(l) for _, l in pts):
        raise ValueError(f"converged_step: a non-finite held-out loss in {pts}")
    loss = dict(pts)
    for s, l in pts:
        prev = loss.get(s - rule.window)
        if prev is not None and prev - l < rule.min_improvement:
            return {"step": s, "converged": True, "curve": pts,
                    "reason": f"held-out loss improved {prev - l:+.4f} < {rule.min_improvement} over steps "
                              f"{s - rule.window}-{s}"}
    return {"step": int(cap), "converged": False, "curve": pts,
            "reason": f"still improving by >= {rule.min_improvement} per {rule.window} steps at the cap ({cap} steps): "
                      "the parent is not converged by the rule's standard"}


def heldout_loss(params, cfg, batches) -> float:
    """Mean next-token cross-entropy (nats per token) of the model on `batches` ({"tokens",
    "segment_ids"} [B, L]), over the positions that predict a token of the same document."""
    import jax
    import jax.numpy as jnp
    from ..model import forward
    from ..train.losses import next_token_targets

    @jax.jit
    def sums(p, tokens, seg):
        logits = forward(p, tokens, cfg, segment_ids=seg)
        tgt, mask = next_token_targets(tokens, seg)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        m = mask.astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum(m)
    tot = cnt = 0.0
    for b in batches:
        s, c = sums(params, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]))
        tot, cnt = tot + float(s), cnt + float(c)
    return tot / max(cnt, 1.0)


def parent_curve_markdown(results: dict) -> list[str]:
    """The report's section: the pre-registered rule, each seed's held-out loss curve and stopping step,
    and the gap-vs-parent-steps curve; [] when the run recorded neither."""
    pr = results.get("parent_rule")
    curve = results.get("parent_curve") or []
    if not pr and not curve:
        return []
    L = ["## The parent: a pre-registered length and the gap vs parent steps", ""]
    if pr:
        r = pr["rule"]
        L += [f"Rule (fixed in the config before any gap was measured): stop at the first snapshot whose held-out "
              f"loss (next-token CE on {r['heldout_batches']} batches of unseen documents of the training distribution) "
              f"improved by less than {r['min_improvement']} nats over the last {r['window']} steps; otherwise train "
              f"to the cap of {pr['cap']} steps.", "",
              "| seed | held-out loss at snapshots | parent used (steps) | why |", "|---|---|---|---|"]
        for s in pr["seeds"]:
            L.append(f"| {s['seed']} | {', '.join(f'{st}: {l:.4f}' for st, l in s['curve'])} | {s['step']} | "
                     f"{s['reason']} |")
        L.append("")
    if curve:
        L += ["Gap vs parent steps (seed 0's parent snapshots, each permuted by its own importance and elastified "
              f"with the schedule {curve[0].get('schedule', '')}; gold-trace answer accuracy, 95% bootstrap over "
              "problems):", "",
              "| parent steps | parent | nested 100% | nested 50% | gap 100% - 50% [95% CI] | clears the bar |",
              "|---|---|---|---|---|---|"]
        for c in curve:
            lo, hi = c["gap_ci"]
            L.append(f"| {c['steps']} | {c['parent']:.3f} | {c['full']:.3f} | {c['small']:.3f} | "
                     f"{c['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {'yes' if lo >= VERDICT_MIN_ANSWER_GAP else 'no'} |")
        L += ["", "The verdict holds only where the gap's lower bound clears the bar: it is a property of the "
                  "models this run trained, at these parent lengths, not of the task at convergence.", ""]
    return L


def gap_row(steps: int, parent_scores, full_scores, small_scores, schedule: str) -> dict:
    """One row of the gap-vs-parent-steps curve from per-problem gold-trace scores."""
    from .stats import bootstrap_diff_ci
    f, s = np.asarray(full_scores, float), np.asarray(small_scores, float)
    return {"steps": int(steps), "parent": float(np.mean(parent_scores)), "full": float(f.mean()),
            "small": float(s.mean()), "gap": float(f.mean() - s.mean()), "gap_ci": list(bootstrap_diff_ci(f, s)),
            "schedule": schedule}
