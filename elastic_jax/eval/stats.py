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
