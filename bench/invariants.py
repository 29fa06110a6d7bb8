"""The facts a valid record must satisfy beyond its schema (`invariant_errors`): deltas that add up, values
inside their intervals, ratios that match their figures, no absolute paths of the machine that made it, a
configuration hash that recomputes, and a file placed where its fields say. Split from `bench.result`, which
holds the record's models; both `bench validate` and `bench check` run these."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.result import Result

_ABSOLUTE = re.compile(r"^(?:/|~/|~$|[A-Za-z]:[\\/]|\\\\)")  # POSIX, home, Windows drive, UNC


def absolute_paths(command: str) -> list[str]:
    """The arguments of a command line that are absolute paths (or hold one after `=`, as `--opt=/x`). The
    program itself is left to the writer (`bench.provenance.portable_command` makes it `bench`): it names an
    installation, not anyone's files, and a record made under a test runner carries the runner's."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: judge the plain words
        words = command.split()
    return [w for w in words[1:] if _ABSOLUTE.match(w) or ("=" in w and _ABSOLUTE.match(w.split("=", 1)[1]))]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def invariant_errors(r: Result, path: Path | None = None, results_root: Path | None = None) -> list[str]:
    """Facts a valid record must satisfy beyond its schema; empty when it satisfies them all."""
    errs: list[str] = []
    if r.quality:
        q = r.quality
        if not _close(q.delta, q.value - q.reference_value):
            errs.append(f"quality.delta {q.delta} != value - reference_value = {q.value - q.reference_value}")
        if q.interval and not (q.interval.low - 1e-9 <= q.value <= q.interval.high + 1e-9):
            errs.append(f"quality.value {q.value} lies outside its interval [{q.interval.low}, {q.interval.high}]")
    if r.speed:
        s = r.speed
        if not (s.interval.low - 1e-9 <= s.speedup <= s.interval.high + 1e-9):
            errs.append(f"speed.speedup {s.speedup} lies outside its interval [{s.interval.low}, {s.interval.high}]")
    if r.size:
        for arm in ("reference", "method"):
            so = getattr(r.size, arm)
            if so.nonzero_parameters > so.parameters:
                errs.append(f"size.{arm}.nonzero_parameters {so.nonzero_parameters} > parameters {so.parameters}")
    if r.training:
        t = r.training
        for name, got, want in (("time_ratio", t.time_ratio, t.seconds / t.full_seconds),
                                ("samples_ratio", t.samples_ratio, t.samples_seen / t.full_samples_seen),
                                ("time_ratio_with_preparation", t.time_ratio_with_preparation,
                                 (t.preparation_seconds + t.seconds) / t.full_seconds)):
            if not _close(got, want):
                errs.append(f"training.{name} {got} does not match its figures ({want})")
    for field, command in (("provenance.command", r.provenance.command),
                           ("speed.remeasured.command", r.speed.remeasured.command
                            if r.speed and r.speed.remeasured else None)):
        local = absolute_paths(command or "")
        if local:
            errs.append(f"{field} holds the absolute path {local[0]!r}: a record names files relative to the "
                        f"results tree or the repository, never a folder of the machine that made it")
    from bench.provenance import config_hash

    expected = config_hash(r.task.name, r.task.version, r.method.name, r.method.version,
                           r.method.hyperparameters, r.profile.name, r.seed, r.provenance.bench_version,
                           compiled=r.profile.compiled)
    if r.provenance.config_hash != expected:
        errs.append(f"provenance.config_hash {r.provenance.config_hash} does not match the record's "
                    f"configuration ({expected})")
    if path is not None and results_root is not None:
        try:
            rel = path.resolve().relative_to(results_root.resolve())
        except ValueError:
            rel = None
        if rel is not None and rel != r.relpath():
            errs.append(f"file is at {rel} but its fields place it at {r.relpath()}")
    return errs
