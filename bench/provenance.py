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
from bench.result import Provenance

# The packages whose versions can change a number in a result.
TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "safetensors", "pydantic", "transformers",
                    "diffusers", "lm-eval", "torch-fidelity", "accelerate", "datasets", "tokenizers")

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_hash(task: str, task_version: str, method: str, method_version: str, hyperparameters: dict[str, Any],
                profile: str, seed: int, bench_version: str) -> str:
    """sha256 of the run's configuration in canonical JSON: equal configs hash equal on every machine."""
    payload = {"task": task, "task_version": task_version, "method": method, "method_version": method_version,
               "hyperparameters": hyperparameters, "profile": profile, "seed": seed,
               "bench_version": bench_version}
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


def provenance(cfg_hash: str, argv: list[str] | None = None) -> Provenance:
    sha, dirty = git_state()
    argv = portable_command(list(sys.argv if argv is None else argv))
    return Provenance(
        bench_version=__version__,
        git_sha=sha,
        git_dirty=dirty,
        command=shlex.join(argv),
        config_hash=cfg_hash,
        packages=package_versions(),
        platform=platform.platform(),
        python=platform.python_version(),
    )
