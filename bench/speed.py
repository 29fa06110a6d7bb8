"""The timing phase of a run, shared by `bench run`, `bench remeasure` and the timing workers.

1. **One timed window at a time per machine.** A file lock (`timing_lock`, at `$BENCH_TIMING_LOCK` or in the
   system's temporary folder) serialises the timing of concurrent runs (`bench sweep --jobs N`, Ray tasks on
   one node, two shells), while their training and evaluation still overlap. The wait is shown as a step.
2. **In this process, or in N fresh ones.** With `processes=1` the pairs are timed here; with N > 1 each of N
   worker processes (`python -m bench.speed SPEC`, one after another) rebuilds the subjects from the cache
   (`prepare`: the method's `apply` finds its student, calibration or solutions cached) and times its share
   of the pairs, and the pairs are pooled with a two-stage bootstrap (`bench.timing.pool`).
3. **A verdict.** `bench.timing.measure` retries unreliable attempts; `speed_record` turns the outcome into the
   record's `speed` block: figures, status and reasons, precision, contention and every attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_ENV = "BENCH_TIMING_LOCK"
MARKER = "BENCH_TIMING_RESULT "

# `--budget smoke` checks that a method runs, not how fast: a few short pairs, one attempt, no precision target
SMOKE_TIMING_RULES = dict(warmup=2, min_time_s=0.5, min_repeats=8, max_repeats=40, precision=0.5, max_time_s=5.0,
                          attempts=1, quiet_wait_s=0.0)


def lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or Path(tempfile.gettempdir()) / "bench-timing.lock")


@contextmanager
def timing_lock(progress=None) -> Iterator[float]:
    """Hold the machine-wide timing lock; yields the seconds spent waiting for it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path()))
    t0 = time.monotonic()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress is not None:
            with progress.step(f"Waiting for another run's timing to finish (lock {lock_path()})"):
                lock.acquire()
        else:
            lock.acquire()
    try:
        yield time.monotonic() - t0
    finally:
        lock.release()


def rules_for(ctx) -> "TimingRules":
    from bench.timing import TimingRules

    return TimingRules(**(ctx.profile.timing.model_dump() if ctx.budget == "full" else SMOKE_TIMING_RULES))


# --- one process ---------------------------------------------------------------------------------------------

def time_here(ref_fn, met_fn, rules, cuda: bool, progress) -> "SpeedMeasurement":
    from bench.contention import GpuMonitor, Monitor
    from bench.timing import measure, paired_timing

    def once(attempt: int):
        label = "Timing reference and method, interleaved" + (f" (attempt {attempt + 1})" if attempt else "")
        with progress.step(label, total=rules.max_repeats) as advance:
            return paired_timing(ref_fn, met_fn, rules, cuda=cuda, on_pair=lambda i, s: advance(1),
                                 monitor=Monitor(gpu=GpuMonitor() if cuda else None))

    def retry(attempt: int, reasons: list[str]) -> None:
        progress.log(f"timing was unreliable ({'; '.join(reasons)}); waiting for a quiet machine to try again")

    return measure(once, rules, on_retry=retry)


# --- N worker processes --------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """What a worker needs to rebuild both subjects: the run's configuration."""
    task: str
    method: str
    hyperparameters: dict[str, Any]
    profile: str
    seed: int
    budget: str = "full"
    rules: dict[str, Any] = field(default_factory=dict)


def time_in_workers(spec: RunSpec, rules, processes: int, progress, max_processes: int | None = None
                    ) -> "SpeedMeasurement":
    """Time in at least `processes` fresh workers, one after another, and pool them (`bench.timing.pool`).
    Between-process spread is part of the pooled interval, so a few processes may not reach the target that
    each one's pairs would: workers are then added, one at a time, until the pooled interval is within the
    target, the attempt's time cap is spent, or `max_processes` (default 3 x processes) have run."""
    from bench.timing import measure, pool, split_rules

    part = split_rules(rules, processes)
    cap = max_processes or 3 * processes

    def once(attempt: int):
        timings: list = []
        spent = 0.0
        while True:
            k = len(timings) + 1
            label = f"Timing in worker process {k} of {processes}" if k <= processes else \
                f"Timing in worker process {k} (the pooled interval is not yet within the target)"
            with progress.step(label + (f" (attempt {attempt + 1})" if attempt else "")):
                t = _worker_timing(RunSpec(**{**asdict(spec), "rules": asdict(part)}))
            timings.append(t)
            spent += float(t.reference_s.sum() + t.method_s.sum())
            if len(timings) >= processes:
                pooled = pool(timings)
                if pooled.precision <= rules.precision or spent >= rules.max_time_s or len(timings) >= cap:
                    return pooled

    m = measure(once, rules, on_retry=lambda a, r: progress.log(f"timing was unreliable ({'; '.join(r)}); "
                                                                 f"waiting for a quiet machine to try again"))
    m.processes = int(m.timing.groups.max()) + 1 if m.timing.groups is not None else 1
    return m


