"""`bench reproduce RESULT.json`: re-run exactly the configuration of a record, compare, and mark it verified.

1. The record is read and validated (schema and invariants: a record whose numbers do not add up, whose
   config hash does not match its configuration, or which does not lie where its own fields place it, is
   refused before anything runs).
2. Versions are compared (`bench.versions.classify_differences`). A different bench, task or method version, or a different
   version of a package the task's or the method's code imports (`bench.imported`: the record's
   `imported_packages`, and what the code imports here), refuses the reproduction (exit 2) unless `force`, in
   which case those differences are written into the verification and it is "forced". Every other package
   difference, a lock other than the record's (another name, or its pins refreshed since), an install that does
   not match its lock, or a record made before locks, is a warning: printed, written into the verification
   (`warnings`), and the verification is not forced. Where what the code imports cannot be told here, every
   package difference refuses, as before.
3. The run is repeated in this process with the record's task, method, hyper-parameters, profile, seed and
   budget, into a temporary folder (the results tree gets no second record of the same run).
4. Compared: quality must be equal for a fixed seed (`quality_rule="exact"`: value, reference value, n,
   every control), or the re-run value must lie inside the record's interval (`"interval"`, for noisy
   metrics or another device); reference weights and data must be the same bits; sizes and MACs equal.
   Speed is judged by the re-run's own measurement, never by the record's interval, which its submitter
   writes (40x [2, 45] overlapped a re-run's 6.5x [6.2, 6.7] and was verified): the re-run's speed must be
   `ok` by the speed-trust rules, and the record's point estimate must lie inside the re-run's interval
   widened by the profile's precision target (the smoke rules' for a smoke record), or by the maintainer's
   `speed_tolerance` where larger. A bootstrap interval covers the noise within one run, not between runs;
   every ok timing is within +-target of its speedup, so two ok timings of one speed differ by about that.
5. When everything holds, `<run-id>.verified.json` (a `Verification`, `bench.verification/2`) is written
   beside the record: who, when, on what machine, whether forced, the checks, the speed judgement, the
   differences and the whole re-run record. Otherwise nothing is written and the command exits 1.
6. A reader never takes a verification file's existence for a verification: `verification_problems` judges
   it against the record as it is now, by `compare` on the stored re-run, so an empty, hand-edited, forced or
   outdated (the record re-timed since) file verifies nothing.
"""

from __future__ import annotations

import getpass
import math
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.result import Machine, Result
from bench.versions import classify_differences
from bench.store import VERIFIED_SUFFIX, InvalidResult, atomic_write_text, load_result

VERIFICATION_SCHEMA = "bench.verification/2"
MAX_VERIFICATION_BYTES = 8 * 1024 * 1024  # one re-run record is tens of kB


class ReproduceRefused(RuntimeError):
    """The record cannot be reproduced as it stands (invalid, misplaced, unknown names, other versions)."""


class InvalidVerification(ValueError):
    """A `.verified.json` that cannot be read as a verification; names the file and every problem found."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = Path(path), problems
        super().__init__(f"{path}: " + "; ".join(problems))


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    rule: str
    original: Any
    reproduced: Any
    ok: bool


class SpeedJudgement(BaseModel):
    """The record's speedup against the re-run's own measurement. The record's interval is kept to be shown,
    never used: its author wrote it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    record_speedup: float
    record_interval: tuple[float, float]
    rerun_speedup: float
    rerun_interval: tuple[float, float]
    rerun_status: Literal["ok", "unreliable"]
    rerun_reasons: list[str] = []
    tolerance: float = Field(ge=0, le=1)  # the re-run's interval is widened by this share...
    accepted: tuple[float, float]  # ...to this, where the record's speedup must lie
    ratio: float  # record speedup / re-run speedup
    ok: bool


