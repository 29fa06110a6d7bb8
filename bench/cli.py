"""The `bench` command line. Heavy modules (torch, the runner) are imported inside the commands that use
them, so `bench list` and `bench validate` start fast. Text that is not ours (messages, names, paths, YAML and
pip hints such as `.[ray]`) is never read as rich markup: it is escaped, or printed with markup off."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark model compression and acceleration methods against their reference.")
reference_app = typer.Typer(no_args_is_help=True, help="Build and check the embedded tasks' reference models.")
app.add_typer(reference_app, name="reference")
out = Console()
err = Console(stderr=True)


class Listable(str, Enum):
    tasks = "tasks"
    methods = "methods"
    profiles = "profiles"


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@app.command("list")
def list_(what: Annotated[Listable, typer.Argument(help="tasks, methods or profiles")],
          task: Annotated[Optional[str], typer.Option(help="with `methods`: only those that run on this task "
                                                          "(its modality and declared capabilities)")] = None) -> None:
    """List the registered tasks, methods (grouped by family) or hardware profiles."""
    from bench.registry import FAMILIES, METHODS, TASKS, RegistryError, get_task_spec, supports

    if what is Listable.tasks:
        t = Table(title="Tasks")
        for col in ("name", "tier", "modality", "metric", "version", "summary"):
            t.add_column(col)
        for s in TASKS:
            t.add_row(s.name, s.tier, s.modality, s.metric, s.version, s.summary)
    elif what is Listable.methods:
        t = Table(title="Methods" + (f" that run on {task}" if task else ""))
        for col in ("family", "name", "paper", "year", "modalities", "needs", "summary"):
            t.add_column(col)
        specs = sorted(METHODS, key=lambda s: (FAMILIES.index(s.family), s.name))
        if task:
            try:
                tspec = get_task_spec(task)
            except RegistryError as e:
                _fail(str(e))
            specs = [s for s in specs if supports(s, tspec)]
        for s in specs:
            t.add_row(s.family, s.name, s.paper, str(s.year or ""), ", ".join(s.modalities),
                      _needs(s), s.summary)
    else:
        from bench.profiles import load_profile, profile_names

        t = Table(title="Profiles")
        for col in ("name", "device", "dtype", "threads", "batch sizes", "description"):
            t.add_column(col)
        for name in profile_names():
            p = load_profile(name)
            t.add_row(p.name, p.device, p.dtype, str(p.threads),
                      ", ".join(f"{k}={v}" for k, v in p.batch_size.items()), p.description)
    out.print(t)


def _needs(spec) -> str:
    from bench.registry import requirement_name

    req = spec.requires
    if isinstance(req, dict):
        return "; ".join(f"{m}: " + ", ".join(requirement_name(r) for r in rs) for m, rs in req.items() if rs)
    return ", ".join(requirement_name(r) for r in req)


@app.command()
def run(
    method: Annotated[str, typer.Option("--method", "-m", help="registered method name (`bench list methods`)")],
    task: Annotated[str, typer.Option("--task", "-t", help="registered task name (`bench list tasks`)")],
    profile: Annotated[str, typer.Option(help="hardware profile (`bench list profiles`)")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the method's training and data order")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="hyper-parameter override key=value; repeat")] = None,
    allow_mismatch: Annotated[bool, typer.Option(help="run even when the machine does not match the profile "
                                                       "(refused by default; the record keeps the mismatch)")] = False,
    results_dir: Annotated[Path, typer.Option(help="root of the results tree")] = Path("results"),
    budget: Annotated[str, typer.Option(help="'full', or 'smoke' for a tiny-budget check run")] = "full",
    processes: Annotated[int, typer.Option(min=1, help="time in this many fresh worker processes and pool their "
                                                       "pairs, so the interval covers between-process "
                                                       "variation")] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="time both arms under torch.compile (static KV cache "
                                                            "for Hugging Face models); recorded in the result")] = False,
) -> None:
    """Run one method on one task, measured side by side against the reference; write the result JSON."""
    import warnings

    from bench.config import ConfigError, parse_sets
    from bench.hardware import ProfileMismatch
    from bench.progress import RichReporter
    from bench.registry import RegistryError

    if budget not in ("full", "smoke"):
        _fail(f"--budget {budget!r} is not one of: full, smoke")
    try:
        overrides = parse_sets(set_)
    except ConfigError as e:
        _fail(str(e))
    from bench.runner import RecordNotWritten, RunFailed, run as do_run

    def show_warning(message, category, filename, lineno, file=None, line=None):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)

    warnings.showwarning = show_warning
    try:
        from bench.registry import get_method_spec
        from bench.scaffold import is_template

        if is_template(get_method_spec(method)):
            err.print(f"[yellow]warning:[/] {escape(repr(method))} is still the generated template: it returns the "
                      f"reference unchanged, and `bench check` refuses it and its results until it is edited",
                      highlight=False)
    except RegistryError:
        pass  # the run below says so, with near matches
    try:
        outcome = do_run(task, method, profile, seed, overrides, allow_mismatch, results_dir, RichReporter(err),
                         budget=budget, argv=sys.argv, processes=processes, compile=compile)
    except (RegistryError, ConfigError, ProfileMismatch) as e:  # a PreflightError is a ConfigError
        _fail(str(e))
    except RunFailed as e:
        err.print(e.result.error.traceback, highlight=False, markup=False)
        _fail(f"the run failed: {e}", code=1)
    except RecordNotWritten as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt as e:  # a RunInterrupted says which step; before the runner started, nothing ran
        err.print(f"[yellow]{escape(str(e) or 'interrupted before the run started: nothing was written')}[/]",
                  highlight=False)
        raise typer.Exit(130) from None
    from bench.report import summary_table

    out.print(summary_table(outcome.result, outcome.path))
    _say_unreliable(outcome.result)


def _say_unreliable(result) -> None:
    s = result.speed
    if s is not None and s.status != "ok":
        err.print("[bold yellow]the speed figure is UNRELIABLE[/] (the leaderboard and `bench recommend` leave it "
                  "out of ranks; quality figures are unaffected):", highlight=False)
        for reason in s.reasons:
            err.print(f"  - {reason}", highlight=False, markup=False)
        err.print("re-time it on a quiet machine with `bench remeasure <record>`", highlight=False, markup=False)


@app.command()
def show(path: Annotated[Path, typer.Argument(help="a result JSON file")],
         raw: Annotated[bool, typer.Option(help="print the JSON itself")] = False) -> None:
    """Show one result record as a summary table (or its raw JSON)."""
    from bench.report import summary_table
    from bench.store import InvalidResult, load_result

    if not path.is_file():
        _fail(f"{path} is not a file")
    try:
        result = load_result(path)
    except InvalidResult as e:
        _fail("invalid result:\n  " + "\n  ".join(e.problems), code=1)
    if raw:
        out.print_json(result.to_json())
    else:
        out.print(summary_table(result, path))


@app.command()
def validate(paths: Annotated[list[Path], typer.Argument(help="result files or folders")]) -> None:
    """Check result files against the schema and its invariants; exit 1 listing every problem."""
    from bench.store import validate_tree

    from bench.plausibility import problems as plausibility

    n_ok = n_bad = n_warn = 0
    for p in paths:
        if not p.exists():
            _fail(f"{p} does not exist")
        ok, bad = validate_tree(p)
        n_ok += len(ok)
        n_bad += len(bad)
        for b in bad:
            out.print(f"[red]INVALID[/] {escape(str(b.path))}", highlight=False)
            for problem in b.problems:
                out.print(f"    {problem}", highlight=False, markup=False)
        for r in ok:
            for problem in plausibility(r):
                n_warn += 1
                out.print(f"[yellow]warning[/] {escape(str(p if p.is_file() else p / r.relpath()))}: ",
                          highlight=False, end="")
                out.print(problem, highlight=False, markup=False)
    out.print(f"{n_ok} valid, {n_bad} invalid" + (f", {n_warn} speed warnings (`bench check` refuses them in a "
                                                 f"pull request)" if n_warn else ""))
    if n_bad:
        raise typer.Exit(1)


@app.command()
def schema(write: Annotated[bool, typer.Option(help="write bench/schema/result-1.schema.json")] = False,
           check: Annotated[bool, typer.Option(help="exit 1 if the committed file is out of date")] = False) -> None:
    """Print (or write, or check) the JSON Schema of the result record."""
    from bench.result import SCHEMA_FILE, json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if check:
        current = SCHEMA_FILE.read_text() if SCHEMA_FILE.is_file() else ""
        if current != text:
            _fail(f"{SCHEMA_FILE} is out of date; run `bench schema --write`", code=1)
        out.print(f"{SCHEMA_FILE} is up to date", markup=False)
    elif write:
        from bench.store import atomic_write_text

        atomic_write_text(SCHEMA_FILE, text)
        out.print(f"wrote {SCHEMA_FILE}", markup=False)
    else:
        sys.stdout.write(text)


@reference_app.command("build")
def reference_build(
    task: Annotated[str, typer.Argument(help="an embedded task")],
    publish: Annotated[bool, typer.Option(help="also write it to tasks/artifacts/<task>/ as the task's "
                                               "published reference")] = False,
) -> None:
    """Train an embedded task's reference deterministically into the cache and print its sha256."""
    from bench.reference import build_reference
    from bench.registry import RegistryError

    try:
        digest, path, canonical = build_reference(task, publish=publish, console=err)
    except RegistryError as e:
        _fail(str(e))
    out.print(f"{task}: sha256 {digest}\n  at {path}\n  "
              + ("matches the task's published reference" if canonical
                 else "differs from the task's published reference (results made on it will say so)"), markup=False)


