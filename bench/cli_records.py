"""`bench remeasure` and `bench report`: commands over existing records (re-time them; tables from them).

Registered on the main app by bench/cli.py. Module scope imports only typer and rich, like bench/cli.py.
"""

from __future__ import annotations

import sys
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


def remeasure(
    records: Annotated[list[Path], typer.Argument(help="result JSON files (or folders of them) to re-time")],
    processes: Annotated[int, typer.Option(min=1, help="time in this many fresh worker processes and pool "
                                                       "them")] = 1,
    precision: Annotated[Optional[float], typer.Option(min=0.001, max=0.5, help="the interval's target "
                                                       "half-width instead of the profile's (e.g. 0.02 for a "
                                                       "noise floor); recorded as speed.precision_target")] = None,
) -> None:
    """Re-time records' reference and method (trained parts from the cache; nothing is re-evaluated) and
    rewrite only their `speed` block, with the provenance of the re-measurement. Time on a quiet machine."""
    import os
    import warnings

    from bench.progress import RichReporter
    from bench.remeasure import RemeasureRefused, remeasure as do_remeasure
    from bench.store import iter_result_files

    warnings.showwarning = lambda message, *a, **k: err.print(f"[yellow]warning:[/] {message}", highlight=False)
    files = []
    for p in records:
        if not p.exists():
            _fail(f"{p} does not exist")
        files += iter_result_files(p)
    refused = unreliable = 0
    for f in files:
        try:
            shown = os.path.relpath(f) if Path(f).is_absolute() else str(f)  # no local folder in the record
            argv = ["bench", "remeasure", *(["--processes", str(processes)] if processes > 1 else []),
                    *(["--precision", str(precision)] if precision is not None else []), shown]
            new = do_remeasure(f, processes, RichReporter(err), argv=argv, precision=precision)
        except RemeasureRefused as e:
            refused += 1
            err.print(f"[red]refused[/] {f}:", highlight=False)
            err.print(str(e), highlight=False, markup=False)
            continue
        s = new.speed
        flag = "ok" if s.status == "ok" else "UNRELIABLE: " + "; ".join(s.reasons)
        out.print(f"{f}: {s.speedup:.3f}x [{s.interval.low:.3f}, {s.interval.high:.3f}] +-{s.precision:.1%}, "
                  f"{flag}", highlight=False, markup=False)
        unreliable += s.status != "ok"
    out.print(f"{len(files) - refused} re-timed ({unreliable} unreliable), {refused} refused", highlight=False)
    if refused or unreliable:
        raise typer.Exit(1)


def report(
    results: Annotated[Path, typer.Option(help="root of the results tree")] = Path("results"),
    markdown: Annotated[bool, typer.Option(help="print the Markdown results tables (the default when no README "
                                                "option is given)")] = False,
    write_readme: Annotated[Optional[Path], typer.Option(help="rewrite this README's block between "
                                                              "<!-- bench:results:begin --> and "
                                                              "<!-- bench:results:end -->")] = None,
    check_readme: Annotated[Optional[Path], typer.Option(help="exit 1 if this README's block differs from the "
                                                              "tables the records give")] = None,
) -> None:
    """Markdown results tables generated from the records, one per profile and task; keep the README's
    results block equal to them."""
    from bench.tables import MarkerError, load_records, markdown_tables, replace_between_markers

    if not results.is_dir():
        _fail(f"{results} is not a folder")
    invalid = load_records(results)[1]
    for b in invalid:
        err.print(f"[yellow]warning:[/] left out (invalid): {b}", highlight=False, markup=False)
    generated = markdown_tables(results)
    if markdown or (write_readme is None and check_readme is None):
        sys.stdout.write(generated)
    for path, checking in ((check_readme, True), (write_readme, False)):
        if path is None:
            continue
        if not path.is_file():
            _fail(f"{path} is not a file")
        text = path.read_text(encoding="utf-8")
        try:
            new = replace_between_markers(text, generated)
        except MarkerError as e:
            _fail(f"{path}: {e}", code=1 if checking else 2)
        if checking:
            if new != text:
                _fail(f"{path}'s results block differs from the tables the records under {results} give; run "
                      f"`bench report --write-readme {path}`", code=1)
            err.print(f"{path}'s results block matches the records", highlight=False)
        elif new != text:
            from bench.store import atomic_write_text

            atomic_write_text(path, new)
            err.print(f"wrote the results block of {path}", highlight=False)
        else:
            err.print(f"{path}'s results block is already up to date", highlight=False)
