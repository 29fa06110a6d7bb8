"""How a record's versions differ from this checkout and install: what refuses a reproduction or a re-timing
(bench, task or method version; a package the task's or the method's code imports) and what is only a warning
(other packages, the lock). Used by `bench reproduce` (`bench.reproduce`, step 2 of its docstring) and `bench
remeasure`."""

from __future__ import annotations

from bench.result import Result


def version_differences(record: Result) -> list[str]:
    """Every difference of bench, task, method and tracked package versions (`bench remeasure` refuses the
    first three). Raises `RegistryError` for a task or method this checkout does not have."""
    from bench.provenance import package_versions

    diffs = _code_differences(record)
    here = package_versions()
    for name in sorted(set(record.provenance.packages) | set(here)):
        a, b = record.provenance.packages.get(name), here.get(name)
        if a != b:
            diffs.append(f"package {name}: record {a or '(absent)'}, here {b or '(absent)'}")
    return diffs


def _code_differences(record: Result) -> list[str]:
    from bench import __version__
    from bench.registry import get_method_spec, get_task_spec

    diffs = []
    if record.provenance.bench_version != __version__:
        diffs.append(f"bench version: record {record.provenance.bench_version}, here {__version__}")
    t, m = get_task_spec(record.task.name), get_method_spec(record.method.name)
    if record.task.version != t.version:
        diffs.append(f"task {t.name} version: record {record.task.version}, here {t.version}")
    if record.method.version != m.version:
        diffs.append(f"method {m.name} version: record {record.method.version}, here {m.version}")
    if record.method.family != m.family:
        diffs.append(f"method {m.name} family: record {record.method.family}, here {m.family}")
    return diffs


def classify_differences(record: Result) -> tuple[list[str], list[str]]:
    """(refusing, warnings): the differences between the record's versions and this checkout and install that
    refuse a reproduction without --force (bench, task, method; a package the task or the method imports), and
    those that are only warnings (other packages; the lock). Raises `RegistryError` for unknown names."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    from bench.imported import imported_versions
    from bench.lock import lock_state, same_version
    from bench.provenance import TRACKED_PACKAGES, locked_names
    from bench.registry import RegistryError, get_method_spec, get_task_spec

    refusing, warns = _code_differences(record), []
    p = record.provenance
    try:
        from bench.profiles import load_profile

        lock_name = load_profile(record.profile.name).lock
    except RegistryError:
        lock_name = p.lock.name if p.lock else None
    here_imported = imported_versions(get_task_spec(record.task.name), get_method_spec(record.method.name),
                                      among=locked_names(lock_name))
    strict = here_imported is None
    if strict:
        warns.append("what the task and method import cannot be told here, so every package difference refuses")
    imported = set(here_imported or {}) | {canonicalize_name(n) for n in p.imported_packages or {}}
    recorded: dict[str, list[str]] = {}  # a name may be in both `packages` and `imported_packages`
    for n, v in [*p.packages.items(), *(p.imported_packages or {}).items()]:
        if v not in recorded.setdefault(canonicalize_name(n), []):
            recorded[canonicalize_name(n)].append(v)

    def here(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    for name in sorted(set(recorded) | {n for n in TRACKED_PACKAGES if here(n)}):
        b = here(name)
        for a in recorded.get(name) or [None]:
            if a is not None and b is not None and same_version(a, b):
                continue
            if a is None and name in imported:
                continue  # listed below, once
            text = f"package {name}: record {a or '(absent)'}, here {b or '(absent)'}"
            if a is not None and (strict or name in imported):
                refusing.append(text + (" (imported by the task or the method)" if name in imported else ""))
            else:
                warns.append(text + " (not imported by the task or the method)")
    unknown = sorted(n for n in imported if n not in recorded)
    if unknown:
        warns.append("imported by the task or the method, but the record does not give their versions (made "
                     "before records listed them): " + ", ".join(unknown))
    state = lock_state(lock_name) if lock_name else None
    if p.lock is None:
        warns.append("the record names no lock (made before bench pinned its environment)")
    else:
        if state is None or state.name != p.lock.name:
            warns.append(f"lock: the record's is {p.lock.name}, here {state.name if state else 'none can be read'}")
        elif state.sha256 != p.lock.sha256:
            warns.append(f"lock {p.lock.name}: record sha256 {p.lock.sha256[:12]}, here {state.sha256[:12]} (its "
                         f"pins changed since the run)")
        if not p.lock.matched:
            warns.append(f"the record's install did not match its lock {p.lock.name}: "
                         + _few(p.lock.differences))
    if state is not None and not state.matched:
        warns.append(f"this install does not match lock {state.name} (`bench lock check`): "
                     + _few(state.differences))
    return refusing, warns


def _few(items, n: int = 5) -> str:
    items = list(items)
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")