class Verification(BaseModel):
    """`<run-id>.verified.json`: a record reproduced by someone, somewhere, at some time, with the evidence
    (the re-run's record and figures) that lets any reader judge it again (`verification_problems`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    schema_: Literal["bench.verification/2"] = Field(VERIFICATION_SCHEMA, alias="schema")
    run_id: str
    result_file: str
    config_hash: str
    verified: bool
    verified_by: str
    verified_at: str
    machine: Machine
    bench_version: str
    git_sha: str | None
    forced: bool = False  # reproduced past version differences: never shown as verified
    version_differences: list[str] = []  # what it was forced past (bench, task, method, imported packages)
    warnings: list[str] = []  # differences that do not refuse (other packages, the lock): shown beside "verified"
    quality_rule: Literal["exact", "interval"] = "exact"
    speed_tolerance: float = Field(0.0, ge=0, le=1)  # the maintainer's, where larger than the profile's
    speed: SpeedJudgement | None = None  # None only in a file bench did not write, which verifies nothing
    differences: dict[str, float] = {}  # re-run - record, figure by figure (the re-run's own: `rerun`)
    checks: list[Check]
    rerun: dict[str, Any]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True) + "\n"


def verification_path(result_path: Path) -> Path:
    p = Path(result_path)
    return p.with_name(p.name[: -len(".json")] + VERIFIED_SUFFIX)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (only finite numbers are valid)")


def load_verification(path: Path) -> Verification:
    """Parse and schema-check a verification file; raise `InvalidVerification` naming what is wrong. Total on
    hostile input: a non-regular file (a named pipe would block the reader), an oversized or deeply nested
    one, NaN or Infinity are each a named problem, never a hang or a crash."""
    import json
    import os
    import stat

    from pydantic import ValidationError

    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_VERIFICATION_BYTES:
            raise InvalidVerification(path, ["not a regular file" if not stat.S_ISREG(st.st_mode) else
                                             f"{st.st_size} bytes: a verification is at most {MAX_VERIFICATION_BYTES}"])
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        found = data.get("schema") if isinstance(data, dict) else f"a JSON {type(data).__name__}, not an object"
        if found != VERIFICATION_SCHEMA:
            raise InvalidVerification(path, [f"schema: expected {VERIFICATION_SCHEMA!r}, found {found!r}" + (
                " (written before verifications judged speed by the re-run: reproduce it again)"
                if isinstance(found, str) and found.startswith("bench.verification/") else "")])
        return Verification.model_validate(data)
    except InvalidVerification:
        raise
    except OSError as e:
        raise InvalidVerification(path, [f"cannot read: {e}"]) from None
    except RecursionError:
        raise InvalidVerification(path, ["nested too deeply to be a verification"]) from None
    except ValidationError as e:
        raise InvalidVerification(path, [f"{'.'.join(map(str, err['loc'])) or '(file)'}: {err['msg']}"
                                         for err in e.errors()]) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity
        raise InvalidVerification(path, [f"not JSON: {e}"]) from None


def read_record(path: Path) -> Result:
    """The record at `path`, validated, refusing one that does not lie where its fields place it."""
    path = Path(path)
    if not path.is_file():
        raise ReproduceRefused(f"{path} is not a file")
    if path.name.endswith(VERIFIED_SUFFIX):
        raise ReproduceRefused(f"{path} is a verification record; give the result it verifies")
    try:
        record = load_result(path)
    except InvalidResult as e:
        raise ReproduceRefused("the record is invalid, so it cannot be verified:\n  "
                               + "\n  ".join(e.problems)) from None
    bad = [k for k, x in (("speed.speedup", record.speed and record.speed.speedup),
                          ("speed.interval", record.speed and record.speed.interval.low + record.speed.interval.high))
           if x is not None and not math.isfinite(x)]
    if bad:
        raise ReproduceRefused(f"the record's {' and '.join(bad)} is not a finite number, so no speed can match it")
    rel = record.relpath()
    if path.resolve().parts[-len(rel.parts):] != rel.parts:
        raise ReproduceRefused(f"{path} is not where its fields place it (<results>/{rel.as_posix()}): a record "
                               f"is verified in its place in a results tree")
    return record


def profile_tolerance(record: Result) -> float:
    """The profile's precision target, the smoke rules' for a `--budget smoke` record: every ok timing's
    interval is within +-this of its speedup, so two ok timings of one speed may differ by about this much
    beyond the re-run's own interval. Raises `RegistryError` for a profile this checkout does not have."""
    if record.budget != "full":
        from bench.speed import SMOKE_TIMING_RULES

        return float(SMOKE_TIMING_RULES["precision"])
    from bench.profiles import load_profile

    return load_profile(record.profile.name).timing.precision


