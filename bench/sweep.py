"""Sweeps: a YAML grid of (task, method, hyper-parameters, seed, profile) expanded into runs, each run in its
own process, resumable by config hash.

    name: digits
    tasks: [digits]
    profiles: [cpu]
    seeds: [0, 1]
    budget: full                 # or smoke: CI-sized runs, never for the leaderboard
    methods:
      - none                     # a bare name: the method's default hyper-parameters
      - method: magnitude
        grid: {sparsity: [0.5, 0.9], finetune_epochs: 2}   # a list is swept, a scalar is fixed
    resources: {num_gpus: 1}     # what each Ray task reserves; by default num_cpus is the profile's threads
                                 # and num_gpus is 1 on a cuda profile

The file is validated by `SweepFile` (unknown keys, wrong types and empty lists are errors that name the
field), then every run is resolved against the registries and its hyper-parameters converted by the method's
own config class before anything runs, so a typo fails the whole sweep at once and writes nothing.

Resuming: a run whose config hash (`bench.provenance.config_hash`) and budget already have an `ok` record in
the results tree is skipped; one with only `failed` records is skipped too unless `retry_failed`.
Executors live in `bench.executors`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from bench.store import DEFAULT_RESULTS

_NAME = r"^[a-z0-9][a-z0-9._-]*$"
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr, None]
GridValue = Union[Scalar, list[Union[Scalar, list[Scalar]]]]


class SweepError(ValueError):
    """A sweep file that cannot be read, validated or expanded; nothing has run and nothing was written."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MethodEntry(_M):
    method: str = Field(pattern=_NAME, description="a registered method name")
    grid: dict[str, GridValue] = Field(default_factory=dict,
                                       description="hyper-parameter -> value, or a list of values to sweep")


class Resources(_M):
    num_cpus: float | None = Field(None, ge=0, description="CPUs each Ray task reserves; default the profile's "
                                                          "threads")
    num_gpus: float | None = Field(None, ge=0, description="GPUs each Ray task reserves; default 1 on cuda")


class SweepFile(_M):
    name: str = Field("sweep", pattern=_NAME)
    description: str = ""
    tasks: list[str] = Field(min_length=1)
    methods: list[Union[str, MethodEntry]] = Field(min_length=1)
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1)
    profiles: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    budget: Literal["full", "smoke"] = "full"
    resources: Resources = Field(default_factory=Resources)


@dataclass
class RunSpec:
    """One run of a sweep, resolved: its converted hyper-parameters and config hash are the runner's own."""

    task: str
    method: str
    profile: str
    seed: int
    budget: str
    overrides: dict[str, Any]  # as given in the sweep file (JSON values)
    hyperparameters: dict[str, Any]  # the method's whole config after the overrides
    config_hash: str
    device: str = "cpu"
    threads: int = 1  # the profile's torch threads

    @property
    def key(self) -> tuple[str, str]:
        return self.config_hash, self.budget

    def label(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.method} on {self.task} [{self.profile}] seed {self.seed}" + (f" ({hp})" if hp else "")

    def worker_spec(self, results_dir: Path, shared_cores: bool = False) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "profile": self.profile, "seed": self.seed,
                "overrides": self.overrides, "budget": self.budget, "results_dir": str(results_dir),
                "shared_cores": shared_cores}


@dataclass
class Outcome:
    spec: RunSpec
    status: Literal["ok", "failed", "error", "skipped", "interrupted"]
    path: Path | None = None
    note: str = ""  # why skipped, or the error's last lines
    seconds: float = 0.0
    result: Any = None  # the bench.result.Result, when one was written or found


@dataclass
class SweepReport:
    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if (self.count("failed") or self.count("error")) else 0


# --- reading and expanding ---------------------------------------------------------------------------------

def format_errors(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        out.append(f"{loc}: {err['msg']}")
    return out


def load_sweep(path: Path) -> SweepFile:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"cannot read sweep file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)  # safe: no Python objects from tags
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with tasks, methods, seeds, ...; found "
                         f"{type(data).__name__}")
    try:
        return SweepFile.model_validate(data)
    except ValidationError as e:
        valid = ", ".join(SweepFile.model_fields)
        raise SweepError(f"{path} is not a valid sweep file:\n  " + "\n  ".join(format_errors(e))
                         + f"\n(top-level keys: {valid}; a method entry has: method, grid)") from None


