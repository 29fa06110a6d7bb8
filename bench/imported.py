"""The distributions a task's and a method's code actually imports: what a record names as the packages its
numbers depend on, and what `bench reproduce` refuses to differ.

Task and method modules keep heavy imports inside functions (`bench.registry`), so importing a module shows
almost nothing, and bench's own process has everything imported. So:
1. the source of the task's and the method's modules is read (never run) for every import statement, at module
   scope or inside functions (not under `if TYPE_CHECKING:`), following the project's own modules (`tasks`,
   `baselines`, `bench`, less bench's own record keeping) to the modules they import in turn;
2. a fresh interpreter imports the task's module, the method's module and every other module found, and
   reports the modules that appeared (less what the bare interpreter had already: `bench.registry` alone
   brings in only the standard library);
3. those modules are mapped to their distributions (`importlib.metadata.packages_distributions`), bench
   itself left out; the caller keeps those it tracks (the lock's pins).

What code loads by a computed name (`importlib.import_module(x)`) is not seen. The answer is cached per
source text and installed versions (`BENCH_CACHE/imports/`): the child takes a few seconds (torch, lm-eval).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Collection, Sequence

INTERNAL = ("bench", "tasks", "baselines")  # the project's own packages: followed, never reported
# bench's record keeping, reached through the record model: it runs for every record and changes no number
NOT_FOLLOWED = frozenset({"bench.provenance", "bench.lock", "bench.imported"})
REPO_ROOT = Path(__file__).resolve().parent.parent
_MARK = "BENCH-IMPORTED:"
_CHILD = r"""
import importlib, json, sys
before = set(sys.modules)
failed = []
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except BaseException as e:  # an optional import, or a module that runs only in its package's context
        failed.append(name)
from importlib import metadata
tops = {m.partition(".")[0] for m in set(sys.modules) - before}
dists = metadata.packages_distributions()
print("%s" + json.dumps({"failed": failed, "dists": sorted({d for t in tops for d in dists.get(t, ())})}))
""" % _MARK
_memo: dict[str, dict[str, str] | None] = {}


def _is_type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING"
                                         or isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports_of(tree: ast.AST, package: str) -> list[str]:
    """The dotted names each import statement of `tree` names (`from a import b` gives a and a.b)."""
    out: list[str] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        todo.extend(ast.iter_child_nodes(node))
    return [n for n in out if n]


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None


def scan(modules: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({project module: sha256 of its source}, sorted names of the other modules they import), from the source
    of `modules` and of the project's modules they import, transitively. Nothing is imported but packages."""
    sources: dict[str, str] = {}
    external: set[str] = set()
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = _spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        text = Path(spec.origin).read_bytes()
        sources[name] = hashlib.sha256(text).hexdigest()
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        package = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
        for target in _imports_of(tree, package):
            top = target.partition(".")[0]
            if top in INTERNAL:
                if not any(target == n or target.startswith(n + ".") for n in NOT_FOLLOWED):
                    todo.append(target)
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(target)
    return sources, sorted(external)


def _environment_key() -> str:
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    return hashlib.sha256("\n".join([sys.executable, *dists]).encode()).hexdigest()


def _run_child(names: list[str], timeout: float) -> dict | None:
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(names)], capture_output=True, text=True,
                             timeout=timeout, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [x for x in out.stdout.splitlines() if x.startswith(_MARK)]
    return json.loads(lines[-1][len(_MARK):]) if out.returncode == 0 and lines else None


def imported_distributions(modules: Sequence[str], timeout: float = 300.0) -> list[str] | None:
    """Sorted canonical names of the distributions `modules` (the task's and the method's) import, bench left
    out; None when that cannot be told (one of `modules` does not import in a fresh interpreter, as a task
    defined inside a test file does not, or the child failed)."""
    from packaging.utils import canonicalize_name

    from bench import cache

    try:
        sources, external = scan(modules)
    except (OSError, ValueError):  # an unreadable source file
        return None
    if any(m not in sources for m in modules):
        return None
    key = cache.key("imports/1", list(modules), sources, external, _environment_key())
    if key in _memo:
        return _memo[key]
    path = None
    try:
        path = cache.cache_dir() / "imports" / f"{key}.json"
        hit = cache.load_json(path)
    except OSError:
        hit = None
    if isinstance(hit, list):
        _memo[key] = hit
        return hit
    got = _run_child(list(modules) + external, timeout)
    if got is None or any(m in got["failed"] for m in modules):
        answer = None
    else:
        answer = sorted({canonicalize_name(d) for d in got["dists"]} - {"bench"})
    _memo[key] = answer
    if answer is not None and path is not None:
        try:
            from bench.store import atomic_write_text

            atomic_write_text(path, cache._wrap(answer))
        except OSError:
            pass
    return answer


def code_modules(task_spec, method_spec) -> list[str]:
    """The modules that define a task and a method (their registered classes')."""
    return [task_spec.cls.__module__, method_spec.cls.__module__]


def imported_versions(task_spec, method_spec, among: Collection[str] | None = None) -> dict[str, str] | None:
    """{distribution: installed version} of what the task's and the method's code imports, restricted to
    `among` (canonical names: the lock's pins) when given; None when it cannot be told."""
    names = imported_distributions(code_modules(task_spec, method_spec))
    if names is None:
        return None
    out = {}
    for n in names:
        if among is None or n in among:
            try:
                out[n] = metadata.version(n)
            except metadata.PackageNotFoundError:
                continue
    return out