def judge_speed(orig: Result, new: Result, speed_tolerance: float = 0.0) -> SpeedJudgement:
    """The record's speedup against the re-run's measurement: the re-run must be `ok` (speed-trust rules) and
    the record's point estimate inside the re-run's interval widened by the larger of the profile's tolerance
    and `speed_tolerance`. The record's own interval plays no part: its author wrote it."""
    tol = min(1.0, max(profile_tolerance(orig), speed_tolerance))
    so, sn = orig.speed, new.speed
    lo, hi = sn.interval.low / (1.0 + tol), sn.interval.high * (1.0 + tol)
    return SpeedJudgement(
        record_speedup=so.speedup, record_interval=(so.interval.low, so.interval.high), rerun_speedup=sn.speedup,
        rerun_interval=(sn.interval.low, sn.interval.high), rerun_status=sn.status, rerun_reasons=list(sn.reasons),
        tolerance=tol, accepted=(lo, hi), ratio=so.speedup / sn.speedup,
        ok=sn.status == "ok" and lo <= so.speedup <= hi)


def compare(orig: Result, new: Result, quality_rule: str = "exact", speed_tolerance: float = 0.0,
            forced: bool = False) -> list[Check]:
    """The checks of a re-run against its record. `forced`: versions differ (and the config hash, which covers
    the bench, task and method versions, may too), so the configuration itself is compared instead."""
    checks: list[Check] = []

    def add(name: str, rule: str, a: Any, b: Any, ok: bool) -> None:
        checks.append(Check(name=name, rule=rule, original=a, reproduced=b, ok=bool(ok)))

    add("status", "equal", orig.status, new.status, orig.status == new.status == "ok")
    if new.status != "ok" or orig.status != "ok":
        if new.error is not None:
            add("error", "none", None, f"{new.error.type}: {new.error.message}", False)
        return checks
    def config(r: Result) -> dict:
        return {"task": r.task.name, "method": r.method.name, "hyperparameters": r.method.hyperparameters,
                "profile": r.profile.name, "seed": r.seed, "budget": r.budget}

    add("configuration", "equal", config(orig), config(new), config(orig) == config(new))
    if not forced:
        add("config_hash", "equal", orig.provenance.config_hash, new.provenance.config_hash,
            orig.provenance.config_hash == new.provenance.config_hash)
    add("reference_sha256", "equal", orig.task.reference_sha256, new.task.reference_sha256,
        orig.task.reference_sha256 == new.task.reference_sha256)
    add("data_fingerprint", "equal", orig.task.data_fingerprint, new.task.data_fingerprint,
        orig.task.data_fingerprint == new.task.data_fingerprint)
    qo, qn = orig.quality, new.quality
    if quality_rule == "exact":
        add(f"quality.value ({qo.metric})", "exact", qo.value, qn.value, qo.value == qn.value)
        add("quality.reference_value", "exact", qo.reference_value, qn.reference_value,
            qo.reference_value == qn.reference_value)
        add("quality.n", "exact", qo.n, qn.n, qo.n == qn.n)
        co = {c.name: c.value for c in orig.controls}
        cn = {c.name: c.value for c in new.controls}
        for name in sorted(set(co) | set(cn)):
            add(f"control {name}", "exact", co.get(name), cn.get(name), co.get(name) == cn.get(name))
    else:
        iv = qo.interval
        inside = iv is not None and iv.low <= qn.value <= iv.high
        add(f"quality.value ({qo.metric})", "inside the record's interval",
            [iv.low, iv.high] if iv else None, qn.value, inside)
    for arm in ("reference", "method"):
        a, b = getattr(orig.size, arm), getattr(new.size, arm)
        add(f"size.{arm}", "equal", a.model_dump(), b.model_dump(), a == b)
    if orig.compute is not None and new.compute is not None:
        add("compute.method", "equal", orig.compute.method, new.compute.method,
            orig.compute.method == new.compute.method)
    j = judge_speed(orig, new, speed_tolerance)
    add("speed.status (re-run)", "ok by the speed-trust rules", orig.speed.status,
        j.rerun_status + (f" ({'; '.join(j.rerun_reasons)})" if j.rerun_reasons else ""), j.rerun_status == "ok")
    add("speedup", f"the record's inside the re-run's interval widened by {j.tolerance:.0%}", j.record_speedup,
        {"re-run": j.rerun_speedup, "accepted": [round(j.accepted[0], 4), round(j.accepted[1], 4)]},
        j.accepted[0] <= j.record_speedup <= j.accepted[1])
    return checks


