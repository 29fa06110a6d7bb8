"""Where a result came from: bench version, git state, the exact command, a config hash, packages, platform."""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import __version__
from bench.result import LockInfo, Provenance

# The packages whose versions can change a number in a result.
TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "safetensors", "pydantic", "transformers",
                    "diffusers", "lm-eval", "torch-fidelity", "accelerate", "datasets", "tokenizers")

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_hash(task: str, task_version: str, method: str, method_version: str, hyperparameters: dict[str, Any],
                profile: str, seed: int, bench_version: str, compiled: bool = False) -> str:
    """sha256 of the run's configuration in canonical JSON: equal configs hash equal on every machine.
    `compiled` (bench run --compile) enters the payload only when set, so records made before it hash as then."""
    payload = {"task": task, "task_version": task_version, "method": method, "method_version": method_version,
               "hyperparameters": hyperparameters, "profile": profile, "seed": seed,
               "bench_version": bench_version}
    if compiled:
        payload["compiled"] = True
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(HEAD sha, dirty) of the checkout bench runs from, or (None, None) outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return None, None
    # results/ is where runs write; a new result file does not make the code dirty.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return sha.strip(), bool(status and status.strip())


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def portable_command(argv: list[str]) -> list[str]:
    """The command as anyone can rerun it: `bench` for the entry point, and without `--results-dir` (where a
    record is written is no part of what it measures, and an absolute folder is the contributor's own)."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--results-dir":
            skip = True
            continue
        if a.startswith("--results-dir="):
            continue
        out.append("bench" if i == 0 and a.endswith(("bench", "__main__.py")) else a)
    return out


def locked_names(lock_name: str | None) -> set[str] | None:
    """The distributions bench pins: lock `lock_name`'s, else the closure of the project's requirements as
    installed (what a refreshed lock would pin); None when neither can be read."""
    from bench import lock as L

    if lock_name:
        try:
            return set(L.load_lock(lock_name).versions())
        except (L.LockError, OSError):
            pass
    try:
        return set(L.generate(L.DEFAULT_LOCK).versions())
    except (L.LockError, OSError):
        return None


def provenance(cfg_hash: str, argv: list[str] | None = None, lock: str | None = None,
               code: tuple | None = None) -> Provenance:
    """Where a run comes from. `lock`: the profile's lock (its name, hash and whether this install matches it
    are recorded); `code`: (task spec, method spec), whose imported distributions are recorded."""
    from bench.imported import imported_versions
    from bench.lock import lock_state

    sha, dirty = git_state()
    argv = portable_command(list(sys.argv if argv is None else argv))
    state = lock_state(lock) if lock else None
    return Provenance(
        bench_version=__version__,
        git_sha=sha,
        git_dirty=dirty,
        command=shlex.join(argv),
        config_hash=cfg_hash,
        packages=package_versions(),
        platform=platform.platform(),
        python=platform.python_version(),
        lock=LockInfo(name=state.name, sha256=state.sha256, matched=state.matched,
                      differences=list(state.differences)) if state else None,
        imported_packages=imported_versions(*code, among=locked_names(lock)) if code else None,
    )
