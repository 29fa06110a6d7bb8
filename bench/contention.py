"""What else used the machine while we timed: measured, not guessed.

On Linux the kernel counts, per CPU state, the time every core spent since boot (`/proc/stat`, in clock ticks);
`getrusage(RUSAGE_SELF)` counts this process's own CPU time, all its threads together. Over a window of `wall`
seconds on `n` logical CPUs:

    other_cpu_share = (busy_all - own) / (n * wall)        busy_all = user + nice + system + irq + softirq
    steal_share     = steal / (n * wall)                   time the hypervisor gave our vCPUs to someone else

`other_cpu_share` is the share of the machine's cores that other processes used while ours was timing: 0 on a
quiet machine, ~0.5 when one busy process holds one of two cores. Neither needs hardware counters, which these
VMs do not expose. The 1-minute load average is kept too, for the reader, but it is a slow, smoothed count of
runnable threads (ours included) and decides nothing here.

On a GPU, NVML (the `nvidia-ml-py` package, imported as `pynvml`) lists the other processes on the device and
its SM clock, which drops when the card throttles; both are recorded when the package is present.

Readers are injectable (`read_stat`, `read_self`, `clock`) so tests drive the verdict with fake readings.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class StatSample:
    """Cumulative CPU times of the whole machine, in seconds, from the first line of /proc/stat."""
    busy: float  # user + nice + system + irq + softirq
    steal: float
    total: float  # every state, idle and iowait included


def read_proc_stat(path: str = "/proc/stat") -> StatSample | None:
    """The machine's cumulative CPU times, or None where /proc/stat does not exist (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    v = [int(x) for x in first[1:]] + [0] * 10
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]  # guest time is already inside user
    return StatSample(busy=(user + nice + system + irq + softirq) / CLK_TCK, steal=steal / CLK_TCK,
                      total=(user + nice + system + idle + iowait + irq + softirq + steal) / CLK_TCK)


def read_own_cpu() -> float:
    """CPU seconds this process has used so far, every thread counted."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@dataclass
class Window:
    """The contention figures of one timed window (see the module docstring)."""
    wall_s: float
    cpus: int
    other_cpu_share: float | None  # None where /proc/stat is unavailable
    steal_share: float | None
    own_cpu_share: float
    load_average_1m: float | None
    gpu: dict = field(default_factory=dict)  # other_processes, sm_clock_mhz_min/max, sm_clock_max_mhz


class Monitor:
    """Measures one window: `start()`, run the timed work, `stop()` -> `Window`."""

    def __init__(self, cpus: int | None = None, read_stat: Callable[[], StatSample | None] | None = None,
                 read_self: Callable[[], float] | None = None, clock: Callable[[], float] = time.perf_counter,
                 gpu: "GpuMonitor | None" = None):
        self.cpus = cpus or os.cpu_count() or 1
        self.read_stat = read_stat or (lambda: read_proc_stat())  # looked up when called: tests patch the module
        self.read_self = read_self or (lambda: read_own_cpu())
        self.clock, self.gpu = clock, gpu
        self._start: tuple | None = None

    def start(self) -> None:
        if self.gpu is not None:
            self.gpu.sample()
        self._start = (self.clock(), self.read_stat(), self.read_self())

    def sample(self) -> None:
        """A mid-window GPU reading (clocks move within a window); the CPU counters need only the ends."""
        if self.gpu is not None:
            self.gpu.sample()

    def stop(self) -> Window:
        assert self._start is not None, "Monitor.stop() before start()"
        t1, s1, own1 = self.clock(), self.read_stat(), self.read_self()
        t0, s0, own0 = self._start
        wall = max(t1 - t0, 1e-9)
        own = max(own1 - own0, 0.0)
        other = steal = None
        if s0 is not None and s1 is not None:
            cap = self.cpus * wall
            other = min(max((s1.busy - s0.busy - own) / cap, 0.0), 1.0)
            steal = min(max((s1.steal - s0.steal) / cap, 0.0), 1.0)
        gpu = self.gpu.summary() if self.gpu is not None else {}
        return Window(wall_s=wall, cpus=self.cpus, other_cpu_share=other, steal_share=steal,
                      own_cpu_share=min(own / (self.cpus * wall), 1.0), load_average_1m=_load1(), gpu=gpu)


def idle_share(seconds: float = 1.0, read_stat: Callable[[], StatSample | None] | None = None,
               read_self: Callable[[], float] | None = None, sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.perf_counter, cpus: int | None = None) -> float | None:
    """Other processes' share of the cores over `seconds` of doing nothing ourselves (a probe for a quiet
    window before a retry)."""
    m = Monitor(cpus, read_stat, read_self, clock)
    m.start()
    sleep(seconds)
    return m.stop().other_cpu_share


class GpuMonitor:
    """Other processes on CUDA device `index` and its SM clock, through NVML; silent where NVML is missing."""

    def __init__(self, index: int = 0):
        self.ok = False
        self.clocks: list[int] = []
        self.others: set[int] = set()
        self.max_clock: int | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.max_clock = int(pynvml.nvmlDeviceGetMaxClockInfo(self.handle, pynvml.NVML_CLOCK_SM))
            self.ok = True
        except Exception:  # noqa: BLE001 - no package, no driver, no permission: nothing to record
            self.ok = False

    def sample(self) -> None:
        if not self.ok:
            return
        n = self.nvml
        try:
            self.clocks.append(int(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)))
            procs = list(n.nvmlDeviceGetComputeRunningProcesses(self.handle))
            procs += list(n.nvmlDeviceGetGraphicsRunningProcesses(self.handle))
            self.others |= {p.pid for p in procs if p.pid != os.getpid()}
        except Exception:  # noqa: BLE001 - a failed reading is a missing reading
            pass

    def summary(self) -> dict:
        if not self.ok:
            return {}
        out = {"other_processes": len(self.others)}
        if self.clocks:
            out |= {"sm_clock_mhz_min": min(self.clocks), "sm_clock_mhz_max": max(self.clocks)}
        if self.max_clock:
            out["sm_clock_max_mhz"] = self.max_clock
        return out
