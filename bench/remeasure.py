"""`bench remeasure RECORD...`: re-time an existing record and rewrite only its `speed` block (and the machine
it was timed on).

A speed figure timed on a busy machine is worthless, but the rest of its record (quality, sizes, MACs, training
cost) is not: those are exactly repeatable. So a contended or pre-verdict record is re-timed, not re-run:

1. The record is read and validated, in its place in a results tree (as `bench reproduce` does).
2. The bench, task and method versions must be this checkout's (they change what is measured); package
   differences are allowed and the re-measurement records the versions it ran with.
3. Task, reference and method are rebuilt as `bench run` builds them (`bench.speed.prepare`): the method's
   students, calibrations and solutions come from the cache when present, and are rebuilt deterministically
   when not. The reference's sha256 and the data fingerprint must equal the record's, and the method's model
   must have the record's parameters, non-zeros and serialized size, so it is the model the record measured.
4. The two arms are timed under the profile's rules (lock, precision target, verdict, retries; optionally in
   several worker processes), and the record is written back atomically with the new `speed`, whose
   `remeasured` field says when, with which code, which command and which packages. `profile.detected` (and
   whether it matched the profile) becomes the machine of the re-timing, since the speed is the record's one
   machine-dependent figure; the original run's machine moves to `speed.remeasured.original_machine`.
"""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench.reproduce import ReproduceRefused, read_record
from bench.versions import version_differences
from bench.result import Remeasured, Result
from bench.store import atomic_write_text


class RemeasureRefused(ReproduceRefused):
    """The record cannot be re-timed here as it stands."""


def _version_blockers(record: Result) -> list[str]:
    """The version differences that change what is measured (bench, task, method); packages may differ."""
    return [d for d in version_differences(record) if not d.startswith("package ")]


def remeasure(path: Path, processes: int = 1, reporter=None, argv: list[str] | None = None,
              precision: float | None = None) -> Result:
    """Re-time the record at `path` and rewrite it with the new speed; the new record. Raises
    `RemeasureRefused` when the record cannot be re-timed as it stands (nothing is written then)."""
    from bench.hardware import detect_machine, match_profile
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from bench.provenance import git_state, package_versions
    from bench.registry import RegistryError
    from bench.speed import RunSpec, measure_speed, prepare, speed_record

    reporter = reporter or Reporter()
    path = Path(path)
    record = read_record(path)
    if record.status != "ok" or record.speed is None:
        raise RemeasureRefused(f"{path} is a {record.status} run: there is no speed figure to re-time")
    try:
        blockers = _version_blockers(record)
    except RegistryError as e:
        raise RemeasureRefused(f"the record names something this checkout does not have: {e}") from None
    if blockers:
        raise RemeasureRefused("the record was measured with other versions of what it measures, so re-timing "
                               "here would pair its figures with another method or task:\n  "
                               + "\n  ".join(blockers) + "\n(re-run it with `bench run` instead)")
    spec = RunSpec(record.task.name, record.method.name, record.method.hyperparameters, record.profile.name,
                   record.seed, record.budget)
    with reporter.step(f"Rebuilding {record.method.name} on {record.task.name} (cached parts are reused)"):
        p = prepare(spec, reporter)
    problems = []
    if p.ref_sha256 != record.task.reference_sha256:
        problems.append(f"reference weights: record {record.task.reference_sha256[:12]}, here {p.ref_sha256[:12]}")
    if p.task.data_fingerprint() != record.task.data_fingerprint:
        problems.append("the task's data differs from the record's (data fingerprint)")
    from bench.runner import model_size

    size = model_size(p.applied.subject.model, p.applied.quantization)  # as the runner sized it (packed bytes)
    here = (size.parameters, size.nonzero_parameters, size.bytes)
    want = (record.size.method.parameters, record.size.method.nonzero_parameters, record.size.method.bytes)
    if here != want:
        problems.append(f"the method's model here has (parameters, non-zeros, bytes) {here}, the record {want}")
    ref_fn, items, unit = p.task.workload(p.reference, p.ctx)
    met_fn, _, _ = p.task.workload(p.applied.subject, p.ctx)
    if (items, unit) != (record.speed.items_per_call, record.speed.unit):
        problems.append(f"the timed workload differs: record {record.speed.unit!r}, here {unit!r}")
    if problems:
        raise RemeasureRefused("not the configuration the record measured, so its speed is not re-timed:\n  "
                               + "\n  ".join(problems))
    if record.profile.compiled and processes > 1:
        raise RemeasureRefused("the record was timed under torch.compile (bench run --compile), in one process; "
                               f"re-time it without --processes {processes}")
    from contextlib import nullcontext

    from bench.compiled import compiled_arms

    with compiled_arms(p.reference, p.applied.subject) if record.profile.compiled else nullcontext():
        m, rules = measure_speed(ref_fn, met_fn, p.ctx, reporter, processes, spec, precision)
    sha, dirty = git_state()
    argv = argv if argv is not None else sys.argv
    machine = detect_machine()
    first = record.speed.remeasured.original_machine if record.speed.remeasured else None
    stamp = Remeasured(at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       bench_version=record.provenance.bench_version, git_sha=sha, git_dirty=dirty,
                       command=shlex.join(["bench", *argv[1:]]) if argv else "bench remeasure",
                       packages=package_versions(), original_machine=first or record.profile.detected)
    speed = speed_record(m, rules, unit, items, remeasured=stamp)
    mismatches = match_profile(load_profile(record.profile.name), machine)
    profile = {**record.profile.model_dump(by_alias=True), "detected": machine.model_dump(by_alias=True),
               "matched": not mismatches, "mismatches": mismatches}
    new = Result.model_validate({**record.model_dump(by_alias=True), "speed": speed.model_dump(),
                                 "profile": profile})
    atomic_write_text(path, new.to_json())
    return new