def _worker_timing(spec: RunSpec):
    from bench.worker import environment

    proc = subprocess.run([sys.executable, "-m", "bench.speed", json.dumps(asdict(spec))], capture_output=True,
                          text=True, env=environment())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return _timing_from_json(json.loads(line[len(MARKER):]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"a timing worker exited {proc.returncode} without a timing: " + " | ".join(tail))


def _timing_to_json(t) -> dict:
    return {"reference_s": t.reference_s.tolist(), "method_s": t.method_s.tolist(), "speedup": t.speedup,
            "interval": list(t.interval), "synchronized": t.synchronized,
            "window": asdict(t.window) if t.window is not None else None}


def _timing_from_json(d: dict):
    import numpy as np

    from bench.contention import Window
    from bench.timing import PairedTiming

    return PairedTiming(np.asarray(d["reference_s"]), np.asarray(d["method_s"]), float(d["speedup"]),
                        tuple(d["interval"]), bool(d["synchronized"]),
                        Window(**d["window"]) if d.get("window") else None)


@dataclass
class Prepared:
    task: Any
    ctx: Any
    ref_sha256: str
    reference: Any
    applied: Any


def prepare(spec: RunSpec, progress=None) -> Prepared:
    """Load the task, its reference and the method applied to it, as `bench run` does (the method's trained
    parts come from the cache when they are there)."""
    from bench import registry
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from bench.runner import setup_torch
    from bench.api import RunContext

    tspec = registry.get_task_spec(spec.task)
    mspec = registry.get_method_spec(spec.method)
    registry.check_supports(mspec, tspec)
    profile = load_profile(spec.profile)
    method = registry.create_method(spec.method, spec.hyperparameters)
    ctx = RunContext.for_profile(profile, tspec.modality, spec.seed, progress or Reporter(), spec.budget)
    setup_torch(profile, spec.seed)
    task = tspec.cls()
    task.load(ctx)
    ref_w = task.reference_weights(ctx)
    reference = task.subject_from_state(ref_w.state, ctx)
    applied = method.apply(reference, task, ctx)
    return Prepared(task, ctx, ref_w.sha256, reference, applied)


def _worker_main(arg: str) -> int:
    from bench.contention import GpuMonitor, Monitor
    from bench.timing import TimingRules, paired_timing

    spec = RunSpec(**json.loads(arg))
    p = prepare(spec)
    ref_fn, _, _ = p.task.workload(p.reference, p.ctx)
    met_fn, _, _ = p.task.workload(p.applied.subject, p.ctx)
    cuda = p.ctx.device == "cuda"
    t = paired_timing(ref_fn, met_fn, TimingRules(**spec.rules), cuda=cuda,
                      monitor=Monitor(gpu=GpuMonitor() if cuda else None))
    print(MARKER + json.dumps(_timing_to_json(t)), flush=True)
    return 0


# --- the record ------------------------------------------------------------------------------------------------

def measure_speed(ref_fn, met_fn, ctx, progress, processes: int = 1, spec: RunSpec | None = None,
                  precision: float | None = None):
    """Hold the machine-wide lock and time the two arms (here, or in `processes` workers rebuilt from `spec`);
    `precision` replaces the profile's target (e.g. a tighter one for a noise floor; the record keeps it)."""
    from dataclasses import replace

    rules = rules_for(ctx)
    if precision is not None:
        if not 0 < precision < 1:
            raise ValueError(f"precision={precision}: a relative half-width between 0 and 1, e.g. 0.02")
        rules = replace(rules, precision=precision)
    with timing_lock(progress):
        if processes > 1:
            if spec is None:
                raise ValueError("timing in worker processes needs the run's configuration")
            return time_in_workers(spec, rules, processes, progress), rules
        return time_here(ref_fn, met_fn, rules, ctx.device == "cuda", progress), rules


def speed_record(m, rules, unit: str, items: int, remeasured=None):
    """The record's `speed` block from a `SpeedMeasurement`."""
    from bench.result import ArmTiming, Attempt, Contention, Interval, Speed
    from bench.timing import arm_summary

    t = m.timing

    def interval(lo_hi) -> Interval:
        return Interval(low=lo_hi[0], high=lo_hi[1])

    w = t.window
    contention = None
    if w is not None:
        contention = Contention(
            other_cpu_share=_r(w.other_cpu_share), steal_share=_r(w.steal_share), load_average_1m=w.load_average_1m,
            cpus=w.cpus, wall_s=round(w.wall_s, 3), limit=rules.max_other_share,
            gpu_other_processes=w.gpu.get("other_processes"), gpu_sm_clock_mhz_min=w.gpu.get("sm_clock_mhz_min"),
            gpu_sm_clock_mhz_max=w.gpu.get("sm_clock_mhz_max"), gpu_sm_clock_max_mhz=w.gpu.get("sm_clock_max_mhz"))
    attempts = [Attempt(speedup=a.speedup, interval=interval(a.interval), pairs=a.n,
                        other_cpu_share=_r(a.window.other_cpu_share) if a.window else None, status=s, reasons=r)
                for a, s, r in m.attempts]
    return Speed(unit=unit, items_per_call=items, reference=ArmTiming(**arm_summary(t.reference_s)),
                 method=ArmTiming(**arm_summary(t.method_s)), speedup=t.speedup, interval=interval(t.interval),
                 synchronized=t.synchronized, status=m.status, reasons=m.reasons, precision=round(t.precision, 5),
                 precision_target=rules.precision, contention=contention, attempts=attempts,
                 processes=m.processes, remeasured=remeasured)


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
