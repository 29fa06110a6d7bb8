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


# --- precision target, verdict, retries, pooling ------------------------------------------------------------

from bench.contention import Monitor, StatSample, Window  # noqa: E402
from bench.timing import measure, pool, split_rules, verdict, wait_for_quiet  # noqa: E402


class NoisyClock(FakeClock):
    """Calls whose cost is multiplied by lognormal noise of relative size `sigma`."""

    def __init__(self, sigma: float, seed: int = 0):
        super().__init__()
        self.rng = np.random.default_rng(seed)
        self.sigma = sigma

    def fn(self, name: str, cost: float):
        def run():
            self.calls.append(name)
            self.now += cost * float(self.rng.lognormal(0, self.sigma))
        return run


def test_pairs_continue_until_the_precision_target():
    loose = TimingRules(warmup=0, min_time_s=0.1, min_repeats=10, max_repeats=2000, precision=0.5, max_time_s=1e9)
    tight = TimingRules(warmup=0, min_time_s=0.1, min_repeats=10, max_repeats=2000, precision=0.01, max_time_s=1e9)
    a = NoisyClock(0.1)
    t_loose = paired_timing(a.fn("A", 0.02), a.fn("B", 0.01), loose, clock=a)
    b = NoisyClock(0.1)
    t_tight = paired_timing(b.fn("A", 0.02), b.fn("B", 0.01), tight, clock=b)
    assert t_loose.n == 10  # the minimum already meets a loose target
    assert t_tight.n > 100 and t_tight.precision <= 0.01  # a tight one takes many more pairs, and is met
    assert t_tight.speedup == pytest.approx(2.0, rel=0.03)


def test_the_time_cap_ends_an_attempt_that_cannot_reach_its_target():
    c = NoisyClock(0.5)
    rules = TimingRules(warmup=0, min_time_s=0.1, min_repeats=10, max_repeats=100000, precision=0.001,
                        max_time_s=3.0)
    t = paired_timing(c.fn("A", 0.02), c.fn("B", 0.01), rules, clock=c)
    spent = float(t.reference_s.sum() + t.method_s.sum())
    assert 3.0 <= spent < 3.0 + 0.2 and t.precision > 0.001
    status, reasons = verdict(t, rules)
    assert status == "unreliable" and any(r.startswith("imprecise") for r in reasons)


class FakeStat:
    """/proc/stat and our own CPU time as the test says: others add `other` busy seconds per wall second."""

    def __init__(self, clock, cpus: int = 2, other: float = 0.0, steal: float = 0.0):
        self.clock, self.cpus, self.other, self.steal = clock, cpus, other, steal

    def stat(self) -> StatSample:
        t = self.clock()
        own = self.own()
        return StatSample(busy=own + self.other * t, steal=self.steal * t, total=self.cpus * t)

    def own(self) -> float:
        return self.clock()  # our process keeps one core busy while it times


def timed_with(other: float, steal: float = 0.0, sigma: float = 0.0, rules: TimingRules | None = None):
    c = NoisyClock(sigma) if sigma else FakeClock()
    fs = FakeStat(c, other=other, steal=steal)
    rules = rules or TimingRules(warmup=0, min_time_s=1.0, min_repeats=10, max_repeats=400)
    t = paired_timing(c.fn("A", 0.02), c.fn("B", 0.01), rules, clock=c,
                      monitor=Monitor(cpus=2, read_stat=fs.stat, read_self=fs.own, clock=c))
    return t, rules


def test_contention_is_measured_from_proc_stat_against_our_own_cpu_time():
    t, rules = timed_with(other=0.0)
    assert t.window.other_cpu_share == pytest.approx(0.0) and t.window.own_cpu_share == pytest.approx(0.5)
    assert verdict(t, rules) == ("ok", [])
    t, rules = timed_with(other=1.0)  # a busy process holding one of the two cores
    assert t.window.other_cpu_share == pytest.approx(0.5)
    status, reasons = verdict(t, rules)
    assert status == "unreliable" and reasons[0].startswith("contended: other processes used 50% of the 2 CPUs")
    t, rules = timed_with(other=0.0, steal=0.6)
    assert t.window.steal_share == pytest.approx(0.3)
    assert verdict(t, rules)[0] == "unreliable" and "stole 30%" in verdict(t, rules)[1][0]
    t, rules = timed_with(other=0.15)  # 7.5% of two cores: under the 10% limit
    assert verdict(t, rules) == ("ok", [])


def test_a_drift_between_the_halves_is_unstable():
    c = FakeClock()
    state = {"n": 0}

    def slow_then_fast():
        state["n"] += 1
        c.now += 0.02 if state["n"] <= 25 else 0.012

    rules = TimingRules(warmup=0, min_time_s=0.1, min_repeats=50, max_repeats=50, precision=0.05)
    t = paired_timing(slow_then_fast, c.fn("B", 0.01), rules, clock=c)
    status, reasons = verdict(t, rules)
    assert status == "unreliable" and reasons[-1].startswith("unstable: the speedup moved from 2x")


def fake_window(share: float) -> Window:
    return Window(wall_s=1.0, cpus=2, other_cpu_share=share, steal_share=0.0, own_cpu_share=0.5,
                  load_average_1m=None)


def constant_timing(speedup: float, share: float, n: int = 20):
    from bench.timing import PairedTiming

    r = np.full(n, speedup * 0.01)
    return PairedTiming(r, np.full(n, 0.01), speedup, (speedup, speedup), False, fake_window(share))


