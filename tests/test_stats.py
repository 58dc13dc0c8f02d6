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