def differences(orig: Result, new: Result) -> dict[str, float]:
    """The headline figures' re-run - record (empty when either run failed)."""
    if orig.status != "ok" or new.status != "ok":
        return {}
    return {k: f(new) - f(orig) for k, f in (
        ("quality.value", lambda r: r.quality.value), ("quality.reference_value", lambda r: r.quality.reference_value),
        ("speed.speedup", lambda r: r.speed.speedup), ("speed.interval.low", lambda r: r.speed.interval.low),
        ("speed.interval.high", lambda r: r.speed.interval.high))}


def make_verification(record: Result, new: Result, result_file: str, by: str, diffs: list[str],
                      quality_rule: str = "exact", speed_tolerance: float = 0.0,
                      warnings: list[str] | None = None) -> Verification:
    """The verification of `record` by its re-run `new` (whether or not the checks pass: `verified` says).
    `diffs`: the refusing differences it was forced past; `warnings`: the others."""
    from bench import __version__

    checks = compare(record, new, quality_rule, speed_tolerance, forced=bool(diffs))
    speed = judge_speed(record, new, speed_tolerance) if record.speed and new.speed else None
    return Verification(
        run_id=record.run_id, result_file=result_file, config_hash=record.provenance.config_hash,
        verified=all(c.ok for c in checks), verified_by=by,
        verified_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=new.profile.detected,
        bench_version=__version__, git_sha=new.provenance.git_sha, forced=bool(diffs), version_differences=diffs,
        warnings=list(warnings or []),
        quality_rule=quality_rule, speed_tolerance=speed_tolerance, speed=speed,
        differences=differences(record, new), checks=checks, rerun=new.model_dump(mode="json", by_alias=True))


