"""`bench lock refresh` and `bench lock check`: the pinned environment (`bench.lock`, locks/<name>.txt).

Registered on the main app by bench/cli.py. Module scope imports only typer and rich, like bench/cli.py.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

lock_app = typer.Typer(no_args_is_help=True, help="The pinned environment: locks/<name>.txt, pip constraints of "
                                                  "exact versions that the README's install uses.")
LockName = Annotated[Optional[str], typer.Argument(help="the lock's name (default: the one the cpu profile "
                                                        "names; every profile names its lock)")]


def _say(console: Console, text: str) -> None:
    """Plain text, one line per line: names and paths are never read as markup, and nothing is re-wrapped."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    _say(err, f"error: {message}")
    raise typer.Exit(code)


def _name(name: str | None) -> str:
    if name:
        return name
    from bench.profiles import load_profile

    return load_profile("cpu").lock


@lock_app.command("refresh")
def refresh(name: LockName = None) -> None:
    """Rewrite the lock from this install: the exact versions of the closure of pyproject.toml's requirements
    with the dev and ray extras (install them first). Written atomically."""
    from bench.lock import LockError, refresh as do_refresh

    try:
        lock, path = do_refresh(_name(name))
    except (LockError, OSError) as e:
        _fail(str(e))
    _say(out, f"wrote {path}: {len(lock.pins)} pins, pins sha256 {lock.sha256}")


@lock_app.command("check")
def check(name: LockName = None) -> None:
    """Compare this install with the lock: exit 1 listing each package installed at another version, missing
    (a pin of an extra only where that extra is installed), or required but not in the lock."""
    from bench.lock import LockError, check as do_check, load_lock

    try:
        lock = load_lock(_name(name))
        diffs = do_check(lock)
    except (LockError, OSError) as e:
        _fail(str(e))
    if diffs:
        _say(err, f"this install differs from lock {lock.name} in {len(diffs)} package(s):")
        for d in diffs:
            _say(err, f"  {d}")
        _say(err, f"install from it (pip install -c locks/{lock.name}.txt -e \".[dev]\"), or, where the change is "
                  f"meant, `bench lock refresh {lock.name}`")
        raise typer.Exit(1)
    _say(out, f"the install matches lock {lock.name}: {len(lock.pins)} pins, pins sha256 {lock.sha256}")
