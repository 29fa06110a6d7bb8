"""Bootstrap intervals, with a fixed generator so the same data always gives the same interval."""

from __future__ import annotations

import numpy as np

N_BOOT = 2000  # bootstrap resamples: enough for stable 2.5/97.5 percentiles of a mean or median
LEVEL = 0.95


def bootstrap_interval(values, stat=np.mean, n_boot: int = N_BOOT, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over the rows of `values` (resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.shape[0] == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    stats = np.asarray([stat(x[i]) for i in idx]) if stat not in (np.mean, np.median) else stat(x[idx], axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    point = float(stat(x))
    # the percentile interval of a discrete statistic can exclude its own point estimate by a hair
    return float(min(lo, point)), float(max(hi, point))


def paired_delta_interval(method_scores, reference_scores, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(method) - mean(reference) resampling examples jointly (the pairing is kept)."""
    d = np.asarray(method_scores, dtype=np.float64) - np.asarray(reference_scores, dtype=np.float64)
    return bootstrap_interval(d, np.mean, seed=seed)
