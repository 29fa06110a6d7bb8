"""Paired measurement: the reference and the method timed in one process, on the same inputs, interleaved.

Rules (after pyperf and asv): warm each arm up, then time pairs until both arms together have run for the
profile's minimum time and at least its minimum number of pairs. The order alternates ABBA so neither arm
always runs first (caches, turbo and thermal drift hit both alike). Each pair gives one ratio
t_reference / t_method; the speedup is the median of those ratios, with a percentile-bootstrap 95% interval.
On a GPU every timed region is bracketed by `torch.cuda.synchronize()`, so queued kernels are counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bench.stats import bootstrap_interval


@dataclass(frozen=True)
class TimingRules:
    warmup: int = 3  # un-timed calls of each arm first
    min_time_s: float = 2.0  # pair until both arms together ran this long...
    min_repeats: int = 10  # ...and at least this many pairs
    max_repeats: int = 200  # hard cap on pairs


@dataclass(frozen=True)
class PairedTiming:
    reference_s: np.ndarray  # seconds per call, one per pair
    method_s: np.ndarray
    speedup: float  # median of reference_s / method_s; > 1 means the method is faster
    interval: tuple[float, float]
    synchronized: bool

    @property
    def n(self) -> int:
        return int(self.reference_s.shape[0])


def _iqr(x: np.ndarray) -> float:
    q1, q3 = np.quantile(x, [0.25, 0.75])
    return float(q3 - q1)


def arm_summary(x: np.ndarray) -> dict:
    return {"median_s": float(np.median(x)), "iqr_s": _iqr(x), "n": int(x.shape[0])}


def paired_timing(reference: Callable[[], object], method: Callable[[], object], rules: TimingRules,
                  cuda: bool = False, on_pair: Callable[[int, float], None] | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> PairedTiming:
    """Time `reference` and `method` as interleaved pairs under `rules`; see the module docstring."""
    sync = _cuda_sync if cuda else _no_sync

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t0 = clock()
        fn()
        sync()
        return clock() - t0

    for _ in range(rules.warmup):
        timed(reference)
        timed(method)
    ref_t: list[float] = []
    met_t: list[float] = []
    spent = 0.0
    i = 0
    while i < rules.max_repeats and (i < rules.min_repeats or spent < rules.min_time_s):
        if i % 4 in (0, 3):  # ABBA ABBA ...
            a = timed(reference)
            b = timed(method)
        else:
            b = timed(method)
            a = timed(reference)
        ref_t.append(a)
        met_t.append(b)
        spent += a + b
        i += 1
        if on_pair is not None:
            on_pair(i, spent)
    r, m = np.asarray(ref_t), np.asarray(met_t)
    ratios = r / np.maximum(m, 1e-12)
    lo, hi = bootstrap_interval(ratios, np.median)
    return PairedTiming(r, m, float(np.median(ratios)), (lo, hi), cuda)


def _no_sync() -> None:
    return None


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()
