"""Sweeps: the file's validation, expansion and resume rules, and real sweeps on digits under both executors,
stopped half way (SIGINT, then SIGKILL) and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.store import iter_result_files, load_result
from bench.sweep import SweepError, SweepFile, expand, load_sweep, plan
from bench.worker import command_line, format_value

REPO = Path(__file__).resolve().parent.parent
cli = CliRunner()

GRID = """\
name: test
tasks: [digits]
seeds: [0, 1]
budget: smoke
methods: [none, magnitude, kd]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- the file ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("tasks: [digits]\nmethods: [kd]\ncolour: blue\n", "colour: Extra inputs are not permitted"),
    ("tasks: [digits]\nmethods: [{method: kd, grids: {alpha: [0.5]}}]\n", "grids"),
    ("tasks: [digits]\nmethods: [kd]\ninclude: other.yaml\n", "include"),  # no includes, so no include cycles
    ("tasks: [digits]\nmethods: [kd]\nseeds: zero\n", "seeds"),
    ("tasks: [digits]\nmethods: [kd]\nseeds: [0, '1']\n", "seeds.1"),
    ("tasks: digits\nmethods: [kd]\n", "tasks"),
    ("tasks: [digits]\nmethods: [{method: kd, grid: {alpha: {a: 1}}}]\n", "grid"),
    ("tasks: [digits]\nmethods: [kd]\nbudget: huge\n", "budget"),
    ("tasks: [digits]\nmethods: []\n", "methods"),
    ("tasks: [digits]\nmethods: [kd]\nseeds: []\n", "seeds"),
    ("tasks: []\nmethods: [kd]\n", "tasks"),
    ("tasks: [digits]\nmethods: [{method: magnitude, grid: {sparsity: []}}]\n", "the grid would be empty"),
    ("tasks: [digits]\nmethods: [{method: ../../etc, grid: {}}]\n", "methods.0"),
    ("tasks: [digits]\nmethods: [magnitud]\n", "Did you mean 'magnitude'"),
    ("tasks: [digitz]\nmethods: [kd]\n", "unknown task 'digitz'"),
    ("tasks: [digits]\nmethods: [kd]\nprofiles: [gpu-9000]\n", "unknown profile"),
    ("tasks: [digits]\nmethods: [{method: kd, grid: {T: [2]}}]\n", "valid keys: temperature"),
    ("tasks: [digits]\nmethods: [{method: magnitude, grid: {sparsity: [lots]}}]\n", "is not a number"),
    ("tasks: [digits]\nmethods: [{method: magnitude, grid: {sparsity: [1.5]}}]\n", "sparsity=1.5 must be"),
    ("- just\n- a list\n", "a sweep file is a mapping"),
    ("tasks: [digits\n", "not valid YAML"),
    ("tasks: !!python/object/apply:os.system ['touch /tmp/pwned']\nmethods: [kd]\n", "not valid YAML"),
])
def test_hostile_sweep_files_are_clear_errors_and_write_nothing(tmp_path, text, words):
    path = write(tmp_path, text)
    before = files_under(tmp_path)
    r = cli.invoke(app, ["sweep", str(path), "--results-dir", str(tmp_path / "results")],
                   env={"COLUMNS": "300"})
    assert r.exit_code == 2, r.output
    assert words in " ".join(r.output.split()), r.output
    assert files_under(tmp_path) == before and not (tmp_path / "results").exists()


def test_grid_expands_to_resolved_runs_with_the_runners_config_hash():
    sweep = SweepFile.model_validate({"tasks": ["digits"], "seeds": [0, 1], "methods": [
        "none", {"method": "magnitude", "grid": {"sparsity": [0.5, 0.9], "finetune_epochs": 1}},
        {"method": "kd", "grid": {"temperature": 4}}]})
    runs, notes = expand(sweep)
    assert len(runs) == 2 + 4 + 2 and not notes
    kd = [r for r in runs if r.method == "kd"]
    assert kd[0].hyperparameters == {"temperature": 4.0, "alpha": 0.9}  # converted by KDConfig, defaults kept
    assert len({r.config_hash for r in runs}) == len(runs)
    # the same configuration written twice is run once
    twice = SweepFile.model_validate({"tasks": ["digits"], "methods": ["kd", {"method": "kd", "grid": {"alpha": 0.9}}]})
    runs, notes = expand(twice)
    assert len(runs) == 1 and "twice" in notes[0]


def test_the_shipped_sweep_file_is_valid():
    runs, _ = expand(load_sweep(REPO / "sweeps" / "digits.yaml"))
    assert {r.method for r in runs} >= {"none", "kd", "magnitude"} and {r.seed for r in runs} == {0, 1}


