"""Where a sweep's runs execute: `local` (this machine, `--jobs N` processes at a time) or `ray` (one Ray task
per run, with its resource request, on a local Ray or a cluster).

Both start every run as its own `bench.worker` process, so a crash or an out-of-memory kill in one run leaves
the others and the results tree intact. Locally the worker writes its record into the results tree (atomic
rename). Under Ray the worker writes into a temporary folder on whichever node ran it, the record's text comes
back to the driver, which validates it and writes it into its own results tree: the tree need not be shared.

On a cluster every node needs the project installed at the same commit (`pip install -e ".[ray]"`) and,
for a cuda profile, a GPU: each task asks Ray for one (`resources: {num_gpus: ...}` in the sweep file changes
that) and as many CPUs as the profile's threads.

Runs that share reference work (a task's trained reference, the reference's cached evaluation) do not race:
`bench.cache` builds each entry under a file lock, so the first run builds and the others wait, then read.

An interrupted Ray sweep leaves no temporary folder behind: the running tasks are first cancelled gently (Ray
raises KeyboardInterrupt in them, so each stops its worker and removes its folder), and only those still
running after `STOP_GRACE_S` are killed. A task killed outright cannot clean up, so on the driver's own node
(a local Ray, the default) every task's folder lies inside one folder of the driver's, removed when the sweep
ends however it ends.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from bench import worker
from bench.sweep import Outcome, Resources, RunSpec

LOG_LINES = 15
STOP_GRACE_S = 60.0  # how long interrupted runs get to clean up before they are killed


class ExecutorError(RuntimeError):
    """An executor that cannot start (Ray missing, a cluster address that does not answer)."""


def _tail(text: str, n: int = LOG_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def outcome_from(spec: RunSpec, rc: int, log: str, path: Path | None, stopping: bool, seconds: float) -> Outcome:
    """What one worker process's exit means (see `bench.worker` for its exit codes)."""
    from bench.store import InvalidResult, load_result

    result, note = None, ""
    if path is not None:
        try:
            result = load_result(path)
        except InvalidResult as e:
            return Outcome(spec, "failed", path, f"the run wrote an invalid record: {e}", seconds)
        if result.provenance.config_hash != spec.config_hash:
            note = (f"warning: the record's config hash {result.provenance.config_hash[:12]} is not the sweep's "
                    f"{spec.config_hash[:12]}; resuming will not recognise it")
    if rc == 0 and result is not None:
        return Outcome(spec, "ok", path, note, seconds, result)
    if rc == 1 and result is not None:
        return Outcome(spec, "failed", path, _tail(log), seconds, result)
    if stopping and (rc == 130 or rc < 0):
        return Outcome(spec, "interrupted", None, "stopped; nothing written", seconds)
    if rc == 2:
        return Outcome(spec, "error", None, _tail(log), seconds)
    why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
    return Outcome(spec, "failed", None, f"the process ended abnormally ({why}: a crash or out of memory?); "
                   f"no record was written, so the run is done again on resume\n{_tail(log)}", seconds)


