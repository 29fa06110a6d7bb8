"""Benchmark (`pytest --benchmark-only tests/benchmarks/test_contended_timing.py`): a busy neighbour beside a
paired timing. Run it on an otherwise quiet machine.

The same two workloads (one does three times the other's work, on the profile's two threads) are timed under
the cpu profile's rules, first alone, then while a busy process spins on one core. The harness must either
measure through the disturbance (within 3% of the quiet figure) or say that it could not (`unreliable`, with
the contention it measured); it must never publish a disturbed figure as an ordinary one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.profiles import load_profile
from bench.progress import Reporter
from bench.speed import time_here
from bench.timing import TimingRules


def workloads():
    import torch

    torch.set_num_threads(2)
    a = torch.randn(256, 256)

    def work(n: int):
        def run():
            for _ in range(n):
                a @ a
        return run
    return work(30), work(10)


@pytest.fixture
def rules() -> TimingRules:
    return TimingRules(**load_profile("cpu").timing.model_dump() | {"max_time_s": 20.0, "quiet_wait_s": 5.0})


def test_a_busy_neighbour_is_measured_through_or_flagged(benchmark, rules):
    ref, met = workloads()
    quiet = time_here(ref, met, rules, False, Reporter())
    if quiet.status != "ok":
        pytest.skip(f"the machine is not quiet enough for this benchmark: {quiet.reasons}")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loud = benchmark.pedantic(time_here, args=(ref, met, rules, False, Reporter()), rounds=1, iterations=1)
    finally:
        busy.kill()
        busy.wait()
    q, m = quiet.timing, loud.timing
    share = m.window.other_cpu_share if m.window else None
    benchmark.extra_info.update(quiet=q.speedup, contended=m.speedup, status=loud.status, other_cpu_share=share,
                                attempts=len(loud.attempts), reasons="; ".join(loud.reasons))
    assert share is not None and share > 0.3  # the spinning neighbour is seen
    if loud.status == "ok":
        assert abs(m.speedup / q.speedup - 1) <= 0.03, (q.speedup, m.speedup)
    else:
        assert any(r.startswith("contended") for r in loud.reasons), loud.reasons