def test_worker_command_line_round_trips_through_the_config_parser():
    from bench.config import apply_overrides, parse_sets
    from baselines.pruning.magnitude import MagnitudeConfig

    spec = {"task": "digits", "method": "magnitude", "profile": "cpu", "seed": 3, "budget": "smoke",
            "overrides": {"sparsity": 0.1 + 0.2, "finetune_epochs": 2}}
    argv = command_line(spec)
    assert argv[:2] == ["bench", "run"] and argv[-2:] == ["--budget", "smoke"]
    sets = parse_sets([argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    assert apply_overrides(MagnitudeConfig(), sets) == MagnitudeConfig(sparsity=0.1 + 0.2, finetune_epochs=2)
    assert format_value(True) == "true" and format_value([1, 2]) == "1,2"


def test_failed_runs_are_skipped_unless_retry_is_asked(tmp_path, monkeypatch):
    from baselines.pruning.magnitude import MagnitudePruning
    from bench.runner import RunFailed, run

    sweep = SweepFile.model_validate({"tasks": ["digits"], "methods": ["magnitude"], "budget": "smoke"})
    runs, _ = expand(sweep)
    monkeypatch.setattr(MagnitudePruning, "apply", lambda *a: 1 / 0)
    with pytest.raises(RunFailed):
        run("digits", "magnitude", budget="smoke", results_root=tmp_path,
            argv=command_line(runs[0].worker_spec(tmp_path)))
    todo, skipped = plan(runs, tmp_path, retry_failed=False)
    assert not todo and skipped[0].status == "skipped" and "--retry-failed" in skipped[0].note
    todo, skipped = plan(runs, tmp_path, retry_failed=True)
    assert todo == runs and not skipped
    # a record made at another budget is a different run
    full = expand(sweep, budget="full")[0]
    assert plan(full, tmp_path, retry_failed=False)[0] == full


# --- real sweeps ---------------------------------------------------------------------------------------------

def _default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: an ignored SIGINT is inherited across exec, and Python then keeps
    ignoring it, so a test process in which something set SIG_IGN would make the sweep deaf to it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bench_sweep(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", "sweep", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)


def wait_for_records(root: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(root.rglob("*.json")) if root.exists() else []) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.1)


def workers_writing_to(root: Path) -> list[int]:
    """Processes whose command line names `root`: a sweep's bench.worker processes for that results tree."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if str(root).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def assert_tree_intact(root: Path) -> dict[str, float]:
    """Only whole, valid records: no temporary or hidden files. Returns {path: mtime}."""
    found = files_under(root)
    assert all(not p.name.startswith(".") and p.suffix == ".json" for p in found), found
    for p in found:
        assert load_result(p, root).status == "ok"
    return {str(p): p.stat().st_mtime_ns for p in found}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """A 3-method x 2-seed sweep on digits with the local executor (2 jobs), stopped with SIGINT after two
    records, started again and killed with SIGKILL after two more, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("sweep-local")
    sweep, root = write(tmp, GRID), tmp / "results"
    args = (str(sweep), "--results-dir", str(root), "--jobs", "2")

    proc = bench_sweep(*args)
    wait_for_records(root, 2, proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "run the same command again" in " ".join(output.split())
    first = assert_tree_intact(root)
    assert 2 <= len(first) < 6 and not workers_writing_to(root)

    proc = bench_sweep(*args)
    wait_for_records(root, len(first) + 1, proc)
    proc.kill()  # SIGKILL: no chance to clean up; its workers must follow it
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while workers_writing_to(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers_writing_to(root), "a killed sweep left runs behind"
    second = assert_tree_intact(root)
    assert len(second) < 6 and all(second[p] == m for p, m in first.items())

    proc = bench_sweep(*args)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert f"{len(second)} already have a record (skipped)" in " ".join(output.split())
    final = assert_tree_intact(root)
    assert all(final[p] == m for p, m in second.items())  # nothing that finished ran again
    return root


def quality_by_config(root: Path) -> dict[str, tuple]:
    out = {}
    for p in iter_result_files(root):
        r = load_result(p, root)
        assert r.provenance.config_hash not in out, "a run was done twice"
        out[r.provenance.config_hash] = (r.method.name, r.seed, r.quality.value, r.quality.reference_value,
                                         [c.value for c in r.controls])
    return out


def test_local_sweep_survives_sigint_and_sigkill_and_resumes(local_sweep):
    q = quality_by_config(local_sweep)
    assert len(q) == 6 and {(m, s) for m, s, *_ in q.values()} == {(m, s) for m in ("none", "magnitude", "kd")
                                                                    for s in (0, 1)}
    r = cli.invoke(app, ["sweep", str(write(local_sweep.parent, GRID, "again.yaml")), "--results-dir",
                         str(local_sweep), "--dry-run"])
    assert r.exit_code == 0 and "0 to run, 6 skipped" in r.output


def test_ray_executor_gives_the_same_quality(local_sweep, tmp_path):
    pytest.importorskip("ray", reason="the ray executor needs Ray: pip install -e '.[ray]'")
    sweep = write(tmp_path, GRID + "resources: {num_cpus: 1}\n")  # two tasks at a time on a 2-CPU local Ray
    proc = bench_sweep(str(sweep), "--results-dir", str(tmp_path / "results"), "--executor", "ray", "--jobs", "2")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert_tree_intact(tmp_path / "results")
    assert quality_by_config(tmp_path / "results") == quality_by_config(local_sweep)
