"""Paired measurement: the reference and the method timed in one process, on the same inputs, interleaved,
until the speedup is known to the profile's precision, with a verdict on whether the figure can be trusted.

Rules (after pyperf and asv):
- Warm each arm up, then time pairs. The order alternates ABBA so neither arm always runs first (caches, turbo
  and thermal drift hit both alike). Each pair gives one ratio r_i = t_reference,i / t_method,i; the speedup is
  the median of the r_i, with a percentile-bootstrap 95% interval [lo, hi].
- Pairs continue past the minimum time and count until the interval's relative half-width
  (hi - lo) / (2 * speedup) is within the profile's precision target, or the attempt's time cap is reached.
- While pairs run, `bench.contention.Monitor` measures what else used the machine (other processes' share of
  the cores, steal time; on a GPU, other processes and SM clocks).
- The verdict: `ok`, or `unreliable` with every reason that applies: contended (others used more than the
  profile's `max_other_share` of the cores, or the GPU had other processes), imprecise (target not reached),
  unstable (the median ratio of the first and second half of the pairs differ by more than twice the target:
  warm-up not finished, or the machine changed under us).
- An unreliable attempt is retried, timing only, after waiting (at most `quiet_wait_s`) for a quiet second, up
  to `attempts` times; the first `ok` attempt is kept, else the least contended one, marked unreliable.
- Several worker processes (`pool`) pool their pairs; the interval is then a two-stage bootstrap (processes,
  then pairs within each), so it covers the between-process variation that one process's pairs cannot see.
  Stability is then judged within each process (`bench.speed.time_in_workers` adds processes until the pooled
  interval meets the target).
On a GPU every timed region is bracketed by `torch.cuda.synchronize()`, so queued kernels are counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from bench.contention import Monitor, Window, idle_share
from bench.stats import LEVEL, N_BOOT, bootstrap_interval


@dataclass(frozen=True)
class TimingRules:
    warmup: int = 3  # un-timed calls of each arm first
    min_time_s: float = 2.0  # pair until both arms together ran this long...
    min_repeats: int = 10  # ...and at least this many pairs
    max_repeats: int = 200  # hard cap on pairs
    precision: float = 0.03  # then go on until the 95% interval's half-width is within 3% of the speedup...
    max_time_s: float = 120.0  # ...or both arms together ran this long (one attempt)
    attempts: int = 3  # tries of an unreliable timing (timing only: nothing retrains)
    max_other_share: float = 0.10  # other processes may use at most this share of the cores while we time
    quiet_wait_s: float = 60.0  # before a retry, wait at most this long for a quiet second


@dataclass(frozen=True)
class PairedTiming:
    reference_s: np.ndarray  # seconds per call, one per pair
    method_s: np.ndarray
    speedup: float  # median of reference_s / method_s; > 1 means the method is faster
    interval: tuple[float, float]
    synchronized: bool
    window: Window | None = None  # contention during the timed pairs
    groups: np.ndarray | None = None  # worker process of each pair, when pooled

    @property
    def n(self) -> int:
        return int(self.reference_s.shape[0])

    @property
    def ratios(self) -> np.ndarray:
        return self.reference_s / np.maximum(self.method_s, 1e-12)

    @property
    def precision(self) -> float:
        """Relative half-width of the interval: (hi - lo) / (2 * speedup)."""
        return half_width(self.speedup, self.interval)


@dataclass
class SpeedMeasurement:
    """The timing that is published, its verdict, and every attempt made."""
    timing: PairedTiming
    status: str  # "ok" or "unreliable"
    reasons: list[str]
    attempts: list[tuple[PairedTiming, str, list[str]]] = field(default_factory=list)
    processes: int = 1


def half_width(speedup: float, interval: tuple[float, float]) -> float:
    return (interval[1] - interval[0]) / (2 * speedup) if speedup > 0 else float("inf")


def _iqr(x: np.ndarray) -> float:
    q1, q3 = np.quantile(x, [0.25, 0.75])
    return float(q3 - q1)


def arm_summary(x: np.ndarray) -> dict:
    return {"median_s": float(np.median(x)), "iqr_s": _iqr(x), "n": int(x.shape[0])}


def _check_every(n: int) -> int:
    """How often (in pairs) the precision is recomputed: the bootstrap costs ~n ms, so not after every pair."""
    return max(1, n // 8)


def paired_timing(reference: Callable[[], object], method: Callable[[], object], rules: TimingRules,
                  cuda: bool = False, on_pair: Callable[[int, float], None] | None = None,
                  clock: Callable[[], float] = time.perf_counter, monitor: Monitor | None = None) -> PairedTiming:
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
    next_check = rules.min_repeats
    precise = False
    if monitor is not None:
        monitor.start()
    while i < rules.max_repeats:
        if i >= rules.min_repeats and spent >= rules.min_time_s:
            if precise or spent >= rules.max_time_s:
                break
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
        if monitor is not None and i % 4 == 0:
            monitor.sample()
        if i >= next_check and spent >= rules.min_time_s:
            r = np.asarray(ref_t) / np.maximum(np.asarray(met_t), 1e-12)
            precise = half_width(float(np.median(r)), bootstrap_interval(r, np.median)) <= rules.precision
            next_check = i + _check_every(i)
        if on_pair is not None:
            on_pair(i, spent)
    window = monitor.stop() if monitor is not None else None
    r, m = np.asarray(ref_t), np.asarray(met_t)
    ratios = r / np.maximum(m, 1e-12)
    lo, hi = bootstrap_interval(ratios, np.median)
    return PairedTiming(r, m, float(np.median(ratios)), (lo, hi), cuda, window)


def verdict(t: PairedTiming, rules: TimingRules) -> tuple[str, list[str]]:
    """("ok" | "unreliable", reasons): see the module docstring."""
    reasons: list[str] = []
    w = t.window
    if w is not None:
        if w.other_cpu_share is not None and w.other_cpu_share > rules.max_other_share:
            reasons.append(f"contended: other processes used {w.other_cpu_share:.0%} of the {w.cpus} CPUs while "
                           f"it was timed (limit {rules.max_other_share:.0%})")
        if w.steal_share is not None and w.steal_share > rules.max_other_share:
            reasons.append(f"contended: the hypervisor stole {w.steal_share:.0%} of the CPU time "
                           f"(limit {rules.max_other_share:.0%})")
        if w.gpu.get("other_processes"):
            reasons.append(f"contended: {w.gpu['other_processes']} other process(es) on the GPU")
    if t.precision > rules.precision:
        reasons.append(f"imprecise: the 95% interval is +-{t.precision:.1%} of the speedup after {t.n} pairs; the "
                       f"target is +-{rules.precision:.1%}")
    # Halves are compared within each worker process: the spread between processes is already in a pooled
    # interval, and is no sign of an unfinished warm-up.
    # Each process then timed to the looser target `split_rules` gave it, and is judged by that target.
    groups = [t.ratios] if t.groups is None else [t.ratios[t.groups == g] for g in np.unique(t.groups)]
    limit = 2 * rules.precision * (len(groups) ** 0.5 if t.groups is not None else 1.0)
    for k, ratios in enumerate(groups):
        if ratios.shape[0] < 8:
            continue
        half = ratios.shape[0] // 2
        first, second = float(np.median(ratios[:half])), float(np.median(ratios[half:]))
        if abs(second - first) / t.speedup > limit:
            where = f" of worker process {k + 1}" if t.groups is not None else ""
            reasons.append(f"unstable: the speedup moved from {first:.3g}x in the first half of the pairs{where} "
                           f"to {second:.3g}x in the second (warm-up not finished, or the machine changed)")
            break
    return ("unreliable" if reasons else "ok"), reasons


def wait_for_quiet(rules: TimingRules, probe: Callable[[], float | None] = idle_share,
                   clock: Callable[[], float] = time.monotonic) -> float | None:
    """Probe one-second windows until others use at most `max_other_share` of the cores, for at most
    `quiet_wait_s`; the last share seen (None where it cannot be measured)."""
    deadline = clock() + rules.quiet_wait_s
    share = probe()
    while share is not None and share > rules.max_other_share and clock() < deadline:
        share = probe()
    return share


def measure(time_once: Callable[[int], PairedTiming], rules: TimingRules,
            on_retry: Callable[[int, list[str]], None] | None = None,
            quiet: Callable[[TimingRules], float | None] = wait_for_quiet) -> SpeedMeasurement:
    """Attempts of `time_once(attempt)` until one is `ok` (at most `rules.attempts`), waiting for a quiet
    machine before each retry; the published timing is the first ok one, else the least contended."""
    attempts: list[tuple[PairedTiming, str, list[str]]] = []
    for a in range(max(1, rules.attempts)):
        if a:
            if on_retry is not None:
                on_retry(a, attempts[-1][2])
            quiet(rules)
        t = time_once(a)
        status, reasons = verdict(t, rules)
        attempts.append((t, status, reasons))
        if status == "ok":
            break

    def badness(x: tuple[PairedTiming, str, list[str]]) -> tuple:
        w = x[0].window
        share = w.other_cpu_share if w is not None and w.other_cpu_share is not None else 0.0
        return (x[1] != "ok", round(share, 2), x[0].precision)

    best = min(attempts, key=badness)
    return SpeedMeasurement(best[0], best[1], best[2], attempts)


def pool(timings: list[PairedTiming], seed: int = 0, n_boot: int = N_BOOT, level: float = LEVEL) -> PairedTiming:
    """Pairs of several worker processes as one timing. The speedup is the median of all ratios; its interval
    a two-stage bootstrap: resample the processes, then the pairs within each chosen process, and take the
    median of the resampled pairs, so between-process variation widens the interval."""
    if len(timings) == 1:
        return timings[0]
    rng = np.random.default_rng(seed)
    ratios = [t.ratios for t in timings]
    k = len(ratios)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        chosen = rng.integers(0, k, size=k)
        stats[b] = np.median(np.concatenate([ratios[c][rng.integers(0, ratios[c].shape[0], ratios[c].shape[0])]
                                             for c in chosen]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    allr = np.concatenate(ratios)
    point = float(np.median(allr))
    windows = [t.window for t in timings if t.window is not None]
    return PairedTiming(np.concatenate([t.reference_s for t in timings]),
                        np.concatenate([t.method_s for t in timings]), point,
                        (float(min(lo, point)), float(max(hi, point))), timings[0].synchronized,
                        _worst(windows) if windows else None,
                        np.concatenate([np.full(t.n, i) for i, t in enumerate(timings)]))


def _worst(windows: list[Window]) -> Window:
    """One window for several: the largest share others took in any of them, over their whole time."""
    def mx(name: str):
        vals = [getattr(w, name) for w in windows if getattr(w, name) is not None]
        return max(vals) if vals else None

    gpu: dict = {}
    for w in windows:
        for k, v in w.gpu.items():
            gpu[k] = min(gpu.get(k, v), v) if k == "sm_clock_mhz_min" else max(gpu.get(k, v), v)
    return replace(windows[0], wall_s=sum(w.wall_s for w in windows), other_cpu_share=mx("other_cpu_share"),
                   steal_share=mx("steal_share"), own_cpu_share=mx("own_cpu_share"),
                   load_average_1m=mx("load_average_1m"), gpu=gpu)


def split_rules(rules: TimingRules, processes: int) -> TimingRules:
    """What each of `processes` workers times so that together they spend what one process would."""
    if processes <= 1:
        return rules
    return replace(rules, min_time_s=rules.min_time_s / processes,
                   min_repeats=max(4, -(-rules.min_repeats // processes)),
                   max_repeats=max(4, -(-rules.max_repeats // processes)),
                   max_time_s=rules.max_time_s / processes,
                   precision=rules.precision * processes ** 0.5)  # each part needs only ~sqrt(k) of the pooled width


def _no_sync() -> None:
    return None


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()
