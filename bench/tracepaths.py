"""Paths in error text made relative, so a failed record says where the fault is without saying where the
contributor keeps things.

A failed run's record carries its error message and traceback, and the leaderboard publishes records; an
absolute path there is someone's home folder, user name or temporary folder, and means nothing on another
machine. So before they are stored, paths under the repository become relative to it (`bench/runner.py`), and
paths under the Python installation, the temporary folder and the home folder are written from a named root:
`<site-packages>/torch/nn/modules/module.py`, `<stdlib>/subprocess.py`, `<python>/bin/python`, `<tmp>/...`,
`~/...`. Line numbers, names and everything else are unchanged.
"""

from __future__ import annotations

import functools
import os
import re
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def roots() -> tuple[tuple[str, str], ...]:
    """(folder, label) pairs, longest folder first: a label "" means relative to the repository."""
    pairs: dict[str, str] = {}

    def add(path, label: str) -> None:
        if not path:
            return
        for variant in (os.path.abspath(path), os.path.realpath(path)):
            variant = variant.rstrip("/\\")
            if len(variant) > 1 and variant not in pairs:
                pairs[variant] = label

    add(str(REPOSITORY), "")
    sites = list(getattr(site, "getsitepackages", lambda: [])()) + [getattr(site, "getusersitepackages",
                                                                            lambda: "")()]
    paths = sysconfig.get_paths()
    for p in sites + [paths.get("purelib"), paths.get("platlib")]:
        add(p, "<site-packages>")
    for p in (paths.get("stdlib"), paths.get("platstdlib")):
        add(p, "<stdlib>")
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        add(p, "<python>")
    add(tempfile.gettempdir(), "<tmp>")
    add(os.path.expanduser("~"), "~")
    return tuple(sorted(pairs.items(), key=lambda kv: -len(kv[0])))


@functools.lru_cache(maxsize=1)
def _pattern() -> re.Pattern:
    alternatives = "|".join(re.escape(folder) for folder, _ in roots())
    # a whole folder: not inside a longer name, and followed by a separator or the end of the path
    return re.compile(rf"(?<![\w.~/\\-])({alternatives})(?:([/\\])|(?![\w.-]))")


def relative_paths(text: str) -> str:
    """`text` with every path under a known root rewritten (see the module docstring)."""
    if not text:
        return text
    labels = dict(roots())

    def swap(m: re.Match) -> str:
        label, sep = labels[m.group(1)], m.group(2) or ""
        if label == "":
            return "" if sep else "."
        return label + sep

    return _pattern().sub(swap, text)
