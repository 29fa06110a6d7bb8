"""Every command that reads a results tree survives a hostile one (issue 18, cases 3 and 4).

One tree holds a valid committed record and, beside it, every entry of `hostile_trees.HOSTILE`: a document
nested 200,000 deep, a 2 MB record, a named pipe called x.json, NaN and Infinity in the figures, a truncated
file, non-UTF-8 bytes, a folder called y.json, a link out of the tree, ... `bench validate`, `bench leaderboard
build`, `bench check --no-smoke` and `bench sweep --dry-run` each run on it in a fresh process, under a
deadline: each must end (no hang), print no traceback, and (all but sweep, which reads only to skip done runs)
name every bad file with its reason. The bench that runs is the one beside this file (PYTHONPATH), so the test
checks the checkout it sits in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for hostile_trees, under --import-mode=importlib too

from hostile_trees import HOSTILE, RECORD, write_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # each command takes seconds; a hang (a fifo opened for reading) would take forever


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "results"
    paths = write_tree(root)
    spec = base / "sweep.yaml"
    spec.write_text("name: hostile\ntasks: [digits]\nprofiles: [cpu]\nseeds: [0]\nbudget: full\n"
                    "methods:\n  - method: kd\n    grid: {temperature: 4.0, alpha: 0.9}\n")
    return {"base": base, "root": root, "paths": paths, "spec": spec}


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "2000", "NO_COLOR": "1", "TERM": "dumb"}
    try:
        return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, errors="replace", timeout=DEADLINE_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`bench {' '.join(args)}` still running after {DEADLINE_S} s: a reader hangs")


def named_with_reasons(output: str, paths: dict[str, Path]) -> list[str]:
    """The hostile entries the output fails to name with the words of their reason (on the same line or the
    lines that follow the name, before the next entry's)."""
    missing = []
    lines = output.splitlines()
    for name, (_, words) in HOSTILE.items():
        at = [i for i, line in enumerate(lines) if str(paths[name]) in line]
        if not at:
            missing.append(f"{name}: not named")
            continue
        near = "\n".join(lines[at[0]: at[0] + 12])
        absent = [w for w in words if w not in near and w not in "\n".join(lines[i] for i in at)]
        if absent:
            missing.append(f"{name}: named without {absent}")
    return missing


def test_validate_lists_every_bad_file_with_its_reason(tree):
    p = bench("validate", str(tree["root"]), cwd=REPO)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    assert p.returncode == 1, out[-3000:]
    assert f"1 valid, {len(HOSTILE)} invalid" in out, out[-3000:]
    assert not named_with_reasons(out, tree["paths"]), named_with_reasons(out, tree["paths"])


def test_leaderboard_build_skips_every_bad_file_naming_it(tree):
    site = tree["base"] / "site"
    p = bench("leaderboard", "build", "--results", str(tree["root"]), "--out", str(site), cwd=REPO)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    assert p.returncode == 0, out[-3000:]
    assert f"{len(HOSTILE)} invalid file(s) skipped" in out, out[-3000:]
    assert not named_with_reasons(out, tree["paths"]), named_with_reasons(out, tree["paths"])
    published = sorted(q.name for q in (site / "results").rglob("*.json"))
    assert published == [RECORD.name], published  # only the valid record reaches the site
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "Infinity" not in text and "NaN" not in text and "inf x" not in text, page


def test_check_reports_every_bad_file_as_an_error(tree):
    p = bench("check", "--no-smoke", "--results-dir", str(tree["root"]), cwd=REPO)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    assert p.returncode == 1, out[-3000:]
    assert f"results: {len(HOSTILE) + 1} files" in out, out[-3000:]
    assert not named_with_reasons(out, tree["paths"]), named_with_reasons(out, tree["paths"])


def test_sweep_dry_run_plans_past_the_bad_files(tree):
    p = bench("sweep", str(tree["spec"]), "--dry-run", "--results-dir", str(tree["root"]), cwd=REPO)
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    assert p.returncode == 0, out[-3000:]
    assert "1 runs:" in out, out[-3000:]