class LocalExecutor:
    def __init__(self, jobs: int = 1):
        self.jobs = max(1, int(jobs))

    def run(self, specs: list[RunSpec], root: Path, finished: Callable[[Outcome], None],
            started: Callable[[RunSpec], None] | None = None) -> None:
        import queue
        import subprocess
        import threading
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        stop = threading.Event()
        lock = threading.Lock()
        procs: set = set()
        began: queue.SimpleQueue = queue.SimpleQueue()

        def one(spec: RunSpec) -> Outcome:
            t0 = time.perf_counter()
            with lock:
                if stop.is_set():
                    return Outcome(spec, "interrupted", note="not started")
                argv = worker.command(spec.worker_spec(root, shared_cores=self.jobs > 1))
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=worker.environment())
                procs.add(proc)
            began.put(spec)
            try:
                log, _ = proc.communicate()
            finally:
                with lock:
                    procs.discard(proc)
            info = worker.parse_output(log)
            path = Path(info["path"]) if info else None
            return outcome_from(spec, proc.returncode, log, path, stop.is_set(), time.perf_counter() - t0)

        def drain_started() -> None:
            while not began.empty():
                spec = began.get()
                if started is not None:
                    started(spec)

        pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="bench-sweep")
        futures = [pool.submit(one, s) for s in specs]
        reported: set = set()
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain_started()
                for f in done:
                    reported.add(f)
                    finished(f.result())
        except KeyboardInterrupt:
            stop.set()
            with lock:
                running = list(procs)
            for p in running:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)  # the worker turns it into KeyboardInterrupt: nothing written
            deadline = time.monotonic() + STOP_GRACE_S
            for p in running:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
            pool.shutdown(wait=True, cancel_futures=True)
            for f in futures:  # runs that completed while we stopped keep their records: report them
                if f not in reported and f.done() and not f.cancelled():
                    o = f.result()
                    if o.status in ("ok", "failed"):
                        finished(o)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def ray_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs on a Ray worker: one `bench.worker` process writing into a temporary folder; returns the record.

    The folder is made inside the driver's folder (`tmp_parent`) when this node has it (the driver's own node),
    else in this node's temporary folder; it is removed when the task ends, interrupted included."""
    import shutil
    import subprocess
    import tempfile

    spec = dict(spec)
    parent = spec.pop("tmp_parent", None)
    tmp = tempfile.mkdtemp(prefix="bench-ray-", dir=parent if parent and os.path.isdir(parent) else None)
    try:
        spec = {**spec, "results_dir": tmp}
        proc = subprocess.run(worker.command(spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=worker.environment())
        info = worker.parse_output(proc.stdout)
        text = Path(info["path"]).read_text(encoding="utf-8") if info else None
        return {"rc": proc.returncode, "log": proc.stdout[-8000:], "text": text}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RayExecutor:
    def __init__(self, jobs: int | None = None, address: str | None = None, resources: Resources | None = None):
        self.jobs, self.address, self.resources = jobs, address, resources or Resources()

    def _write(self, spec: RunSpec, payload: dict[str, Any], root: Path, seconds: float) -> Outcome:
        from pydantic import ValidationError

        from bench.result import Result, invariant_errors
        from bench.store import write_result

        path = None
        if payload.get("text"):
            try:
                result = Result.model_validate_json(payload["text"])
            except ValidationError as e:
                return Outcome(spec, "failed", None, f"the run returned an invalid record: {e}", seconds)
            problems = invariant_errors(result)
            if problems:
                return Outcome(spec, "failed", None, "the run returned an inconsistent record: "
                               + "; ".join(problems), seconds)
            path = write_result(result, root)  # refuses any path outside `root`
        return outcome_from(spec, int(payload.get("rc", 1)), payload.get("log", ""), path, False, seconds)

    def run(self, specs: list[RunSpec], root: Path, finished: Callable[[Outcome], None],
            started: Callable[[RunSpec], None] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError("the ray executor needs Ray: pip install -e '.[ray]'") from None
        import logging

        started_here = not ray.is_initialized()
        if started_here:
            opts: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            try:
                if self.address:
                    ray.init(address=self.address, **opts)
                else:  # a local Ray on this machine
                    ray.init(num_cpus=self.jobs or os.cpu_count() or 1, **opts)
            except Exception as e:  # noqa: BLE001 - Ray raises many types; say which address failed
                raise ExecutorError(f"could not start or reach Ray (address {self.address or 'local'}): {e}") from e
        import shutil
        import tempfile

        remote = ray.remote(ray_task)
        refs: dict[Any, tuple[RunSpec, float]] = {}
        tmp_parent = tempfile.mkdtemp(prefix="bench-ray-sweep-")  # the tasks' folders on this node (see above)
        try:
            for spec in specs:
                gpus = self.resources.num_gpus
                if gpus is None:
                    gpus = 1 if spec.device == "cuda" else 0
                cpus = self.resources.num_cpus if self.resources.num_cpus is not None else spec.threads
                ref = remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                     name=f"bench {spec.method} {spec.task} seed {spec.seed}"
                                     ).remote({**spec.worker_spec(Path("."), shared_cores=cpus < spec.threads),
                                               "tmp_parent": tmp_parent})
                refs[ref] = (spec, time.perf_counter())
                if started is not None:
                    started(spec)
            pending = list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                    for r in ready:
                        spec, t0 = refs[r]
                        try:
                            payload = ray.get(r)
                        except Exception as e:  # noqa: BLE001 - a worker lost, a node gone
                            finished(Outcome(spec, "failed", None, f"the Ray task failed: {e}",
                                             time.perf_counter() - t0))
                            continue
                        finished(self._write(spec, payload, root, time.perf_counter() - t0))
            except KeyboardInterrupt:
                stop_tasks(ray, pending)
                raise
        finally:
            if started_here:
                ray.shutdown()
            shutil.rmtree(tmp_parent, ignore_errors=True)


def stop_tasks(ray, refs: list, grace_s: float = STOP_GRACE_S) -> None:
    """Cancel running Ray tasks so that they clean up: gently first (KeyboardInterrupt in the task: its worker is
    stopped and its temporary folder removed), then, after `grace_s`, by killing the ones still running (whose
    worker follows its parent, PR_SET_PDEATHSIG)."""
    if not refs:
        return
    for r in refs:
        ray.cancel(r, force=False)
    try:
        _, still = ray.wait(list(refs), num_returns=len(refs), timeout=grace_s)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        still = list(refs)
    for r in still:
        ray.cancel(r, force=True)


def make_executor(name: str, jobs: int | None = None, address: str | None = None,
                  resources: Resources | None = None):
    """`jobs`: processes at a time (local, default 1) or the CPUs of a local Ray (default: all of them)."""
    if name == "local":
        if address:
            raise ExecutorError("--address is for the ray executor")
        return LocalExecutor(jobs or 1)
    if name == "ray":
        return RayExecutor(jobs, address, resources)
    raise ExecutorError(f"unknown executor {name!r}: use local or ray")