class Executor(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="a sweep YAML file, e.g. sweeps/digits.yaml")],
    executor: Annotated[Executor, typer.Option(help="local processes, or one Ray task per run")] = Executor.local,
    jobs: Annotated[Optional[int], typer.Option(min=1, help="runs at a time (local, default 1); the CPUs of a "
                                                           "local Ray (default: all)")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: start Ray here")] = None,
    results_dir: Annotated[Path, typer.Option(help="root of the results tree")] = Path("results"),
    budget: Annotated[Optional[str], typer.Option(help="override the file's budget: full or smoke")] = None,
    retry_failed: Annotated[bool, typer.Option(help="run again the runs whose last record is failed")] = False,
    dry_run: Annotated[bool, typer.Option(help="list the runs and what would be skipped; run nothing")] = False,
) -> None:
    """Run a grid of (task, method, hyper-parameters, seed, profile), each run in its own process; a sweep
    started again skips the runs that already have a record with the same config hash."""
    import signal

    from bench.executors import ExecutorError
    from bench.sweep import SweepDisplay, SweepError, expand, load_sweep, plan, run_sweep, summary_table

    if budget is not None and budget not in ("full", "smoke"):
        _fail(f"--budget {budget!r} is not one of: full, smoke")
    try:
        spec = load_sweep(file)
        if dry_run:
            runs, notes = expand(spec, budget)
            todo, skipped = plan(runs, results_dir, retry_failed)
            for n in notes:
                err.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
            for o in skipped:
                out.print(f"skip  {o.spec.label()}  ({o.note}: {o.path})", highlight=False, markup=False)
            for r in todo:
                out.print(f"run   {r.label()}  config {r.config_hash[:12]}", highlight=False, markup=False)
            out.print(f"{len(runs)} runs: {len(todo)} to run, {len(skipped)} skipped")
            return
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it like Ctrl-C
        try:
            report = run_sweep(spec, results_dir, executor.value, jobs, retry_failed, budget, address,
                               display=SweepDisplay(err))
        finally:
            signal.signal(signal.SIGTERM, previous)
    except SweepError as e:
        _fail(str(e))
    except ExecutorError as e:
        _fail(str(e))
    out.print(summary_table(report))
    for o in report.outcomes:
        if o.status in ("failed", "error") and o.note:
            err.print(f"[red]{o.status}[/] {escape(o.spec.label())}:", highlight=False)
            err.print(o.note, highlight=False, markup=False)
    if report.interrupted:
        err.print("[yellow]interrupted:[/] finished runs kept their records and nothing partial was written; "
                  "run the same command again to do the rest", highlight=False)
    raise typer.Exit(report.exit_code)


