"""Reading and writing result records: atomic writes, validation with messages that name the field."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench.result import MAX_DEPTH, MAX_RECORD_BYTES, Result, invariant_errors

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
    """A file under a results tree that is not a valid record, with every reason found (each names the field
    or the property of the file that is wrong). Every reader of results catches this one exception."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(problems))


# --- reading one file: total, bounded, no surprises -----------------------------------------------------------
# A results tree is input anyone can send in a pull request, so reading it must end, quickly, in either a record
# or an InvalidResult: never a hang (a named pipe), a crash (a document nested 200,000 deep), an unbounded read
# (a 50 MB "record" the site then publishes), or a value JSON cannot carry (NaN, Infinity: Python's json takes
# them, browsers' JSON.parse does not).



def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe (fifo)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def _within(path: Path, tree: Path) -> bool:
    try:
        path.relative_to(tree.resolve())
        return True
    except ValueError:
        return False


def _read_bytes(path: Path, tree: Path | None, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes (a symbolic link is followed only to
    a regular file inside `tree`, and not at all without a tree); else InvalidResult saying what it is instead.

    The file is opened non-blocking (opening a fifo for reading would wait for a writer forever) and checked
    again through the open descriptor, so a file swapped after the first look is caught too."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise InvalidResult(path, [f"cannot read: {e.strerror or e}"]) from None
    is_link = stat.S_ISLNK(st.st_mode)
    if is_link and tree is None:
        raise InvalidResult(path, ["a symbolic link, read without the results tree it belongs to: a link is "
                                   "followed only within its tree (read the tree, or the file it points to)"])
    if is_link:
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise InvalidResult(path, ["a broken symbolic link (or a loop of them): a result is a regular file"]) \
                from None
        if tree is not None and not _within(target, Path(tree)):
            raise InvalidResult(path, [f"a symbolic link to a file outside the results tree {tree}: a record must "
                                       f"lie in the tree it is read from (copy the file in instead)"])
        try:
            st = os.stat(target)
        except OSError as e:
            raise InvalidResult(path, [f"cannot read: {e.strerror or e}"]) from None
    if stat.S_ISDIR(st.st_mode):
        try:
            with os.scandir(path):
                pass
        except OSError as e:
            raise InvalidResult(path, [f"a folder that cannot be read ({e.strerror}): the records in it, if any, "
                                       f"were not checked"]) from None
        raise InvalidResult(path, ["a folder, not a file: a result is a regular file named <run-id>.json"])
    if not stat.S_ISREG(st.st_mode):
        raise InvalidResult(path, [f"{_kind(st.st_mode)}, not a regular file: not read (a result is a regular "
                                   f"file named <run-id>.json)"])
    too_big = [f"{st.st_size:,} bytes, over the {limit:,}-byte limit of a record (real records are a few KB): "
               f"not read"]
    if st.st_size > limit:
        raise InvalidResult(path, too_big)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    if not is_link:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InvalidResult(path, [f"cannot read: {e.strerror or e}"]) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the look and the open
            raise InvalidResult(path, [f"{_kind(mode)}, not a regular file: not read"])
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidResult(path, too_big)
    return data


class _Refused(ValueError):
    """A JSON document the reader refuses while parsing (a duplicate key)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for dup, _ in pairs:
            if dup in seen:
                break
            seen.add(dup)
        raise _Refused(f"the key {_short(dup)} appears twice in one object: JSON readers disagree on which "
                       f"one counts, so a record has each key once")
    return out


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + f"... ({len(text):,} characters)"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _where(parts: list) -> str:
    """A dotted path to a value, e.g. speed.interval.high or controls[0].value (long ones cut in the middle)."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{_short(p, 40)[1:-1]}" for p in parts[:8]).lstrip(".")
    return (text + (f"...({len(parts)} levels)" if len(parts) > 8 else "")) or "(the document)"