def test_an_unreliable_attempt_is_retried_after_a_quiet_window_and_the_ok_one_kept():
    shares = iter([0.5, 0.3, 0.0])
    waited = []
    rules = TimingRules(attempts=3)
    m = measure(lambda a: constant_timing(2.0 + a, next(shares)), rules,
                quiet=lambda r: waited.append(r) or 0.0)
    assert [s for _, s, _ in m.attempts] == ["unreliable", "unreliable", "ok"]
    assert m.status == "ok" and m.timing.speedup == 4.0 and len(waited) == 2


def test_when_no_attempt_is_ok_the_least_contended_is_published_unreliable():
    shares = iter([0.5, 0.2, 0.4])
    m = measure(lambda a: constant_timing(2.0 + a, next(shares)), TimingRules(attempts=3), quiet=lambda r: 0.0)
    assert m.status == "unreliable" and m.timing.speedup == 3.0 and len(m.attempts) == 3
    assert m.reasons and m.reasons[0].startswith("contended: other processes used 20%")


def test_waiting_for_quiet_is_bounded():
    now = [0.0]

    def probe():
        now[0] += 1.0
        return 0.9

    share = wait_for_quiet(TimingRules(quiet_wait_s=5.0), probe=probe, clock=lambda: now[0])
    assert share == 0.9 and 5.0 <= now[0] <= 7.0
    assert wait_for_quiet(TimingRules(), probe=lambda: 0.01) == 0.01


def test_pooling_processes_widens_the_interval_by_the_between_process_spread():
    from bench.timing import PairedTiming

    rng = np.random.default_rng(1)

    def proc(level: float) -> PairedTiming:
        m = np.full(30, 0.01)
        r = m * level * rng.lognormal(0, 0.005, 30)
        ratios = r / m
        return PairedTiming(r, m, float(np.median(ratios)), bootstrap_interval(ratios, np.median), False)

    same = [proc(2.0) for _ in range(4)]
    spread = [proc(x) for x in (1.9, 2.0, 2.1, 2.0)]
    p_same, p_spread = pool(same), pool(spread)
    width = lambda t: t.interval[1] - t.interval[0]  # noqa: E731
    assert width(p_spread) > 5 * width(p_same)  # processes that disagree widen it; agreeing ones do not
    assert p_spread.n == 120 and list(np.unique(p_spread.groups)) == [0, 1, 2, 3]
    one = pool([same[0]])
    assert one is same[0]


def test_split_rules_share_the_work_between_processes():
    r = TimingRules(min_time_s=2.0, min_repeats=10, max_repeats=200, max_time_s=120.0, precision=0.03)
    s = split_rules(r, 4)
    assert (s.min_time_s, s.min_repeats, s.max_repeats, s.max_time_s) == (0.5, 4, 50, 30.0)
    assert s.precision == pytest.approx(0.06) and split_rules(r, 1) is r


def _process(level: float, rng, n: int = 30, noise: float = 0.005):
    from bench.timing import PairedTiming

    m = np.full(n, 0.01)
    r = m * level * rng.lognormal(0, noise, n)
    ratios = r / m
    return PairedTiming(r, m, float(np.median(ratios)), bootstrap_interval(ratios, np.median), False)


def test_a_pooled_timing_is_judged_stable_within_each_process():
    """Processes that disagree widen the interval; they are no sign of an unfinished warm-up."""
    rng = np.random.default_rng(2)
    pooled = pool([_process(x, rng) for x in (1.9, 2.1, 2.0)])
    _, reasons = verdict(pooled, TimingRules(precision=0.1))
    assert not any(r.startswith("unstable") for r in reasons)
    drifting = _process(2.0, rng)
    drift = np.r_[np.full(15, 1.0), np.full(15, 1.5)]  # the second half of one process runs 50% slower
    drifting = type(drifting)(drifting.reference_s * drift, drifting.method_s, 2.0, drifting.interval, False)
    _, reasons = verdict(pool([_process(2.0, rng), drifting]), TimingRules(precision=0.1))
    assert any(r.startswith("unstable") and "worker process 2" in r for r in reasons)


@pytest.mark.parametrize("levels, want", [
    ((2.0, 2.0, 2.0), "3"),  # agreeing processes: the minimum is enough
    ((1.8, 2.2) + (2.0,) * 8, "more"),  # two disagree: processes are added until the pooled interval is precise
    ((1.8, 2.2) * 5, "cap"),  # they never agree: added up to the cap (3 x processes), then unreliable
])
def test_workers_are_added_until_the_pooled_interval_meets_the_target(monkeypatch, levels, want):
    import bench.speed as speed
    from bench.progress import Reporter

    rng = np.random.default_rng(3)
    queue = [_process(x, rng) for x in levels]
    monkeypatch.setattr(speed, "_worker_timing", lambda spec: queue.pop(0))
    spec = speed.RunSpec("t", "m", {}, "cpu", 0)
    rules = TimingRules(precision=0.03, attempts=1, max_time_s=1e9)
    m = speed.time_in_workers(spec, rules, 3, Reporter())
    if want == "3":
        assert m.processes == 3 and m.status == "ok"
    elif want == "more":
        assert 3 < m.processes < 9 and m.timing.precision <= 0.03 and m.status == "ok"
    else:
        assert m.processes == 9 and m.timing.precision > 0.03 and m.status == "unreliable"
