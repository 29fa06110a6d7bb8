"""The preflight: everything that can be known wrong about a run before any work starts.

A run that fails after its data is loaded and its models trained writes a `status: failed` record, which is
right for a fault of the method or the task. But an unwritable results folder (which used to fail only at
the final write, after the training and the timing, losing both), an unwritable cache, a seed no generator
takes, a CUDA profile on a machine without CUDA, or a full task whose data and models can be neither
downloaded nor found locally are faults of the invocation: they are found here, in about a second, all of
them at once, and refused with exit code 2 and no record (`PreflightError`).

What a task needs (its data, its checkpoints, an evaluation size the profile must set) only the task knows:
the runner asks it through `Task.preflight(ctx, uses)`, and the task answers with plain sentences that name
the environment variables pointing it at local copies. Tasks ask `hub()` whether the Hugging Face hub can be
reached: decided once per process, from the offline variables (`HF_HUB_OFFLINE`, ...) or a connection to the
hub with a 2-second limit, so an offline machine is told at once instead of after a minute of retries.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.config import ConfigError

SEED_LIMIT = 2 ** 32  # numpy's legacy seeding takes 32 bits; torch's takes 64, Python's any
PROBE_TIMEOUT_S = 2.0  # a connection that takes longer than this counts as no network
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
MIN_FREE_BYTES = 1 << 20  # a record is tens of kilobytes; less free space than this cannot hold one safely


class PreflightError(ConfigError):
    """A run that cannot start here; `problems` lists every reason found. A `ConfigError`, so every caller that
    refuses a bad configuration before any work (`bench run` and the sweep worker with exit 2, `bench
    reproduce` as a refusal) refuses these the same way, writing nothing."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("the run cannot start, and nothing was run or written:\n  - " + "\n  - ".join(self.problems))


# --- the network ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reachability:
    ok: bool
    why: str = ""  # when not ok: what was tried and what happened


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's reading


@functools.lru_cache(maxsize=None)
def reachable(host: str, port: int = 443) -> Reachability:
    """Whether a TCP connection to host:port opens within `PROBE_TIMEOUT_S`, asked once per process and host.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread that is abandoned when
    the limit passes."""
    box: list[Reachability] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            box.append(Reachability(True))
        except socket.gaierror as e:
            box.append(Reachability(False, f"{host} cannot be resolved: {e.strerror or e}"))
        except OSError as e:
            box.append(Reachability(False, f"{host}:{port} does not answer: {e.strerror or e}"))

    t = threading.Thread(target=probe, daemon=True, name="bench-network-probe")
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    return box[0] if box else Reachability(False, f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:g} s")


def url_reachable(url: str) -> Reachability:
    u = urlsplit(url)
    return reachable(u.hostname or url, u.port or (80 if u.scheme == "http" else 443))


def hub() -> Reachability:
    """Whether the Hugging Face hub (`HF_ENDPOINT`, default huggingface.co) can be reached: not when an offline
    variable is set (the libraries would not try), else by `reachable`."""
    for flag in OFFLINE_FLAGS:
        if _truthy(os.environ.get(flag)):
            return Reachability(False, f"{flag}={os.environ[flag]} is set")
    return url_reachable(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")


# --- the run's own checks --------------------------------------------------------------------------------------

def writable(folder: Path) -> str | None:
    """None when a file can be created, written, flushed to disk and removed in `folder`; else why not.

    Folders that do not exist yet are created for the probe and removed after it, so a refused run leaves
    nothing behind; the write is a disk block and is flushed, so a full disk fails here rather than later."""
    folder = Path(folder).absolute()
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".bench-probe-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
        if free < MIN_FREE_BYTES:
            return f"its disk has only {free} bytes free"
        return None
    except OSError as e:
        return f"{e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else "")
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def results_problem(folder: Path) -> str | None:
    why = writable(folder)
    return None if why is None else (f"the results folder {folder} is not writable: {why}. The record is written "
                                     f"there at the end; choose another with --results-dir")


def cache_problem() -> str | None:
    from bench import cache

    root = cache.cache_root()
    why = writable(root)
    return None if why is None else (f"the bench cache folder {root} ({cache.describe_root()}) is not writable: "
                                     f"{why}. Set {cache.CACHE_ENV} to a writable folder")


def seed_problem(seed: int) -> str | None:
    if 0 <= seed < SEED_LIMIT:
        return None
    return (f"--seed {seed} is out of range: a seed is an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1), what "
            f"every generator the run seeds accepts (numpy's takes 32 bits)")


def profile_problems(profile, machine) -> list[str]:
    """What makes the profile impossible here, even with --allow-mismatch (a mismatch that only makes the
    numbers another machine's, such as the GPU's name, is refused by the runner unless allowed)."""
    if profile.device == "cuda" and not machine.cuda_available:
        from bench.profiles import load_profile, profile_names

        cpu = [n for n in profile_names() if load_profile(n).device == "cpu"]
        build = " (this torch is a CPU-only build)" if machine.cuda_version is None else ""
        return [f"profile {profile.name!r} runs on a CUDA GPU, and this machine has none that torch can use{build}: "
                f"run it on a machine with an NVIDIA GPU, or use a CPU profile ({', '.join(cpu)})"]
    return []


def check(*, seed: int, profile, machine, results_folder: Path, task, ctx, uses: frozenset = frozenset()) -> None:
    """Raise `PreflightError` listing every problem found (see the module docstring); return when none."""
    problems = [p for p in (seed_problem(seed), results_problem(results_folder), cache_problem()) if p]
    problems += profile_problems(profile, machine)
    problems += task.preflight(ctx, uses)
    if problems:
        raise PreflightError(problems)
