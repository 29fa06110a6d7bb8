"""The timing phase as a user meets it: contention measured from the real /proc/stat, a machine-wide lock that
serialises timed windows, a verdict that reaches the record and the terminal, and worker processes pooled."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.contention import StatSample, idle_share, read_proc_stat

cli = CliRunner()


def test_proc_stat_is_read_on_linux():
    s = read_proc_stat()
    if s is None:
        pytest.skip("no /proc/stat on this platform")
    assert 0 < s.busy <= s.total and s.steal >= 0
    share = idle_share(0.2)
    assert share is not None and 0.0 <= share <= 1.0


def test_the_timing_lock_serialises_windows_across_processes(tmp_path, monkeypatch):
    from bench.speed import LOCK_ENV, timing_lock

    lock = tmp_path / "timing.lock"
    monkeypatch.setenv(LOCK_ENV, str(lock))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
         f"l = FileLock({str(lock)!r}); l.acquire(); print('held', flush=True); time.sleep(1.5); l.release()"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with timing_lock() as waited:
            assert waited >= 0.8 and time.monotonic() - t0 >= 0.8
    finally:
        holder.wait(timeout=30)
    with timing_lock() as waited:  # free now: no wait
        assert waited < 0.5


def busy_stat_factory():
    """A /proc/stat in which other processes keep one of two cores busy all the time."""
    t0 = time.perf_counter()

    def fake() -> StatSample:
        from bench.contention import read_own_cpu

        t = time.perf_counter() - t0
        return StatSample(busy=read_own_cpu() + 1.0 * t, steal=0.0, total=2 * t)
    return fake


@pytest.mark.parametrize("busy", [False, True])
def test_the_verdict_reaches_the_record_and_the_terminal(busy, tmp_path, monkeypatch):
    import bench.contention

    if busy:
        monkeypatch.setattr(bench.contention, "read_proc_stat", busy_stat_factory())
    else:  # a quiet machine, whatever else this test machine is doing
        monkeypatch.setattr(bench.contention, "read_proc_stat",
                            lambda: StatSample(busy=bench.contention.read_own_cpu(), steal=0.0, total=1.0))
    res = cli.invoke(app, ["run", "--method", "none", "--task", "digits", "--budget", "smoke", "--results-dir",
                           str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    from bench.store import iter_result_files, load_result

    (path,) = iter_result_files(tmp_path)
    s = load_result(path).speed
    assert s.contention is not None and s.contention.cpus >= 1 and s.attempts
    if busy:
        assert s.status == "unreliable" and s.contention.other_cpu_share == pytest.approx(0.5, abs=0.05)
        assert "contended" in s.reasons[0] and "UNRELIABLE" in res.output
    else:
        assert s.contention.other_cpu_share < 0.02  # the stub reads our CPU time a moment before the monitor
        assert "UNRELIABLE" not in res.output or s.status == "unreliable"  # smoke timing may still be imprecise
