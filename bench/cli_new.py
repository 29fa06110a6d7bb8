"""`bench new method` and `bench new task`: a working module and its test from the project's templates
(`bench.scaffold`). Registered on the main app by bench/cli.py. Module scope imports only typer and rich."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


new_app = typer.Typer(no_args_is_help=True, help="Generate a new method or task from the project's templates.")


@new_app.command("method")
def new_method(
    name: Annotated[str, typer.Argument(help="the method's name: lower case, digits and dashes, e.g. my-pruning")],
    family: Annotated[str, typer.Option(help="distillation, caching, pruning, decoding or quantization")],
    modality: Annotated[Optional[list[str]], typer.Option(help="a modality it supports; repeat "
                                                                "(default image-classification)")] = None,
    root: Annotated[Optional[Path], typer.Option(help="the project root (default: found from here)")] = None,
) -> None:
    """Generate a working (identity) method and its test; `bench check` refuses it until edited."""
    from bench.scaffold import ScaffoldError, new_method as generate

    try:
        g = generate(name, family, tuple(modality or ("image-classification",)), root)
    except ScaffoldError as e:
        _fail(str(e))
    _wrote(g, f"{name!r} is registered and runs, but it is the identity: edit {g.files[0].name} (apply, paper, "
              f"summary, hyper-parameters)", [f"bench run --method {name} --task digits"], "CONTRIBUTING.md")


@new_app.command("task")
def new_task(
    name: Annotated[str, typer.Argument(help="the task's name: lower case, digits and dashes, e.g. my-task")],
    modality: Annotated[str, typer.Option(help="the task's modality (a template exists for "
                                               "image-classification)")] = "image-classification",
    classes: Annotated[int, typer.Option(help="classes of the generated synthetic data")] = 4,
    root: Annotated[Optional[Path], typer.Option(help="the project root (default: found from here)")] = None,
) -> None:
    """Generate a working embedded task on synthetic data and its test; `bench check` refuses it until edited."""
    from bench.scaffold import ScaffoldError, new_task as generate

    try:
        g = generate(name, modality, root, classes)
    except ScaffoldError as e:
        _fail(str(e))
    _wrote(g, f"{name!r} is registered and runs on synthetic data: edit {g.files[0].name} (its data, models, "
              f"recipes and summary)", [f"bench list methods --task {name}",
                                        f"bench run --method none --task {name}      # its noise floor"],
           "CONTRIBUTING.md, 'Adding a task',")


def _wrote(g, what: str, steps: list[str], guide: str) -> None:
    """The files a generator wrote, and what to do next: edit, drop the template marker, test, run, check."""
    for f in g.files:
        out.print(f"wrote {f}", highlight=False)
    todo = "".join(f"  {s}\n" for s in [f"python -m pytest {g.files[1]}", *steps, "bench check"])
    out.print(f"\n{what}, delete its BENCH_TEMPLATE line, then\n{todo}{guide} walks through the rest.",
              highlight=False)