def _grid_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    import itertools

    keys = list(grid)
    choices = []
    for k in keys:
        v = grid[k]
        values = v if isinstance(v, list) else [v]
        if not values:
            raise SweepError(f"grid key {k!r} has an empty list of values: the grid would be empty")
        choices.append(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def expand(sweep: SweepFile, budget: str | None = None) -> tuple[list[RunSpec], list[str]]:
    """(runs, notes). Every name, override and value is checked first; all problems are raised together."""
    from bench import __version__
    from bench.config import ConfigError, to_jsonable
    from bench.profiles import load_profile
    from bench.provenance import config_hash
    from bench.registry import RegistryError, check_supports, create_method, get_method_spec, get_task_spec

    budget = budget or sweep.budget
    problems: list[str] = []
    notes: list[str] = []
    tasks, profiles = [], []
    for t in sweep.tasks:
        try:
            tasks.append(get_task_spec(t))
        except RegistryError as e:
            problems.append(str(e))
    for p in sweep.profiles:
        try:
            profiles.append(load_profile(p))
        except RegistryError as e:
            problems.append(str(e))
    entries = [MethodEntry(method=m) if isinstance(m, str) else m for m in sweep.methods]
    runs: list[RunSpec] = []
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        try:
            mspec = get_method_spec(entry.method)
        except RegistryError as e:
            problems.append(str(e))
            continue
        try:
            points = _grid_points(entry.grid)
        except SweepError as e:
            problems.append(f"method {entry.method!r}: {e}")
            continue
        for point in points:
            try:
                hp = to_jsonable(create_method(mspec.name, point).config)
            except ConfigError as e:
                problems.append(str(e))
                continue
            for tspec in tasks:
                try:
                    check_supports(mspec, tspec)
                except RegistryError:
                    notes.append(f"{mspec.name} does not run on {tspec.name} ({tspec.modality}): left out")
                    continue
                for prof in profiles:
                    for seed in sweep.seeds:
                        h = config_hash(tspec.name, tspec.version, mspec.name, mspec.version, hp, prof.name, seed,
                                        __version__)
                        if (h, budget) in seen:
                            notes.append(f"{mspec.name} {point} seed {seed} appears twice in the grid: run once")
                            continue
                        seen.add((h, budget))
                        runs.append(RunSpec(tspec.name, mspec.name, prof.name, seed, budget, dict(point), hp, h,
                                            prof.device, prof.threads))
    if problems:
        raise SweepError("the sweep cannot run:\n  " + "\n  ".join(dict.fromkeys(problems)))
    if not runs:
        raise SweepError("the grid is empty: no (task, method) pair in it can run"
                         + (" (" + "; ".join(notes) + ")" if notes else ""))
    return runs, list(dict.fromkeys(notes))


# --- resuming ----------------------------------------------------------------------------------------------

def existing_records(root: Path, runs: list[RunSpec]) -> dict[tuple[str, str], list[tuple[str, Path, Any]]]:
    """(config hash, budget) -> [(status, path, result)] for the valid records of the runs' folders."""
    from bench.store import InvalidResult, iter_result_files, load_result

    found: dict[tuple[str, str], list] = {}
    for folder in sorted({(r.profile, r.task, r.method) for r in runs}):
        d = Path(root).joinpath(*folder)
        if not d.is_dir():
            continue
        for p in iter_result_files(d):
            try:
                r = load_result(p, Path(root))
            except InvalidResult:
                continue  # an invalid file proves nothing was done; `bench validate` reports it
            key = (r.provenance.config_hash, r.budget)
            found.setdefault(key, []).append((r.status, p, r))
    return found


def plan(runs: list[RunSpec], root: Path, retry_failed: bool) -> tuple[list[RunSpec], list[Outcome]]:
    """(runs to do, skipped outcomes)."""
    have = existing_records(root, runs)
    todo, skipped = [], []
    for spec in runs:
        records = have.get(spec.key, [])
        ok = [(p, r) for s, p, r in records if s == "ok"]
        if ok:
            skipped.append(Outcome(spec, "skipped", ok[0][0], "done before", result=ok[0][1]))
        elif records and not retry_failed:
            skipped.append(Outcome(spec, "skipped", records[0][1], "failed before; --retry-failed runs it again",
                                   result=records[0][2]))
        else:
            todo.append(spec)
    return todo, skipped


# --- running -----------------------------------------------------------------------------------------------

def run_sweep(sweep: SweepFile, results_root: Path = DEFAULT_RESULTS, executor: str = "local", jobs: int | None = None,
              retry_failed: bool = False, budget: str | None = None, address: str | None = None,
              display=None) -> SweepReport:
    from bench.executors import make_executor

    runs, notes = expand(sweep, budget)
    todo, skipped = plan(runs, results_root, retry_failed)
    if executor == "local" and (jobs or 1) > 1 and len(todo) > 1:
        notes.append(f"{jobs} runs at a time share this machine's cores: quality is unaffected, but timings are "
                     f"noisier than one at a time (--jobs 1); prefer that for results you submit")
    report = SweepReport(list(skipped))
    if display is not None:
        display.begin(len(runs), skipped, notes)
    if not todo:
        return report
    ex = make_executor(executor, jobs=jobs, address=address, resources=sweep.resources)

    def finished(o: Outcome) -> None:
        report.outcomes.append(o)
        if display is not None:
            display.finished(o)

    t0 = time.perf_counter()
    try:
        ex.run(todo, Path(results_root), finished, (display.started if display is not None else None))
    except KeyboardInterrupt:
        report.interrupted = True
    done = {id(o.spec) for o in report.outcomes}
    for spec in todo:
        if id(spec) not in done:
            report.outcomes.append(Outcome(spec, "interrupted", note="not finished; run the sweep again"))
    order = {id(s): i for i, s in enumerate(runs)}
    report.outcomes.sort(key=lambda o: order[id(o.spec)])
    if display is not None:
        display.end(time.perf_counter() - t0)
    return report


# --- display -----------------------------------------------------------------------------------------------

class SweepDisplay:
    """A live line of done / running / failed / skipped counts over a progress bar, a line per finished run,
    and a table at the end (`summary_table`)."""

    def __init__(self, console):
        self.console = console
        self.progress = None
        self.counts = {"ok": 0, "failed": 0, "error": 0, "interrupted": 0}
        self.running = self.skipped = 0

    def _describe(self) -> str:
        c = self.counts
        return (f"done {c['ok']} · running {self.running} · failed {c['failed'] + c['error']} · "
                f"skipped {self.skipped}")

    def begin(self, total: int, skipped: list[Outcome], notes: list[str]) -> None:
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        for n in notes:
            self.console.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
        self.skipped = len(skipped)
        self.console.print(f"{total} runs in the sweep; {len(skipped)} already have a record (skipped), "
                           f"{total - len(skipped)} to run", highlight=False)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console)
        self.task = self.progress.add_task(self._describe(), total=max(total - len(skipped), 1))
        self.progress.start()

    def started(self, spec: RunSpec) -> None:
        self.running += 1
        self.progress.update(self.task, description=self._describe())

    def finished(self, o: Outcome) -> None:
        self.running = max(0, self.running - 1)
        self.counts[o.status] = self.counts.get(o.status, 0) + 1
        self.progress.update(self.task, advance=1, description=self._describe())
        colour = {"ok": "green", "interrupted": "yellow"}.get(o.status, "red")
        from rich.markup import escape

        self.progress.console.print(f"[{colour}]{o.status:>6}[/] " + escape(f"{o.spec.label()}  {_numbers(o)}  "
                                                                          f"({o.seconds:.1f} s)"), highlight=False)

    def end(self, seconds: float) -> None:
        if self.progress is not None:
            self.progress.stop()


