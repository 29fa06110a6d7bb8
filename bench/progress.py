"""Progress display for the long steps of a run (training, calibration, evaluation, timing).

Tasks and methods report through `Reporter.step`, never through rich directly, so tests and sweeps can run
silently and the terminal display can change in one place. Steps may nest (a cached build inside a step):
`RichReporter` keeps one live display and adds a line per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Reporter:
    """Silent reporter: the interface, and what tests use."""

    def log(self, message: str) -> None:
        return None

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None


class RichReporter(Reporter):
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._progress = None
        self._depth = 0

    def log(self, message: str) -> None:
        self.console.print(message)

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        if self._progress is None:
            self._progress = Progress(SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"),
                                      BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=self.console)
            self._progress.start()
        progress = self._progress
        self._depth += 1
        tid = progress.add_task(("  " * (self._depth - 1)) + description, total=total)
        try:
            yield lambda n=1: progress.advance(tid, n)
            done = max(progress.tasks[tid].completed, 1)
            progress.update(tid, total=done, completed=done)  # a step may end before its planned total
        finally:
            progress.stop_task(tid)
            self._depth -= 1
            if self._depth == 0:
                progress.stop()
                self._progress = None