def _content_problems(doc: Any, max_depth: int) -> list[str]:
    """Non-finite numbers, text that is not Unicode (lone surrogates, which JSON's \\u escapes allow but no
    UTF-8 file can hold) and nesting beyond `max_depth`, each with where it is; iterative, so depth costs no
    stack."""
    problems: list[str] = []
    stack: list[tuple[Any, list, int]] = [(doc, [], 0)]
    while stack and len(problems) < 20:
        value, at, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= max_depth:
                problems.append(f"{_where(at)}: nested more than {max_depth} levels deep (a record nests 5 or 6)")
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in reversed(list(items)):
                if isinstance(k, str) and _SURROGATE.search(k):
                    problems.append(f"{_where(at)}: a key holds a lone surrogate (\\ud800-\\udfff), which is not "
                                    f"text")
                stack.append((v, at + [k], depth + 1))
        elif isinstance(value, float) and not math.isfinite(value):
            token = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            problems.append(f"{_where(at)}: {token} is not a finite number (JSON has no NaN or Infinity; a record "
                            f"holds finite numbers only)")
        elif isinstance(value, str) and _SURROGATE.search(value):
            problems.append(f"{_where(at)}: a lone surrogate (\\ud800-\\udfff) in a string, which is not text")
    return problems


def read_json(path: Path, tree: Path | None = None, limit: int = MAX_RECORD_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """One JSON document from a file of a results tree (a record, a verification record), or InvalidResult
    naming why not: not a regular file (or a link out of `tree`), over `limit` bytes, not UTF-8, not JSON, a
    duplicate key, nested deeper than `max_depth`, a non-finite number, a lone surrogate."""
    raw = _read_bytes(path, tree, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidResult(path, [f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (a record is "
                                   f"UTF-8 JSON)"]) from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise InvalidResult(path, [f"nested more than {max_depth} levels deep (a record nests 5 or 6): not "
                                   f"parsed"]) from None
    except json.JSONDecodeError as e:
        raise InvalidResult(path, [f"not JSON: {e}"]) from None
    except ValueError as e:  # _Refused, or an integer beyond Python's digit limit
        raise InvalidResult(path, [f"not a valid JSON document: {str(e).split('; use')[0]}"]) from None
    problems = _content_problems(doc, max_depth)
    if problems:
        raise InvalidResult(path, problems)
    return doc


def _format_validation(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        out.append(f"{loc}: {err['msg']}")
    return out


def load_result(path: Path, results_root: Path | None = None, check_invariants: bool = True) -> Result:
    """Parse and validate one result file; raise `InvalidResult` listing every problem found.

    `results_root`, when given, is the tree the file belongs to: its location is checked against its fields,
    and a symbolic link is followed only to a file inside it (without it, a link is not followed)."""
    data = read_json(Path(path), results_root)
    if not isinstance(data, dict):
        raise InvalidResult(path, [f"not a JSON object but {type(data).__name__ if data is not None else 'null'}"
                                   f": a record is an object with \"schema\": \"bench.result/1\""])
    if data.get("schema") != "bench.result/1":
        raise InvalidResult(path, [f"schema: expected 'bench.result/1', found {_short(data.get('schema'))}"])
    try:
        result = Result.model_validate(data)
    except ValidationError as e:
        raise InvalidResult(path, _format_validation(e)) from None
    if check_invariants:
        problems = invariant_errors(result, Path(path), results_root)
        if problems:
            raise InvalidResult(path, problems)
    return result


def _is_candidate(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".") and not name.endswith(VERIFIED_SUFFIX)


def iter_result_files(root: Path) -> list[Path]:
    """Every entry named `*.json` under `root` (anything but a folder is taken as itself), in a stable order.

    Every such entry is listed whatever it is (a folder, a fifo, a link), so that the reader rejects it by name
    instead of it being skipped unseen. Verification records (`<run-id>.verified.json`, written by `bench
    reproduce` beside the result they verify) are not results and are left out; so are hidden files (a write's
    temporary file). Links to folders are not followed (a tree cannot loop, nor reach outside itself), and the
    walk is iterative, so a deep tree costs no stack."""
    root = Path(root)
    if not root.is_dir():
        return [root]
    found: set[Path] = set()
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            if folder != root:
                found.add(folder)  # the reader says it cannot be read
            continue
        for e in entries:
            if _is_candidate(e.name):
                found.add(Path(e.path))
            try:
                if e.is_dir(follow_symlinks=False):
                    folders.append(Path(e.path))
            except OSError:
                pass
    return sorted(found)


def validate_tree(root: Path) -> tuple[list[Result], list[InvalidResult]]:
    ok, bad = [], []
    results_root = root if root.is_dir() else None
    for p in iter_result_files(root):
        try:
            ok.append(load_result(p, results_root))
        except InvalidResult as e:
            bad.append(e)
    return ok, bad
