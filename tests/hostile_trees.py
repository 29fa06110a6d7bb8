"""Hostile results trees for the reader tests (issue 18, case 3 and 4): files under a results tree that every
reader must reject by name and reason, never crash or hang on. Built from a committed record, so each one
differs from a valid record in one way only (or in a way the old reader accepted)."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
RECORD = sorted((REPO / "results" / "cpu" / "digits" / "kd").glob("*.json"))[0]  # a committed, valid record
FOLDER = ("cpu", "digits", "kd")  # where RECORD lies in its tree, and where the hostile entries go
HOSTILE: dict[str, tuple[Callable[[Path, Path], None], tuple[str, ...]]] = {}


def record() -> dict:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def dump(d: dict) -> str:
    return json.dumps(d, indent=2)  # allow_nan: NaN and inf are written as the bare tokens Python's json takes


def hostile(name: str, *words: str):
    """Register a writer `fn(path, outside)` of the entry `name`, and the words its rejection must hold."""
    def register(fn):
        HOSTILE[name] = (fn, words)
        return fn
    return register


@hostile("deep.json", "nested more than")
def _deep(p: Path, outside: Path) -> None:
    p.write_text("[" * 200_000 + "]" * 200_000)


@hostile("deep-inside.json", "method.hyperparameters.alpha", "nested more than")
def _deep_inside(p: Path, outside: Path) -> None:  # 100 levels: below Python's recursion limit, above ours
    d, v = record(), 0.5
    for _ in range(100):
        v = [v]
    d["method"]["hyperparameters"]["alpha"] = v
    p.write_text(dump(d))


@hostile("huge.json", "bytes, over the", "limit")
def _huge(p: Path, outside: Path) -> None:  # an otherwise valid record of 2 MB (the old reader took 50 MB)
    d = record()
    d["method"]["paper"] = "x" * (2 << 20)
    p.write_text(dump(d))


@hostile("x.json", "named pipe")
def _fifo(p: Path, outside: Path) -> None:
    os.mkfifo(p)


@hostile("infinite.json", "speed.speedup", "speed.interval.high", "cost.seconds", "fidelity.value",
         "not a finite number")
def _infinite(p: Path, outside: Path) -> None:
    d = record()
    d["speed"]["speedup"] = d["speed"]["interval"]["high"] = d["cost"]["seconds"] = math.inf
    d["fidelity"]["value"] = math.nan
    p.write_text(dump(d))


@hostile("overflow.json", "speed.speedup", "not a finite number")
def _overflow(p: Path, outside: Path) -> None:  # 1e999 is valid JSON syntax that parses to inf
    d = record()
    d["speed"]["speedup"] = 123.25
    p.write_text(dump(d).replace("123.25", "1e999"))


@hostile("truncated.json", "not JSON")
def _truncated(p: Path, outside: Path) -> None:
    text = RECORD.read_text(encoding="utf-8")
    p.write_text(text[: len(text) // 2])


@hostile("latin1.json", "not UTF-8")
def _latin1(p: Path, outside: Path) -> None:
    p.write_bytes(RECORD.read_bytes().replace(b'"paper": "', b'"paper": "\xe9\xff', 1))


@hostile("y.json", "a folder")
def _folder(p: Path, outside: Path) -> None:
    p.mkdir()


@hostile("outside.json", "symbolic link")  # "to a file outside the results tree", or, read without its tree, "read
# without the results tree it belongs to" (the leaderboard reads each file on its own)
def _link_out(p: Path, outside: Path) -> None:
    target = outside / RECORD.name
    target.write_bytes(RECORD.read_bytes())
    p.symlink_to(target)


@hostile("duplicate.json", "'speedup' appears twice")
def _duplicate(p: Path, outside: Path) -> None:
    text = RECORD.read_text(encoding="utf-8")
    p.write_text(text.replace('"speedup": ', '"speedup": 40.0, "speedup": ', 1))


@hostile("absolute.json", "provenance.command", "absolute path")
def _absolute(p: Path, outside: Path) -> None:
    d = record()
    d["provenance"]["command"] += " --results-dir /home/someone/results"
    p.write_text(dump(d))


@hostile("surrogate.json", "method.paper", "lone surrogate")
def _surrogate(p: Path, outside: Path) -> None:
    p.write_text(RECORD.read_text(encoding="utf-8").replace('"paper": "', '"paper": "\\ud800', 1))


@hostile("array.json", "not a JSON object")
def _array(p: Path, outside: Path) -> None:
    p.write_text("[1, 2, 3]")


@hostile("bigint.json", "digits")
def _bigint(p: Path, outside: Path) -> None:
    p.write_text(RECORD.read_text(encoding="utf-8").replace('"seed": 0', '"seed": 1' + "0" * 5000, 1))


def write_tree(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The committed record at its place under `root`, and the hostile entries `names` (default: all) beside it;
    a link's target goes to a folder beside `root`. Returns name -> path ("good" for the record)."""
    folder = root.joinpath(*FOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    outside = root.parent / (root.name + "-outside")
    outside.mkdir(exist_ok=True)
    paths = {"good": folder / RECORD.name}
    paths["good"].write_bytes(RECORD.read_bytes())
    for name in list(HOSTILE) if names is None else names:
        HOSTILE[name][0](folder / name, outside)
        paths[name] = folder / name
    return paths


# ---- random corruptions of a valid record ---------------------------------------------------------------------

def corruptions(seed: int, n: int) -> Iterator[tuple[str, bytes]]:
    """`n` seeded random corruptions of the record's bytes, each (what was done, bytes)."""
    rng = random.Random(seed)
    base = RECORD.read_bytes()
    numbers = [i for i in range(len(base) - 1) if base[i:i + 1].isdigit() and not base[i - 1:i].isdigit()]
    for k in range(n):
        kind = rng.choice(["truncate", "flip", "number", "nest", "insert", "duplicate", "splice"])
        b = bytearray(base)
        if kind == "truncate":
            b = b[: rng.randrange(len(b))]
        elif kind == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "number":
            i = rng.choice(numbers)
            j = i
            while j < len(b) and (chr(b[j]).isdigit() or b[j:j + 1] in (b".", b"e", b"-")):
                j += 1
            b[i:j] = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" * 5000, b"0.5"])
        elif kind == "nest":
            i = rng.choice(numbers)
            depth = rng.choice([31, 33, 500, 5000, 100_000])
            b[i:i] = b"[" * depth
            j = i + depth
            while j < len(b) and chr(b[j]).isdigit():
                j += 1
            b[j:j] = b"]" * depth
        elif kind == "insert":
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == "duplicate":
            b = bytearray(base.replace(b'"seed": ', b'"seed": 3, "seed": ', 1))
        else:  # a piece of the record spliced into itself
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            k2 = rng.randrange(len(b))
            b[k2:k2] = b[i:j]
        yield f"{k}:{kind}", bytes(b)
