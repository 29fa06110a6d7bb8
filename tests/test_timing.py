"""The paired timer's rules, checked with a fake clock so nothing here depends on the machine's speed."""

from __future__ import annotations

import numpy as np
import pytest

from bench.stats import bootstrap_interval
from bench.timing import TimingRules, paired_timing


class FakeClock:
    """A clock that advances only when a timed function 'runs' for its declared cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, cost: float):
        def run():
            self.calls.append(name)
            self.now += cost
        return run


def test_known_ratio_and_abba_order():
    clock = FakeClock()
    rules = TimingRules(warmup=2, min_time_s=1.0, min_repeats=4, max_repeats=100)
    t = paired_timing(clock.fn("A", 0.02), clock.fn("B", 0.01), rules, clock=clock)
    assert t.speedup == pytest.approx(2.0) and t.interval == pytest.approx((2.0, 2.0))
    assert clock.calls[:4] == ["A", "B", "A", "B"]  # warm-up
    assert clock.calls[4:12] == ["A", "B", "B", "A", "B", "A", "A", "B"]  # ABBA order, pair by pair
    assert t.n == int(np.ceil(1.0 / 0.03 - 1e-9))  # stops as soon as the minimum time is reached


def test_min_and_max_repeats_bound_the_pairs():
    clock = FakeClock()
    t = paired_timing(clock.fn("A", 10.0), clock.fn("B", 10.0), TimingRules(0, 1.0, 5, 50), clock=clock)
    assert t.n == 5  # min_time reached at once, min_repeats still honoured
    clock = FakeClock()
    t = paired_timing(clock.fn("A", 1e-6), clock.fn("B", 1e-6), TimingRules(0, 1.0, 5, 7), clock=clock)
    assert t.n == 7


def test_interval_contains_the_median_and_is_reproducible():
    rng = np.random.default_rng(0)
    x = rng.lognormal(0, 0.1, size=60)
    a, b = bootstrap_interval(x, np.median), bootstrap_interval(x, np.median)
    assert a == b and a[0] <= np.median(x) <= a[1]


def test_bootstrap_needs_data():
    with pytest.raises(ValueError):
        bootstrap_interval([], np.mean)
