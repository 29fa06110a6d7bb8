"""Pinned environments: `locks/<name>.txt`, the exact versions of everything bench needs, as pip constraints.

A lock is generated from the resolved install (`bench lock refresh`): the closure of pyproject.toml's
requirements with the `dev` and `ray` extras, walked through each installed distribution's own requirements
with their environment markers (and the extras each requirement asks for) evaluated here. Bench itself and
installed packages that nothing requires are left out. The README's install is `pip install -c <lock> -e ...`,
so two fresh installs resolve the same versions; `bench lock check` says where an install differs (CI runs it
after installing). A record stores the lock's name and the sha256 of its pins, and whether the install matched
it when the run started (`bench.provenance`).

One lock per platform, not per profile family: the pins depend on the platform (environment markers: the CUDA
libraries torch requires on Linux x86-64) and not on the hardware profile. The torch wheel of this platform is
a CUDA build that runs the `cpu` profile as well as the GPU ones, so a lock per profile family would either
repeat the same pins or measure the cpu records with another torch build than the GPU records of the same
tasks, and would be one more file to refresh and to check in CI. Each hardware profile names its lock
(`lock = "..."` in bench/profiles/*.toml) because a profile is where a run says on what it was measured: a
profile for another platform (an Arm laptop, say) names a lock generated there.

The file: comment lines (how it was made, how to refresh it, the platform, and `# pins sha256: <hex>`), then
one `name==version` line per distribution, sorted by name; a pin needed only by an extra says so in a comment
(`ray==2.60.0  # extra: ray`), so `check` does not call it missing where that extra was not installed.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO_ROOT / "locks"
EXTRAS = ("dev", "ray")  # the extras a lock covers: everything CI installs
DEFAULT_LOCK = "linux-x86_64-cp311"  # the lock every profile of this repository names
PROJECT = "bench"  # never pinned: it is the checkout itself
PLATFORM = "(platform)"  # the name of the Difference that says the lock was made on another platform
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*(?:#\s*extra:\s*([a-z0-9_,\s-]+))?$")


class LockError(ValueError):
    """A lock that cannot be made, found or read; the message says what to do."""


@dataclass(frozen=True)
class Installed:
    """One installed distribution as the walk sees it: its version and its `Requires-Dist` lines."""

    version: str
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503): lower case, dashes
    version: str
    extras: tuple[str, ...] = ()  # (): the core requirements need it; else only these extras do

    def line(self) -> str:
        return f"{self.name}=={self.version}" + (f"  # extra: {','.join(self.extras)}" if self.extras else "")


@dataclass(frozen=True)
class Lock:
    name: str
    pins: tuple[Pin, ...]  # sorted by name
    platform: str = ""  # the platform tag it was made on (`platform_tag()`)

    @property
    def sha256(self) -> str:
        """sha256 of the pins alone (`name==version\\n` each, sorted): comments do not change it."""
        return hashlib.sha256("".join(f"{p.name}=={p.version}\n" for p in self.pins).encode()).hexdigest()

    def versions(self) -> dict[str, str]:
        return {p.name: p.version for p in self.pins}

    def text(self) -> str:
        path = f"locks/{self.name}.txt"
        head = [
            f"bench lock {self.name!r}: exact versions of bench's dependencies for {self.platform or 'any platform'}.",
            "Made by `bench lock refresh` from the resolved install: the closure of pyproject.toml's requirements",
            f"with the extras {', '.join(EXTRAS)} (bench itself and packages nothing requires are left out).",
            "Do not edit by hand. Install with:",
            f"  pip install -c {path} -e \".[dev]\"",
            "Refresh after changing pyproject.toml or upgrading a package, then check the install:",
            f"  bench lock refresh {self.name} && bench lock check {self.name}",
            "A pin marked `extra: X` is needed only when the extra X is installed.",
            f"platform: {self.platform}",
            f"pins sha256: {self.sha256}",
        ]
        return "".join(f"# {h}\n" for h in head) + "".join(p.line() + "\n" for p in self.pins)


@dataclass(frozen=True)
class Difference:
    """One way an install differs from its lock."""

    name: str
    locked: str | None  # None: not in the lock
    installed: str | None  # None: not installed
    required_by: str = ""  # for a package the lock lacks: what requires it

    def __str__(self) -> str:
        if self.name == PLATFORM:
            return f"platform: the lock was made on {self.locked}, this is {self.installed}"
        if self.locked is None:
            return (f"{self.name}: installed {self.installed}, required by {self.required_by or 'the project'} "
                    f"but not in the lock (refresh it)")
        if self.installed is None:
            return f"{self.name}: locked {self.locked}, not installed"
        return f"{self.name}: locked {self.locked}, installed {self.installed}"


@dataclass(frozen=True)
class LockState:
    """What a record stores: which lock, its pins' sha256, and whether the install matched it."""

    name: str
    sha256: str
    matched: bool
    differences: tuple[str, ...] = ()


