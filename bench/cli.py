"""The `bench` command line. Heavy modules (torch, the runner) are imported inside the commands that use
them, so `bench list` and `bench validate` start fast."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
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
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command("list")
def list_(what: Annotated[Listable, typer.Argument(help="tasks, methods or profiles")]) -> None:
    """List the registered tasks, methods (grouped by family) or hardware profiles."""
    from bench.registry import FAMILIES, METHODS, TASKS

    if what is Listable.tasks:
        t = Table(title="Tasks")
        for col in ("name", "tier", "modality", "metric", "version", "summary"):
            t.add_column(col)
        for s in TASKS:
            t.add_row(s.name, s.tier, s.modality, s.metric, s.version, s.summary)
    elif what is Listable.methods:
        t = Table(title="Methods")
        for col in ("family", "name", "paper", "year", "modalities", "summary"):
            t.add_column(col)
        specs = sorted(METHODS, key=lambda s: (FAMILIES.index(s.family), s.name))
        for s in specs:
            t.add_row(s.family, s.name, s.paper, str(s.year or ""), ", ".join(s.modalities), s.summary)
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


@app.command()
def run(
    method: Annotated[str, typer.Option("--method", "-m", help="registered method name (`bench list methods`)")],
    task: Annotated[str, typer.Option("--task", "-t", help="registered task name (`bench list tasks`)")],
    profile: Annotated[str, typer.Option(help="hardware profile (`bench list profiles`)")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of the method's training and data order")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="hyper-parameter override key=value; repeat")] = None,
    strict: Annotated[bool, typer.Option(help="fail when the machine does not match the profile")] = False,
    results_dir: Annotated[Path, typer.Option(help="root of the results tree")] = Path("results"),
    budget: Annotated[str, typer.Option(help="'full', or 'smoke' for a tiny-budget check run")] = "full",
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
    from bench.runner import RunFailed, run as do_run

    def show_warning(message, category, filename, lineno, file=None, line=None):
        err.print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = show_warning
    try:
        outcome = do_run(task, method, profile, seed, overrides, strict, results_dir, RichReporter(err),
                         budget=budget, argv=sys.argv)
    except (RegistryError, ConfigError, ProfileMismatch) as e:
        _fail(str(e))
    except RunFailed as e:
        err.print(e.result.error.traceback, highlight=False, markup=False)
        _fail(f"the run failed: {e}", code=1)
    from bench.report import summary_table

    out.print(summary_table(outcome.result, outcome.path))


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

    n_ok = n_bad = 0
    for p in paths:
        if not p.exists():
            _fail(f"{p} does not exist")
        ok, bad = validate_tree(p)
        n_ok += len(ok)
        n_bad += len(bad)
        for b in bad:
            out.print(f"[red]INVALID[/] {b.path}", highlight=False)
            for problem in b.problems:
                out.print(f"    {problem}", highlight=False, markup=False)
    out.print(f"{n_ok} valid, {n_bad} invalid")
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
        out.print(f"{SCHEMA_FILE} is up to date")
    elif write:
        from bench.store import atomic_write_text

        atomic_write_text(SCHEMA_FILE, text)
        out.print(f"wrote {SCHEMA_FILE}")
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
                 else "differs from the task's published reference (results made on it will say so)"))


from leaderboard.cli import leaderboard_app, recommend  # noqa: E402 - light: typer and rich only

app.add_typer(leaderboard_app, name="leaderboard")
app.command("recommend")(recommend)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
