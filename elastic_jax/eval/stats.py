"""Intervals for accuracies measured on a finite eval set: bootstrap over problems (percentile
intervals), paired for differences measured on the same problems, and the eval-set size a target
interval needs."""
from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
Z95 = 1.959964


def _resample_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(scores, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem `scores` (0/1 or partial credit)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("bootstrap_ci: no scores")
    means = s[_resample_idx(s.size, n_boot, seed)].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_diff_ci(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(a) - mean(b). Same length: paired (the same problems resampled together);
    otherwise the two sets are resampled independently."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_diff_ci: no scores")
    if a.size == b.size:
        idx = _resample_idx(a.size, n_boot, seed)
        diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    else:
        diffs = (a[_resample_idx(a.size, n_boot, seed)].mean(axis=1)
                 - b[_resample_idx(b.size, n_boot, seed + 1)].mean(axis=1))
    q = (1 - level) / 2
    return float(np.quantile(diffs, q)), float(np.quantile(diffs, 1 - q))


def half_width(p: float, n: int) -> float:
    """Normal-approximation 95% half-width of a proportion `p` measured on `n` problems."""
    return Z95 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def problems_needed(p: float, half: float = 0.02) -> int:
    """Problems for a 95% half-width of `half` at accuracy `p` (normal approximation)."""
    return int(math.ceil(Z95 ** 2 * p * (1 - p) / half ** 2))


# ------------------------------------------------------------------------------ seeds x problems (issue 30)
def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(q, df))


def _as_seed_arrays(scores_by_seed) -> list[np.ndarray]:
    out = [np.asarray(s, np.float64).reshape(-1) for s in scores_by_seed]
    if not out or any(s.size == 0 for s in out):
        raise ValueError("hierarchical bootstrap: needs >= 1 seed, each with >= 1 score")
    return out


def _hier_means(seeds: list[np.ndarray], n_boot: int, rng) -> np.ndarray:
    """[n_boot] grand means: resample the S seeds with replacement, then, for every drawn slot, the
    problems of its seed with replacement (independently per slot); the statistic is the mean over
    the S slots of their resampled means."""
    S = len(seeds)
    pick = rng.integers(0, S, size=(n_boot, S))
    within = np.empty((n_boot, S))
    for s, arr in enumerate(seeds):
        within[:, s] = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    # slot j reads its seed's resamples in its own random order: a seed drawn twice gets two resamples
    order = np.stack([rng.permutation(n_boot) for _ in range(S)], axis=1)           # [n_boot, S]
    return within[order, pick].mean(axis=1)


def hierarchical_ci(scores_by_seed, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Interval of the mean accuracy over training seeds x eval problems (`scores_by_seed`: one
    per-problem score array per seed; differences: `hierarchical_diff_ci`).

    The two-stage bootstrap (seeds, then problems within each drawn seed) has variance
    (1/S)·((S-1)/S · s² + v̄) with s² the variance of the seed means and v̄ the mean within-seed
    variance of a seed mean; it counts the problem noise twice (s² already holds it once) and shrinks
    the seed term by (S-1)/S. The standard error removes both biases, SE² = S/(S-1) · (var_boot − v̄/S)
    (floored at v̄/S, the problem noise alone), and the interval is mean ± t_{S-1} · SE: a percentile
    interval over 3-5 seeds under-covers (only S distinct seed means exist). One seed: the problem
    bootstrap's percentile interval, which leaves seed-to-seed variation out (`seeds` = 1 says so).
    Returns {"mean", "ci": [lo, hi], "se", "seeds", "seed_means", "se_problems"} (`se_problems`:
    sqrt(v̄/S), the part of the standard error the eval problems alone would give)."""
    seeds = _as_seed_arrays(scores_by_seed)
    S = len(seeds)
    seed_means = [float(s.mean()) for s in seeds]
    mean = float(np.mean(seed_means))
    if S == 1:
        lo, hi = bootstrap_ci(seeds[0], n_boot=n_boot, seed=seed, level=level)
        se = float(seeds[0].std() / math.sqrt(seeds[0].size))
        return {"mean": mean, "ci": [lo, hi], "se": se, "seeds": 1, "seed_means": seed_means, "se_problems": se}
    boots = _hier_means(seeds, n_boot, np.random.default_rng(seed))
    within = float(np.mean([s.var() / s.size for s in seeds]))                    # v̄
    se = math.sqrt(max(S / (S - 1) * (float(boots.var()) - within / S), within / S))
    t = _t_quantile(1 - (1 - level) / 2, S - 1)
    return {"mean": mean, "ci": [mean - t * se, mean + t * se], "se": se, "seeds": S, "seed_means": seed_means,
            "se_problems": math.sqrt(within / S)}


def hierarchical_diff_ci(a_by_seed, b_by_seed, **kw) -> dict:
    """`hierarchical_ci` of mean(a) - mean(b): per seed, a and b are paired on the same problems
    (equal lengths) and their per-problem differences are resampled together."""
    a, b = _as_seed_arrays(a_by_seed), _as_seed_arrays(b_by_seed)
    if len(a) != len(b) or any(x.size != y.size for x, y in zip(a, b)):
        raise ValueError("hierarchical_diff_ci: a and b need the same seeds and, per seed, the same problems")
    return hierarchical_ci([x - y for x, y in zip(a, b)], **kw)


def simultaneous_diff_ci(a, b, k: int, level: float = 0.95) -> tuple[float, float]:
    """Paired interval of mean(a) - mean(b) at the Bonferroni level 1 - (1 - level) / k: valid for the
    best of `k` compared points (the winner's curse: a maximum over k noisy differences is biased up;
    all k Bonferroni intervals cover together with probability >= level). Normal approximation."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.size != b.size or a.size < 2:
        raise ValueError("simultaneous_diff_ci: needs paired scores (same length >= 2)")
    if k < 1:
        raise ValueError(f"simultaneous_diff_ci: k={k} must be >= 1")
    from scipy.stats import norm
    d = a - b
    z = float(norm.ppf(1 - (1 - level) / (2 * k)))
    se = d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean() - z * se), float(d.mean() + z * se)
