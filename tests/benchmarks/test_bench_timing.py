"""Benchmark (run with `pytest --benchmark-only tests/benchmarks`): the paired timer on real work.

A function doing twice the work of another must measure a speedup near 0.5. Real clocks are noisy, so this
lives in a benchmark, checked loosely, and is never part of the default test run.
"""

from __future__ import annotations

import numpy as np

from bench.timing import TimingRules, paired_timing

A = np.random.default_rng(0).standard_normal((192, 192))


def work(n: int):
    def run():
        for _ in range(n):
            A @ A
    return run


def test_twice_the_work_measures_half_the_speed(benchmark):
    rules = TimingRules(warmup=3, min_time_s=1.0, min_repeats=20, max_repeats=400)
    t = benchmark.pedantic(paired_timing, args=(work(10), work(20), rules), rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=t.speedup, low=t.interval[0], high=t.interval[1], pairs=t.n)
    assert 0.35 < t.speedup < 0.7, (t.speedup, t.interval)
    assert t.interval[0] <= t.speedup <= t.interval[1]