def _numbers(o: Outcome) -> str:
    r = o.result
    if r is None or r.status != "ok":
        return ""
    q, s = r.quality, r.speed
    return (f"{q.metric} {q.value:.4f} ({q.delta:+.4f})  speedup {s.speedup:.2f}x "
            f"[{s.interval.low:.2f}, {s.interval.high:.2f}]")


def summary_table(report: SweepReport):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Sweep: {report.count('ok')} ok, {report.count('failed') + report.count('error')} failed, "
                    f"{report.count('skipped')} skipped, {report.count('interrupted')} not finished")
    for col in ("status", "task", "method", "hyper-parameters", "seed", "quality (delta)", "speedup [95%]",
                "record / note"):
        t.add_column(col, overflow="fold")
    for o in report.outcomes:
        r = o.result
        q = s = ""
        if r is not None and r.status == "ok":
            q = f"{r.quality.value:.4f} ({r.quality.delta:+.4f})"
            s = f"{r.speed.speedup:.2f}x [{r.speed.interval.low:.2f}, {r.speed.interval.high:.2f}]"
        hp = ", ".join(f"{k}={v}" for k, v in o.spec.overrides.items())
        where = o.path.name if o.path else ""
        note = o.note.splitlines()[0] if o.note else ""
        t.add_row(o.status, o.spec.task, o.spec.method, escape(hp), str(o.spec.seed), q, s,
                  escape(where + ("\n" if where and note else "") + note))  # a cell is markup: the text is not
    return t
