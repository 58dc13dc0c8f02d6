"""Intervals over seeds x problems (issue 30): the hierarchical bootstrap covers the true mean at the
nominal rate on synthetic data with a known seed variance; the single-seed interval does not; the
Bonferroni interval of a best-of-k pick covers where the plain one does not."""
import numpy as np
import pytest

from elastic_jax.eval.stats import (bootstrap_ci, hierarchical_ci, hierarchical_diff_ci, simultaneous_diff_ci)

MU, SEED_SD, N_PROBLEMS = 0.55, 0.08, 300


def _draw(rng, seeds):
    """Per seed a true accuracy mu_s ~ N(MU, SEED_SD^2), then N_PROBLEMS Bernoulli(mu_s) scores."""
    mus = np.clip(rng.normal(MU, SEED_SD, seeds), 0.01, 0.99)
    return [rng.binomial(1, m, N_PROBLEMS).astype(float) for m in mus]


@pytest.mark.parametrize("seeds", [3, 5])
def test_hierarchical_interval_covers_at_the_nominal_rate(seeds):
    rng = np.random.default_rng(seeds)
    reps = 400
    hits_h = hits_flat = 0
    for r in range(reps):
        data = _draw(rng, seeds)
        lo, hi = hierarchical_ci(data, n_boot=300, seed=r)["ci"]
        hits_h += lo <= MU <= hi
        lo, hi = bootstrap_ci(np.concatenate(data), n_boot=300, seed=r)      # problems only, seeds pooled
        hits_flat += lo <= MU <= hi
    cov_h, cov_flat = hits_h / reps, hits_flat / reps
    print(f"{seeds} seeds: hierarchical coverage {cov_h:.3f}, problems-only coverage {cov_flat:.3f}")
    assert 0.91 <= cov_h <= 0.995            # nominal 0.95 (binomial SE over 400 reps ~0.011)
    assert cov_flat < 0.75                   # the seed variance the problems-only interval leaves out


def test_hierarchical_ci_details():
    data = [np.ones(10), np.zeros(10), np.ones(10)]
    out = hierarchical_ci(data, n_boot=200)
    assert out["seeds"] == 3 and out["mean"] == pytest.approx(2 / 3) and out["seed_means"] == [1.0, 0.0, 1.0]
    assert out["ci"][0] < 0 and out["ci"][1] > 1            # 3 seeds that disagree: a wide interval
    one = hierarchical_ci([np.r_[np.ones(50), np.zeros(50)]], n_boot=500)
    assert one["seeds"] == 1 and one["ci"][0] < 0.5 < one["ci"][1]
    d = hierarchical_diff_ci([np.ones(5), np.ones(5)], [np.zeros(5), np.zeros(5)], n_boot=100)
    assert d["mean"] == 1.0 and d["ci"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="same problems"):
        hierarchical_diff_ci([np.ones(5)], [np.ones(4)])
    with pytest.raises(ValueError, match=">= 1 seed"):
        hierarchical_ci([])


def test_bonferroni_interval_corrects_the_best_of_k_pick():
    """k candidates all exactly as good as the baseline: picking the best by its observed accuracy and
    quoting its plain 95% interval claims a win far more than 5% of the time; the simultaneous one
    does not."""
    rng = np.random.default_rng(0)
    k, n, reps = 20, 400, 300
    plain = corrected = 0
    for _ in range(reps):
        base = rng.binomial(1, 0.5, n).astype(float)
        cands = rng.binomial(1, 0.5, (k, n)).astype(float)
        best = cands[np.argmax(cands.mean(1))]
        plain += simultaneous_diff_ci(best, base, 1)[0] > 0
        corrected += simultaneous_diff_ci(best, base, k)[0] > 0
    print(f"false wins: plain {plain / reps:.3f}, Bonferroni {corrected / reps:.3f}")
    assert plain / reps > 0.15 and corrected / reps <= 0.07
    with pytest.raises(ValueError, match="paired"):
        simultaneous_diff_ci([1.0, 0.0], [1.0], 2)


def test_combine_seeds_reads_several_runs_with_seed_level_intervals(tmp_path):
    """Three synthetic seed runs whose 50% model differs by seed: the combined gap interval holds the
    seed spread (wider than any one run's), and the markdown / script report it."""
    import json
    import subprocess
    import sys
    from elastic_jax.eval.seeds import combine_seeds, seeds_markdown
    rng = np.random.default_rng(0)
    runs = []
    for s, small in enumerate((0.30, 0.45, 0.55)):
        row = lambda name, p: {"name": name, "accuracy": p, "params": 1, "active_params": 1, "exact_trace": 0.96,
                               "scores": list(rng.binomial(1, p, 200).astype(float)),
                               "scores_gold_trace": list(rng.binomial(1, p, 200).astype(float))}
        runs.append({"parent": row("parent", 0.65), "nested": [row("100%", 0.62), row("50%", small)],
                     "baselines": [row("50%", small - 0.05)]})
    c = combine_seeds(runs)
    g = c["verdict"]["answer_gap"]
    assert c["seeds"] == 3 and len(g["seed_means"]) == 3
    one = hierarchical_ci([np.asarray(runs[0]["nested"][0]["scores_gold_trace"])
                           - np.asarray(runs[0]["nested"][1]["scores_gold_trace"])])
    assert g["ci"][1] - g["ci"][0] > 2 * (one["ci"][1] - one["ci"][0])
    assert "50%" in c["nested_minus_baseline"] and "Verdict over seeds" in seeds_markdown(c)
    with pytest.raises(ValueError, match="different numbers"):
        combine_seeds([runs[0], {"parent": {"scores": [1.0]}}])
    dirs = []
    for i, r in enumerate(runs):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(str(d))
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "experiments", "seeds_report.py"), *dirs],
                         capture_output=True, text=True, env=os.environ, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 training seed(s)" in out.stdout
