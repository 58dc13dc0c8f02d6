"""The report's statistics (issue 15): bootstrap intervals, the eval size for +-2 points, the
per-phase verdict from the gold-trace diagnostics, and the tokens-to-match multiple."""
import numpy as np
import pytest

from elastic_jax.eval.report import tokens_to_match, verdict
from elastic_jax.eval.stats import bootstrap_ci, bootstrap_diff_ci, half_width, problems_needed


def test_bootstrap_intervals_cover_and_pair():
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.8).astype(float)
    lo, hi = bootstrap_ci(a)
    assert lo < a.mean() < hi and 0.05 < hi - lo < 0.1            # ~ +-0.04 at p=0.8, n=400
    assert hi - lo == pytest.approx(2 * half_width(a.mean(), 400), rel=0.15)
    b = a.copy()
    b[:20] = 1 - b[:20]                                             # paired: only 20 rows differ
    dlo, dhi = bootstrap_diff_ci(a, b)
    assert dhi - dlo < 0.5 * (hi - lo)
    assert problems_needed(0.97) == 280 and problems_needed(0.5) == 2401
    with pytest.raises(ValueError, match="no scores"):
        bootstrap_ci([])


def _nested(gold_full, gold_small, trace_full, trace_small, n=300, seed=0):
    rng = np.random.default_rng(seed)
    row = lambda name, g, t: {"name": name, "accuracy": g, "exact_trace": t, "accuracy_gold_trace": g,
                              "scores_gold_trace": list((rng.random(n) < g).astype(float))}
    return {"nested": [row("100%", gold_full, trace_full), row("50%", gold_small, trace_small)]}


def test_verdict_needs_an_answer_gap_and_a_small_trace_gap():
    v = verdict(_nested(0.95, 0.60, 0.90, 0.85))
    assert v["testable"] and v["answer_gap_ci"][0] > 0.05
    v = verdict(_nested(0.99, 0.98, 0.95, 0.90))                   # the old task: answering is trivial
    assert not v["testable"] and "no clear answer-capacity gap" in v["reason"]
    v = verdict(_nested(0.95, 0.60, 0.90, 0.20))                   # the small model cannot think either
    assert not v["testable"] and "trace-quality gap" in v["reason"]
    assert not verdict({"nested": []})["testable"]


def test_tokens_to_match_interpolates_in_log_tokens():
    rng = np.random.default_rng(1)
    n = 400
    nested = list((rng.random(n) < 0.80).astype(float))
    sweep = [{"multiple": m, "scores": list((rng.random(n) < acc).astype(float))}
             for m, acc in ((0.5, 0.60), (1.0, 0.70), (2.0, 0.78), (4.0, 0.90))]
    r = tokens_to_match(nested, sweep, n_boot=200)
    accs = r["baseline_accuracies"]
    assert accs[2] < r["nested_accuracy"] < accs[3]
    assert 2.0 < r["multiple"] < 4.0
    lo, hi = r["ci"]
    assert (lo if isinstance(lo, float) else 0) <= r["multiple"] <= (hi if isinstance(hi, float) else np.inf)
    # a nested model no baseline reaches: '> 4'
    never = tokens_to_match([1.0] * n, sweep, n_boot=50)
    assert never["multiple"] == "> 4"
    assert tokens_to_match(nested, sweep[:1])["multiple"] is None


def test_verdict_on_partial_credit_scores():
    """The query levels score partial credit: the verdict's interval works on fractional scores."""
    rng = np.random.default_rng(3)
    n = 400
    row = lambda name, scores, t: {"name": name, "exact_trace": t, "accuracy_gold_trace": float(np.mean(scores)),
                                   "scores_gold_trace": list(scores)}
    full = rng.integers(2, 5, n) / 4                                  # ~0.62 mean, in quarters
    small = np.clip(full - rng.integers(0, 2, n) / 4, 0, 1)          # ~0.12 lower
    v = verdict({"nested": [row("100%", full, 0.90), row("50%", small, 0.88)]})
    assert v["testable"] and 0.08 < v["answer_gap"] < 0.16
    v = verdict({"nested": [row("100%", full, 0.90), row("50%", full, 0.90)]})
    assert not v["testable"] and v["answer_gap"] == 0.0


def test_the_grid_may_run_on_the_first_problems_of_a_larger_eval_set():
    """`EvalConfig.grid_problems`: model accuracies on every problem (the +-2-point power), the
    budget-control grid on the first k of the same problems; the report says which."""
    from elastic_jax.eval import EvalConfig
    from elastic_jax.eval.report import _power_md, analyze
    from elastic_jax.tasks import make_eval_set
    es = make_eval_set(0, 12, "test", (13, 14))
    head = es.head(5)
    assert head.problems == es.problems[:5] and head.prompts == es.prompts[:5] and len(head) == 5
    with pytest.raises(ValueError, match="no first 13"):
        es.head(13)
    assert EvalConfig(n_problems=2500, grid_problems=400).grid_problems == 400
    with pytest.raises(ValueError, match="grid_problems"):
        EvalConfig(n_problems=100, grid_problems=200)
    rng = np.random.default_rng(0)
    rows = [{"name": n, "accuracy": a, "scores": list((rng.random(2500) < a).astype(float))}
            for n, a in (("100%", 0.6), ("50%", 0.45))]
    results = {"eval": {"n_problems": 2500, "grid_problems": 400}, "nested": rows}
    text = "\n".join(_power_md(analyze(results)))
    assert "Every interval is within +-2 points" in text
    assert "first 400 of these problems" in text and "+-0.049" in text
    results["eval"]["grid_problems"] = 2500
    assert "first" not in "\n".join(_power_md(analyze(results)))