def platform_tag() -> str:
    """This interpreter's platform, as locks are named: `linux-x86_64-cp311`."""
    return f"{platform.system().lower()}-{platform.machine().lower()}-cp{sys.version_info[0]}{sys.version_info[1]}"


def same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def installed_environment() -> dict[str, Installed]:
    """Every distribution importable here, by canonical name (the first on sys.path, as imports find it)."""
    env: dict[str, Installed] = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name:
            env.setdefault(canonicalize_name(name), Installed(d.version, tuple(d.requires or ())))
    return env


def project_requirements(root: Path = REPO_ROOT) -> tuple[list[str], dict[str, list[str]]]:
    """(core requirements, {extra: its requirements}) from `root`/pyproject.toml, else from the installed bench's
    metadata (an install without its checkout)."""
    py = root / "pyproject.toml"
    if py.is_file():
        project = tomllib.loads(py.read_text(encoding="utf-8"))["project"]
        extras = project.get("optional-dependencies", {})
        return list(project.get("dependencies", [])), {e: list(extras.get(e, [])) for e in EXTRAS}
    try:
        lines = metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        raise LockError(f"neither {py} nor an installed {PROJECT} to read the requirements from") from None
    core = [r for r in lines if "extra" not in str(Requirement(r).marker or "")]
    by_extra = {e: [r for r in lines if r not in core and _applies(Requirement(r), frozenset({e}))] for e in EXTRAS}
    return core, by_extra


