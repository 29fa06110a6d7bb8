"""`bench reproduce RESULT.json`: re-run exactly the configuration of a record, compare, and mark it verified.

1. The record is read and validated (schema and invariants: a record whose numbers do not add up, whose
   config hash does not match its configuration, or which does not lie where its own fields place it, is
   refused before anything runs).
2. Versions are compared: bench, the task, the method and every tracked package. Any difference refuses the
   reproduction (exit 2) unless `force`, in which case the differences are written into the verification.
3. The run is repeated in this process with the record's task, method, hyper-parameters, profile, seed and
   budget, into a temporary folder (the results tree gets no second record of the same run).
4. Compared: quality must be equal for a fixed seed (`quality_rule="exact"`: value, reference value, n,
   every control), or the re-run value must lie inside the record's interval (`"interval"`, for metrics that
   are noisy by nature or another device); the reference weights and the data must be the same bits; the
   model sizes and MACs must be equal; the paired speedup intervals must overlap (`speed_tolerance` widens
   both by a relative margin: a run's bootstrap interval covers the noise within that run, not the spread
   between processes or machines, and on this 2-core machine one re-run of `kd` in three missed by ~1%).
5. When everything holds, `<run-id>.verified.json` (a `Verification`) is written beside the record: who,
   when, on what machine, the checks and the re-run's record. The leaderboard shows such a result as
   verified. When something fails, nothing is written and the command exits 1 with the mismatches.
"""

from __future__ import annotations

import getpass
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.result import Machine, Result
from bench.store import VERIFIED_SUFFIX, InvalidResult, atomic_write_text, load_result

VERIFICATION_SCHEMA = "bench.verification/1"


class ReproduceRefused(RuntimeError):
    """The record cannot be reproduced as it stands (invalid, misplaced, unknown names, other versions)."""


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    rule: str
    original: Any
    reproduced: Any
    ok: bool


class Verification(BaseModel):
    """`<run-id>.verified.json`: a record reproduced by someone, somewhere, at some time."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: Literal["bench.verification/1"] = Field(VERIFICATION_SCHEMA, alias="schema")
    run_id: str
    result_file: str
    config_hash: str
    verified: bool
    verified_by: str
    verified_at: str
    machine: Machine
    bench_version: str
    git_sha: str | None
    forced: bool = False
    version_differences: list[str] = []
    quality_rule: Literal["exact", "interval"] = "exact"
    speed_tolerance: float = 0.0
    checks: list[Check]
    rerun: dict[str, Any]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True) + "\n"


def verification_path(result_path: Path) -> Path:
    p = Path(result_path)
    return p.with_name(p.name[: -len(".json")] + VERIFIED_SUFFIX)


def load_verification(path: Path) -> Verification:
    import json

    return Verification.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


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
    rel = record.relpath()
    if path.resolve().parts[-len(rel.parts):] != rel.parts:
        raise ReproduceRefused(f"{path} is not where its fields place it (<results>/{rel.as_posix()}): a record "
                               f"is verified in its place in a results tree")
    return record


def version_differences(record: Result) -> list[str]:
    from bench import __version__
    from bench.provenance import package_versions
    from bench.registry import get_method_spec, get_task_spec

    diffs = []
    if record.provenance.bench_version != __version__:
        diffs.append(f"bench version: record {record.provenance.bench_version}, here {__version__}")
    t, m = get_task_spec(record.task.name), get_method_spec(record.method.name)
    if record.task.version != t.version:
        diffs.append(f"task {t.name} version: record {record.task.version}, here {t.version}")
    if record.method.version != m.version:
        diffs.append(f"method {m.name} version: record {record.method.version}, here {m.version}")
    if record.method.family != m.family:
        diffs.append(f"method {m.name} family: record {record.method.family}, here {m.family}")
    here = package_versions()
    for name in sorted(set(record.provenance.packages) | set(here)):
        a, b = record.provenance.packages.get(name), here.get(name)
        if a != b:
            diffs.append(f"package {name}: record {a or '(absent)'}, here {b or '(absent)'}")
    return diffs


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
                "profile": r.profile.name, "seed": r.seed}

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
    so, sn = orig.speed.interval, new.speed.interval
    w = 1.0 + speed_tolerance  # both intervals widened by this factor around nothing but their own bounds
    rule = "overlap" + (f" (each widened by {speed_tolerance:.0%})" if speed_tolerance else "")
    add("speedup interval", rule, [so.low, so.high], [sn.low, sn.high],
        so.low / w <= sn.high * w and sn.low / w <= so.high * w)
    return checks


def verifier() -> str:
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        name = ""
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def reproduce(path: Path, force: bool = False, quality_rule: str = "exact", by: str | None = None,
              reporter=None, speed_tolerance: float = 0.0) -> tuple[bool, list[Check], Verification | None, list[str]]:
    """(verified, checks, verification written or None, version differences). Raises `ReproduceRefused`."""
    from bench import __version__
    from bench.config import ConfigError
    from bench.registry import RegistryError
    from bench.runner import RunFailed, run

    record = read_record(path)
    try:
        diffs = version_differences(record)
    except RegistryError as e:
        raise ReproduceRefused(f"the record names something this checkout does not have: {e}") from None
    if diffs and not force:
        raise ReproduceRefused("the record was made with other versions, so its numbers need not repeat here:\n  "
                               + "\n  ".join(diffs) + "\n(--force reproduces anyway and records the differences)")
    budget = record.budget
    with tempfile.TemporaryDirectory(prefix="bench-reproduce-") as tmp:
        try:
            out = run(record.task.name, record.method.name, record.profile.name, record.seed,
                      record.method.hyperparameters, False, Path(tmp), reporter, budget=budget)
            new = out.result
        except (RegistryError, ConfigError) as e:
            raise ReproduceRefused(f"the record's configuration cannot run here: {e}") from None
        except RunFailed as e:
            new = e.result
    checks = compare(record, new, quality_rule, speed_tolerance, forced=bool(diffs))
    ok = all(c.ok for c in checks)
    if not ok:
        return False, checks, None, diffs
    v = Verification(
        run_id=record.run_id, result_file=Path(path).name, config_hash=record.provenance.config_hash,
        verified=True, verified_by=by or verifier(), verified_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=new.profile.detected, bench_version=__version__, git_sha=new.provenance.git_sha,
        forced=bool(diffs), version_differences=diffs, quality_rule=quality_rule,
        speed_tolerance=speed_tolerance, checks=checks,
        rerun=new.model_dump(mode="json", by_alias=True))
    atomic_write_text(verification_path(Path(path)), v.to_json())
    return True, checks, v, diffs


def checks_table(checks: list[Check], title: str):
    import json

    from rich.table import Table

    t = Table(title=title)
    for col in ("check", "rule", "record", "re-run", ""):
        t.add_column(col, overflow="fold")

    def show(x: Any) -> str:
        return x if isinstance(x, str) else json.dumps(x)

    for c in checks:
        t.add_row(c.name, c.rule, show(c.original), show(c.reproduced), "[green]ok" if c.ok else "[red]MISMATCH")
    return t