class QualityRule(str, Enum):
    exact = "exact"
    interval = "interval"


@app.command()
def reproduce(
    result: Annotated[Path, typer.Argument(help="a result JSON in a results tree")],
    force: Annotated[bool, typer.Option(help="reproduce even when the bench, task or method version, or that of "
                                            "a package they import, differs (recorded; shown as forced)")] = False,
    quality: Annotated[QualityRule, typer.Option(help="exact: equal for the fixed seed; interval: inside the "
                                                     "record's interval (noisy metrics)")] = QualityRule.exact,
    by: Annotated[Optional[str], typer.Option(help="who verifies (default: git user.name, else the login)")] = None,
    speed_tolerance: Annotated[float, typer.Option(min=0, max=1, help="widen the re-run's speedup interval by "
                                                                      "this share where it is larger than the "
                                                                      "profile's precision target (recorded)")] = 0.0,
) -> None:
    """Re-run a record's exact configuration, compare quality (exactly) and speed (the record's speedup inside
    the re-run's interval, widened by the profile's precision target; the re-run's speed must be ok), and on
    success write <run-id>.verified.json beside it. Other versions of packages the task and method do not
    import, and another lock, are warnings. Exit 1 on a mismatch, 2 when it refuses to run."""
    import warnings

    from bench.progress import RichReporter
    from bench.reproduce import ReproduceRefused, checks_table, reproduce as do_reproduce, verification_path

    warnings.showwarning = lambda message, *a, **k: err.print(f"[yellow]warning:[/] {escape(str(message))}",
                                                              highlight=False)
    try:
        ok, checks, v, diffs, warns = do_reproduce(result, force=force, quality_rule=quality.value, by=by,
                                                   reporter=RichReporter(err), speed_tolerance=speed_tolerance)
    except ReproduceRefused as e:
        _fail(f"not reproduced: {e}")
    for d in diffs:
        err.print(f"[yellow]forced past a version difference:[/] {escape(d)}", highlight=False)
    for w in warns:
        err.print(f"[yellow]difference (recorded; not a refusal):[/] {escape(w)}", highlight=False)
    out.print(checks_table(checks, escape(f"Reproducing {result}")))
    if not ok:
        bad = [c.name for c in checks if not c.ok]
        _fail(f"NOT verified: the re-run does not match the record ({', '.join(bad)}); nothing was written",
              code=1)
    out.print(f"[green]verified[/] " + escape(f"by {v.verified_by} on {v.machine.cpu_model}: wrote "
                                              f"{verification_path(result)}"),
              highlight=False)


