"""One run in a process of its own: `python -m bench.worker '<json spec>'`, what sweeps and `bench check` start.

A run in its own process cannot take the others down with it: a crash, an out-of-memory kill or a hung CUDA
context ends that process only, and its result file is written atomically by the runner or not at all.

The worker ends with its parent: it asks Linux for SIGTERM when the process (thread) that started it dies
(`PR_SET_PDEATHSIG`), and turns SIGTERM into KeyboardInterrupt, on which the runner writes nothing and every
temporary file is removed. So a sweep killed with SIGKILL leaves no orphan runs behind that would finish
later and race with the sweep started again to resume.

The spec holds task, method, profile, seed, overrides (JSON values), budget, results_dir and shared_cores
(true when other runs share the machine's cores: OpenMP threads then wait passively). The record's
provenance gets the equivalent `bench run ...` command line, so a swept result is re-run like any other.
The last line of stdout is `BENCH_WORKER_RESULT {"path": ..., "status": ...}` when a record was written.
Exit status: 0 ok, 1 the run failed (a failed record was written), 2 a configuration error (nothing written),
130 interrupted (nothing written).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

MARKER = "BENCH_WORKER_RESULT "
PARENT_ENV = "BENCH_WORKER_PARENT"


def format_value(v: Any) -> str:
    """A hyper-parameter value as `--set key=value` writes it (the inverse of `bench.config`'s conversion)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(format_value(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def command_line(spec: dict[str, Any]) -> list[str]:
    """The `bench run` command that does what `spec` asks (the results folder left out: it is no config)."""
    argv = ["bench", "run", "--method", spec["method"], "--task", spec["task"], "--profile", spec["profile"],
            "--seed", str(spec["seed"])]
    for k, v in spec.get("overrides", {}).items():
        argv += ["--set", f"{k}={format_value(v)}"]
    if spec.get("budget", "full") != "full":
        argv += ["--budget", spec["budget"]]
    return argv


def command(spec: dict[str, Any]) -> list[str]:
    """The argv that starts a worker for `spec` with this interpreter."""
    return [sys.executable, "-m", "bench.worker", json.dumps(spec, sort_keys=True)]


def environment() -> dict[str, str]:
    """The worker's environment: this one, plus our pid (so a worker whose parent is already gone exits)."""
    return {**os.environ, PARENT_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}


def parse_output(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            try:
                return json.loads(line[len(MARKER):])
            except ValueError:
                return None
    return None


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        raise SystemExit(130)  # the parent died before we could ask to follow it


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    signal.signal(signal.SIGTERM, _interrupt)
    _die_with_parent()
    try:
        spec = json.loads(args[0])
        results_dir = Path(spec["results_dir"])
    except (IndexError, ValueError, KeyError, TypeError) as e:
        print(f"error: bench.worker takes one JSON spec argument ({e})", file=sys.stderr)
        return 2
    if spec.get("shared_cores"):
        # Several runs share this machine's cores: OpenMP threads that spin while they wait would burn the
        # cores the other runs need (4x slower here with 2 runs of 2 threads on 2 cores). Set before torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bench.config import ConfigError
    from bench.hardware import ProfileMismatch
    from bench.registry import RegistryError
    from bench.runner import RunFailed, run

    try:
        out = run(spec["task"], spec["method"], spec.get("profile", "cpu"), int(spec.get("seed", 0)),
                  spec.get("overrides") or {}, bool(spec.get("allow_mismatch", False)), results_dir,
                  budget=spec.get("budget", "full"), argv=command_line(spec))
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except (RegistryError, ConfigError, ProfileMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(e.result.error.traceback, file=sys.stderr)
        print(MARKER + json.dumps({"path": str(e.path), "status": "failed"}), flush=True)
        return 1
    print(MARKER + json.dumps({"path": str(out.path), "status": "ok"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