def verification_problems(v: Verification, record: Result, result_file: str) -> list[str]:
    """Why `v` does not show `record` (the file `result_file`) as verified, forcing aside (`v.forced` is an
    honest note, and a reader shows such a record as not verified); empty when it does. The file is judged,
    not trusted: its stored re-run is compared with the record as it is now, by the same rules."""
    from pydantic import ValidationError

    from bench.registry import RegistryError
    from bench.result import invariant_errors

    if (v.result_file, v.run_id, v.config_hash) != (result_file, record.run_id, record.provenance.config_hash):
        return [f"it verifies another record (file {v.result_file}, run {v.run_id}, config {v.config_hash[:12]}), "
                f"not {result_file}"]
    problems = [] if v.verified else ["it says verified: false"]
    failed = [c.name for c in v.checks if not c.ok]
    if failed or not v.checks:
        problems.append(f"its own checks failed: {', '.join(failed)}" if failed else "it holds no checks")
    if v.speed is None:
        problems.append("it has no speed judgement (a verification judges the record's speedup by the re-run's)")
    try:
        rerun = Result.model_validate(v.rerun)
        bad = invariant_errors(rerun)
        if bad:
            return problems + [f"its re-run is not a consistent record: {bad[0]}"]
        again = compare(record, rerun, v.quality_rule, v.speed_tolerance, forced=v.forced)
    except ValidationError as e:
        err = e.errors()[0]
        return problems + [f"its re-run is not a valid record ({'.'.join(map(str, err['loc'])) or 'rerun'}: "
                           f"{err['msg']})"]
    except (RegistryError, ValueError, RecursionError) as e:  # an unknown profile, an infinite figure, a maze
        return problems + [f"it cannot be judged here: {(str(e) or type(e).__name__).splitlines()[0]}"]
    disagree = [f"{c.name} (rule: {c.rule}; record {c.original}, re-run {c.reproduced})" for c in again if not c.ok]
    if disagree:
        problems.append("the record does not match its re-run: " + "; ".join(disagree))
    return problems


def verifier() -> str:
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        name = ""
    try:
        return name or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def reproduce(path: Path, force: bool = False, quality_rule: str = "exact", by: str | None = None,
              reporter=None, speed_tolerance: float = 0.0
              ) -> tuple[bool, list[Check], Verification | None, list[str], list[str]]:
    """(verified, checks, verification written or None, refusing differences forced past, warnings). Raises
    `ReproduceRefused`. `speed_tolerance` widens the re-run's speedup interval where it is larger than the
    profile's tolerance."""
    from bench.config import ConfigError
    from bench.hardware import ProfileMismatch
    from bench.registry import RegistryError
    from bench.runner import RunFailed, run

    record = read_record(path)
    try:
        diffs, warns = classify_differences(record)
    except RegistryError as e:
        raise ReproduceRefused(f"the record names something this checkout does not have: {e}") from None
    if diffs and not force:
        also = ("\nother differences, warnings only:\n  " + "\n  ".join(warns)) if warns else ""
        raise ReproduceRefused("the record was made with other versions of what its numbers depend on, so they "
                               "need not repeat here:\n  " + "\n  ".join(diffs) + also
                               + "\n(--force reproduces anyway and records the differences)")
    budget = record.budget
    with tempfile.TemporaryDirectory(prefix="bench-reproduce-") as tmp:
        try:
            out = run(record.task.name, record.method.name, record.profile.name, record.seed,
                      record.method.hyperparameters, force, Path(tmp), reporter, budget=budget,
                      resume=False, compile=record.profile.compiled)  # evaluate anew: a cached evaluation would repeat the record's own answer
            new = out.result
        except ProfileMismatch as e:
            raise ReproduceRefused(f"{e}\n(--force reproduces anyway and records the differences)") from None
        except (RegistryError, ConfigError) as e:
            raise ReproduceRefused(f"the record's configuration cannot run here: {e}") from None
        except RunFailed as e:
            new = e.result
    v = make_verification(record, new, Path(path).name, by or verifier(), diffs, quality_rule, speed_tolerance,
                          warns)
    if not v.verified:
        return False, v.checks, None, diffs, warns
    atomic_write_text(verification_path(Path(path)), v.to_json())
    return True, v.checks, v, diffs, warns


def checks_table(checks: list[Check], title: str):
    """The checks as a table; every cell from a record is plain text (a field is never read as markup)."""
    import json

    from rich.table import Table
    from rich.text import Text

    t = Table(title=title)
    for col in ("check", "rule", "record", "re-run", ""):
        t.add_column(col, overflow="fold")
    for c in checks:
        cells = [x if isinstance(x, str) else json.dumps(x) for x in (c.name, c.rule, c.original, c.reproduced)]
        t.add_row(*map(Text, cells), Text("ok", "green") if c.ok else Text("MISMATCH", "red"))
    return t