@app.command()
def check(
    results_dir: Annotated[Path, typer.Option(help="root of the results tree")] = Path("results"),
    base: Annotated[Optional[str], typer.Option(help="git ref the pull request is compared with (default: "
                                                     "$BENCH_CHECK_BASE, origin/$GITHUB_BASE_REF, origin/main, main)")] = None,
    all_methods: Annotated[bool, typer.Option("--all", help="smoke-run every method, not only new or changed "
                                                            "ones")] = False,
    smoke: Annotated[bool, typer.Option(help="smoke-run new or changed methods on the embedded tasks")] = True,
    strict: Annotated[bool, typer.Option(help="hold results already on the base branch to every rule too")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="smoke runs at a time")] = 1,
) -> None:
    """What CI runs on a pull request: validate every result (schema, invariants, registries, config hash, clean
    git state, profile), refuse template methods, smoke-run new or changed methods. Exit 1 on any error."""
    from bench.check import print_report, run_check

    try:
        report = run_check(results_dir, base, all_methods, smoke, strict, jobs)
    except ValueError as e:
        _fail(str(e))
    print_report(report, out)
    if not report.ok:
        raise typer.Exit(1)


from leaderboard.cli import leaderboard_app, recommend  # noqa: E402 - light: typer and rich only

app.add_typer(leaderboard_app, name="leaderboard")
app.command("recommend")(recommend)
from bench.cli_records import remeasure, report  # noqa: E402 - light: typer and rich only

app.command()(remeasure)
app.command()(report)
from bench.cli_new import new_app  # noqa: E402 - light: typer and rich only
from bench.cli_lock import lock_app  # noqa: E402 - light: typer and rich only

app.add_typer(new_app, name="new")
app.add_typer(lock_app, name="lock")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
