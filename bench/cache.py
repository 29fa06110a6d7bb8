"""The cache of reference work: trained weights (safetensors) and evaluations (JSON), under `BENCH_CACHE`.

Every entry is written atomically and carries a sha256 in a sidecar; a read that finds a missing, truncated
or altered entry reports a miss (and the caller rebuilds), never crashes and never unpickles anything.
An entry of several files (weights and what their build measured: `cached_bundle`) is read as one unit: when
any part is missing or damaged the whole entry is a miss and is rebuilt, so a value that only the build knows
(its training time) is never replaced by a placeholder.
A file lock per entry makes concurrent runs build a shared entry once: the second waits, then reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from bench.store import atomic_write_text


CACHE_ENV = "BENCH_CACHE"


class CacheUnwritable(OSError):
    """The cache folder cannot be created or written; the message names `BENCH_CACHE`, which chooses it."""


def cache_root() -> Path:
    """The cache folder `BENCH_CACHE` names (default `$XDG_CACHE_HOME/bench`, `~/.cache/bench`), not created:
    what the preflight probes before any work."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bench")
    return Path(root)


def describe_root() -> str:
    """Where the cache folder comes from, for messages: the variable's value, or that it is the default."""
    value = os.environ.get(CACHE_ENV)
    return f"{CACHE_ENV}={value}" if value else f"the default; {CACHE_ENV} is unset"


def cache_dir() -> Path:
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheUnwritable(f"the bench cache folder {path} ({describe_root()}) cannot be created: "
                              f"{e.strerror or e}; set {CACHE_ENV} to a writable folder") from e
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=3600):
        yield


# --- weights -----------------------------------------------------------------------------------------------

def save_weights(path: Path, tensors: dict) -> str:
    """Save `tensors` as safetensors atomically with a `.sha256` sidecar; return the sha256.

    No `__metadata__` is written: safetensors serialises it from a hash map in an order that changes from
    process to process, which would make the same tensors hash differently.
    """
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    digest = sha256_bytes(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n")
    return digest


def load_weights(path: Path, expected_sha256: str | None = None) -> tuple[dict, str] | None:
    """(tensors, sha256) if `path` exists and matches its sidecar (or `expected_sha256`); else None."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        return None
    expected = expected_sha256
    if expected is None:
        side = path.with_name(path.name + ".sha256")
        if not side.is_file():
            return None
        expected = side.read_text().strip()
    blob = path.read_bytes()
    digest = sha256_bytes(blob)
    if digest != expected:
        return None
    try:
        return load(blob), digest
    except (SafetensorError, ValueError, RuntimeError):
        return None


def cached_weights(path: Path, build: Callable[[], dict]) -> tuple[dict, str, bool]:
    """(tensors, sha256, built_now): load `path`, or build, save and return it under the entry's lock."""
    hit = load_weights(path)
    if hit is not None:
        return hit[0], hit[1], False
    with entry_lock(path):
        hit = load_weights(path)  # another process may have built it while we waited
        if hit is not None:
            return hit[0], hit[1], False
        tensors = build()
        digest = save_weights(path, tensors)
        return tensors, digest, True


# --- weights with what their build measured, as one entry ------------------------------------------------

def _manifest(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def load_bundle(path: Path) -> tuple[dict, dict, str] | None:
    """(tensors, meta, sha256) when the weights at `path` and their manifest are both present and intact and
    the manifest names these very weights; else None (a miss: rebuild both)."""
    manifest = load_json(_manifest(path))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights_sha256"), str) \
            or not isinstance(manifest.get("meta"), dict):
        return None
    hit = load_weights(path, manifest["weights_sha256"])
    if hit is None:
        return None
    return hit[0], manifest["meta"], hit[1]


def cached_bundle(path: Path, build: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, str, bool]:
    """(tensors, meta, sha256, built_now) for weights cached at `path` together with a JSON-serialisable `meta`
    that only their build can tell (its seconds, steps, losses).

    The two are one entry: the manifest, written last, names the weights' sha256 and holds `meta`; a missing or
    truncated manifest, or weights that are not the ones it names, is a miss, and both are built again. (Kept
    as two separate entries, an intact weights file beside a damaged sidecar used to rebuild the sidecar alone,
    from a build that never ran: `{"seconds": null}`, cached for good.)"""
    hit = load_bundle(path)
    if hit is not None:
        return hit[0], hit[1], hit[2], False
    with entry_lock(path):
        hit = load_bundle(path)
        if hit is not None:
            return hit[0], hit[1], hit[2], False
        tensors, meta = build()
        meta = json.loads(json.dumps(meta))  # what a later read returns, and a TypeError now if it cannot be
        digest = save_weights(path, tensors)
        atomic_write_text(_manifest(path), _wrap({"weights_sha256": digest, "meta": meta}))
        return tensors, meta, digest, True


# --- JSON (evaluations) ------------------------------------------------------------------------------------

def _wrap(payload: Any) -> str:
    body = json.dumps(payload, sort_keys=True)
    return json.dumps({"sha256": sha256_bytes(body.encode()), "payload": payload}, sort_keys=True) + "\n"


def load_json(path: Path) -> Any | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        body = json.dumps(doc["payload"], sort_keys=True)
        if sha256_bytes(body.encode()) != doc["sha256"]:
            return None
        return doc["payload"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_json(path: Path, build: Callable[[], Any]) -> tuple[Any, bool]:
    """(payload, built_now) for a JSON-serialisable value cached at `path`."""
    hit = load_json(path)
    if hit is not None:
        return hit, False
    with entry_lock(path):
        hit = load_json(path)
        if hit is not None:
            return hit, False
        payload = build()
        atomic_write_text(path, _wrap(payload))
        return json.loads(json.dumps(payload)), True


def key(*parts: Any) -> str:
    """A short stable hash of `parts` for cache file names."""
    return sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())[:16]


# --- identities and places shared by tasks and methods -----------------------------------------------------

def state_sha256(state: dict) -> str:
    """sha256 over the sorted names, dtypes, shapes and raw bytes of a state dict's tensors (tied tensors count
    once per name). Independent of file format and sharding: the hash of the weights as loaded."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_digest(model) -> str:
    """The identity of a model's weights (parameters and buffers): what every cache key of a method's trained
    part names its teacher or starting point by."""
    return state_sha256(model.state_dict())


def task_dir(task) -> Path:
    """The cache folder of a task's own derived entries (controls, solutions), per task version."""
    return cache_dir() / "tasks" / task.spec.name / f"v{task.spec.version}"


def method_dir(method: str, task) -> Path:
    """The cache folder of a method's trained parts on a task."""
    return cache_dir() / "methods" / method / task.spec.name

