"""Reading and writing result records: atomic writes, validation with messages that name the field."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from bench.result import Result, invariant_errors

DEFAULT_RESULTS = Path("results")
VERIFIED_SUFFIX = ".verified.json"  # `bench reproduce` writes <run-id>.verified.json beside a result


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk, then renamed over the target
    (rename is atomic within a file system). Any interruption, Ctrl-C included, removes the temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a result is as readable as any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_result(result: Result, root: Path = DEFAULT_RESULTS) -> Path:
    rel = result.relpath()
    if any(part in ("..", "") or part.startswith("/") for part in rel.parts):
        raise ValueError(f"refusing to write a result outside {root}: {rel}")
    path = root / rel
    atomic_write_text(path, result.to_json())
    return path


class InvalidResult(ValueError):
    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(problems))


def _format_validation(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        out.append(f"{loc}: {err['msg']}")
    return out


def load_result(path: Path, results_root: Path | None = None, check_invariants: bool = True) -> Result:
    """Parse and validate one result file; raise `InvalidResult` listing every problem found."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidResult(path, [f"cannot read: {e}"]) from None
    except json.JSONDecodeError as e:
        raise InvalidResult(path, [f"not JSON: {e}"]) from None
    if not isinstance(data, dict):
        raise InvalidResult(path, ["not a JSON object"])
    if data.get("schema") != "bench.result/1":
        raise InvalidResult(path, [f"schema: expected 'bench.result/1', found {data.get('schema')!r}"])
    try:
        result = Result.model_validate(data)
    except ValidationError as e:
        raise InvalidResult(path, _format_validation(e)) from None
    if check_invariants:
        problems = invariant_errors(result, Path(path), results_root)
        if problems:
            raise InvalidResult(path, problems)
    return result


def iter_result_files(root: Path) -> list[Path]:
    """Every result JSON under `root` (a file is taken as itself), in a stable order.

    Verification records (`<run-id>.verified.json`, written by `bench reproduce` beside the result they verify)
    are not results and are left out; so are hidden files (a write's temporary file)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.json")
                  if not p.name.startswith(".") and not p.name.endswith(VERIFIED_SUFFIX))


def validate_tree(root: Path) -> tuple[list[Result], list[InvalidResult]]:
    ok, bad = [], []
    results_root = root if root.is_dir() else None
    for p in iter_result_files(root):
        try:
            ok.append(load_result(p, results_root))
        except InvalidResult as e:
            bad.append(e)
    return ok, bad