def _applies(req: Requirement, extras: frozenset[str]) -> bool:
    """Whether `req` holds here for a distribution installed with `extras` (markers evaluated on this machine)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (sorted(extras) or [""]))


def closure(requirements: Iterable[str], env: Mapping[str, Installed],
            missing: list[str] | None = None) -> dict[str, str]:
    """{canonical name: the requirer's name} of every distribution `requirements` need here, transitively,
    honouring markers and requested extras; bench itself excluded. A needed distribution absent from `env`, or
    installed at a version its requirer excludes, is appended to `missing` (described), or raises `LockError`."""
    out: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, str, frozenset[str]]] = [(r, "the project", frozenset()) for r in requirements]
    problems: list[str] = []
    while todo:
        line, parent, parent_extras = todo.pop()
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            problems.append(f"{parent} has a requirement pip cannot read ({line!r}: {e})")
            continue
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        if name == PROJECT:
            continue
        have = env.get(name)
        if have is None:
            problems.append(f"{name} (required by {parent}: {line}) is not installed")
            continue
        if req.specifier and not req.specifier.contains(have.version, prereleases=True):
            problems.append(f"{name} {have.version} is installed, but {parent} requires {req}")
        out.setdefault(name, parent)
        key = (name, frozenset(req.extras))
        if key not in seen:
            seen.add(key)
            todo.extend((r, name, frozenset(req.extras)) for r in have.requires)
    if problems and missing is None:
        raise LockError("the install does not satisfy the project's requirements, so no lock can be made from "
                        "it:\n  " + "\n  ".join(sorted(set(problems)))
                        + f"\n(install it first: pip install -e \".[{','.join(EXTRAS)}]\")")
    if missing is not None:
        missing.extend(sorted(set(problems)))
    return out


def generate(name: str, env: Mapping[str, Installed] | None = None, root: Path = REPO_ROOT,
             requirements: tuple[list[str], dict[str, list[str]]] | None = None, tag: str | None = None) -> Lock:
    """The lock of the install `env` (default: this interpreter's): deterministic for the same install."""
    _check_name(name)
    env = installed_environment() if env is None else env
    core, extras = requirements if requirements is not None else project_requirements(root)
    base = closure(core, env)
    per_extra = {e: closure(core + extras.get(e, []), env) for e in EXTRAS}
    names = set(base).union(*per_extra.values())
    pins = tuple(Pin(n, env[n].version, () if n in base else tuple(e for e in EXTRAS if n in per_extra[e]))
                 for n in sorted(names))
    return Lock(name, pins, tag or platform_tag())


def parse(text: str, name: str) -> Lock:
    """Read a lock file's text; refuses a line that is not a pin and pins that do not match their header hash."""
    pins, tag, stated = [], "", None
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            if body.startswith("platform:"):
                tag = body.split(":", 1)[1].strip()
            elif body.startswith("pins sha256:"):
                stated = body.split(":", 1)[1].strip()
            continue
        if not line:
            continue
        m = _PIN.match(line)
        if m is None:
            raise LockError(f"lock {name!r}, line {i}: {line!r} is not a `name==version` pin")
        extras = tuple(x.strip() for x in (m.group(3) or "").split(",") if x.strip())
        pins.append(Pin(canonicalize_name(m.group(1)), m.group(2), extras))
    lock = Lock(name, tuple(sorted(pins, key=lambda p: p.name)), tag)
    if stated is not None and stated != lock.sha256:
        raise LockError(f"lock {name!r} was edited by hand: its pins hash to {lock.sha256[:12]}, its header says "
                        f"{stated[:12]}; run `bench lock refresh {name}` from an install instead")
    return lock


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise LockError(f"{name!r} is not a lock name (lower case letters, digits, '.', '_' and '-'; e.g. "
                        f"{DEFAULT_LOCK!r})")


def lock_names(lock_dir: Path | None = None) -> list[str]:
    lock_dir = lock_dir or LOCK_DIR
    return sorted(p.stem for p in lock_dir.glob("*.txt")) if lock_dir.is_dir() else []


def lock_path(name: str, lock_dir: Path | None = None) -> Path:
    _check_name(name)
    return (lock_dir or LOCK_DIR) / f"{name}.txt"


def load_lock(name: str, lock_dir: Path | None = None) -> Lock:
    path = lock_path(name, lock_dir)
    if not path.is_file():
        have = ", ".join(lock_names(lock_dir)) or "none"
        raise LockError(f"no lock {name!r} in {path.parent} (valid locks: {have}); `bench lock refresh {name}` "
                        f"makes it from this install")
    return parse(path.read_text(encoding="utf-8"), name)


def active_extras(extras: Mapping[str, list[str]], env: Mapping[str, Installed]) -> tuple[str, ...]:
    """The extras installed here: those each of whose own requirements (that hold here) is installed."""
    def present(line: str) -> bool:
        req = Requirement(line)
        return not _applies(req, frozenset()) or canonicalize_name(req.name) in env

    return tuple(e for e in EXTRAS if extras.get(e) and all(present(r) for r in extras[e]))


def check(lock: Lock, env: Mapping[str, Installed] | None = None, root: Path = REPO_ROOT,
          requirements: tuple[list[str], dict[str, list[str]]] | None = None) -> list[Difference]:
    """Where the install `env` differs from `lock`: a pin installed at another version; a pin missing (one
    marked `extra: X` only where X is installed); a package the install's own closure needs that the lock
    lacks. Empty when the install is exactly the lock."""
    env = installed_environment() if env is None else env
    core, extras = requirements if requirements is not None else project_requirements(root)
    active = active_extras(extras, env)
    out: list[Difference] = []
    for p in lock.pins:
        have = env.get(p.name)
        if have is None:
            if not p.extras or any(e in active for e in p.extras):
                out.append(Difference(p.name, p.version, None))
        elif not same_version(have.version, p.version):
            out.append(Difference(p.name, p.version, have.version))
    locked = lock.versions()
    needed = closure(core + [r for e in active for r in extras.get(e, [])], env, missing=[])
    out += [Difference(n, None, env[n].version, by) for n, by in sorted(needed.items()) if n not in locked]
    here = platform_tag()
    if lock.platform and lock.platform != here:
        out.append(Difference(PLATFORM, lock.platform, here))
    return sorted(out, key=lambda d: d.name)


def refresh(name: str, lock_dir: Path | None = None, env: Mapping[str, Installed] | None = None,
            root: Path = REPO_ROOT) -> tuple[Lock, Path]:
    """Rewrite `lock_dir`/`name`.txt from the install (atomically: a reader sees the old lock or the new)."""
    from bench.store import atomic_write_text

    lock = generate(name, env, root)
    path = lock_path(name, lock_dir)
    atomic_write_text(path, lock.text())
    return lock, path


def lock_state(name: str, lock_dir: Path | None = None, env: Mapping[str, Installed] | None = None
               ) -> LockState | None:
    """The record's view of lock `name` against this install; None where the lock cannot be read here (an
    install without its checkout, or a lock this checkout does not have)."""
    try:
        lock = load_lock(name, lock_dir)
        diffs = check(lock, env)
    except (LockError, OSError, InvalidRequirement):
        return None
    return LockState(name, lock.sha256, not diffs, tuple(str(d) for d in diffs))
