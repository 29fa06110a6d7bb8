"""`bench reproduce`: a committed-style record is verified; tampered, misplaced, forged or other-version
records are refused or fail, clearly, and nothing is written outside the results tree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.provenance import config_hash
from bench.reproduce import load_verification, verification_path

cli = CliRunner()


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A record in its place in a results tree, as `bench run` writes it. The `none` method: both timed arms
    are the same model, so its speedup interval repeats even on a busy machine."""
    from bench.runner import run

    root = tmp_path_factory.mktemp("committed") / "results"
    argv = ["bench", "run", "--method", "none", "--task", "digits", "--budget", "smoke"]
    return run("digits", "none", budget="smoke", results_root=root, argv=argv).path


def copy_tree(src: Path, dst: Path) -> Path:
    """A fresh copy of the record's results tree; returns the copied record's path."""
    root = src.parents[3]
    shutil.copytree(root, dst / "results")
    return dst / "results" / src.relative_to(root)


def edit(path: Path, change) -> dict:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    return data


def rehash(d: dict) -> None:
    """Recompute the record's config hash, as a forger who knows the formula would."""
    d["provenance"]["config_hash"] = config_hash(
        d["task"]["name"], d["task"]["version"], d["method"]["name"], d["method"]["version"],
        d["method"]["hyperparameters"], d["profile"]["name"], d["seed"], d["provenance"]["bench_version"])


def all_files(tmp_path: Path) -> set[Path]:
    return {p for p in tmp_path.rglob("*") if p.is_file()}


def reproduce(*args: str):
    return cli.invoke(app, ["reproduce", *args], env={"COLUMNS": "200"})


def test_reproduce_marks_a_committed_result_verified(committed, tmp_path):
    from leaderboard.data import load_tree

    path = copy_tree(committed, tmp_path)
    r = reproduce(str(path), "--by", "a maintainer")
    assert r.exit_code == 0, r.output
    assert "verified" in r.output and "MISMATCH" not in r.output
    v = load_verification(verification_path(path))
    assert v.verified and v.verified_by == "a maintainer" and v.run_id == path.stem and not v.forced
    assert v.machine.cpu_count >= 1 and v.checks and all(c.ok for c in v.checks)
    assert v.rerun["provenance"]["config_hash"] == v.config_hash
    (_, rel, verified), = load_tree(tmp_path / "results").results  # the leaderboard shows it verified
    assert verified and rel == path.relative_to(tmp_path / "results").as_posix()
    assert cli.invoke(app, ["validate", str(tmp_path / "results")]).exit_code == 0  # the marker is no result
    assert all_files(tmp_path) == {path, verification_path(path)}  # the re-run's own record went nowhere


def test_a_tampered_quality_is_a_mismatch_and_exits_1(committed, tmp_path):
    path = copy_tree(committed, tmp_path)

    def better(d):  # a careful forger keeps every invariant true
        q = d["quality"]
        q["value"] += 0.01
        q["delta"] = q["value"] - q["reference_value"]
        q["interval"]["high"] = max(q["interval"]["high"], q["value"])
    edit(path, better)
    r = reproduce(str(path))
    assert r.exit_code == 1, r.output
    assert "NOT verified" in r.output and "quality.value" in r.output and "MISMATCH" in r.output
    assert not verification_path(path).exists()


def test_an_inconsistent_record_is_refused_before_running(committed, tmp_path):
    path = copy_tree(committed, tmp_path)
    edit(path, lambda d: d["quality"].__setitem__("value", 0.99))  # delta no longer adds up
    r = reproduce(str(path))
    assert r.exit_code == 2 and "quality.delta" in r.output and not verification_path(path).exists()


def test_other_versions_are_refused_unless_forced(committed, tmp_path):
    path = copy_tree(committed, tmp_path)

    def older(d):
        d["provenance"]["packages"]["numpy"] = "0.0.1"
        d["provenance"]["bench_version"] = "0.0.9"  # the config hash covers it: keep the record consistent
        rehash(d)
    edit(path, older)
    r = reproduce(str(path))
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "package numpy: record 0.0.1" in out and "bench version: record 0.0.9" in out
    assert "--force" in out and not verification_path(path).exists()
    # this test is about versions: the speed check may be loose (a 'none' run's speedup interval is narrow,
    # and on a busy machine a re-run's can miss it; every other reproduction here keeps the strict default)
    r = reproduce(str(path), "--force", "--speed-tolerance", "0.5")
    assert r.exit_code == 0, r.output
    v = load_verification(verification_path(path))  # verified, saying past which differences
    assert v.forced and any("numpy" in d for d in v.version_differences)
    assert any(c.name == "configuration" and c.ok for c in v.checks)


@pytest.mark.parametrize("what, change, words", [
    ("forged method name", lambda d: d["method"].__setitem__("name", "kd"), "does not match the record's"),
    ("forged name, rehashed", lambda d: (d["method"].__setitem__("name", "kd"), rehash(d)),
     "not where its fields place it"),
    ("../ in the method name", lambda d: d["method"].__setitem__("name", "../../../etc"), "method.name"),
    ("../ in the run id", lambda d: d.__setitem__("run_id", "../../x"), "run_id"),
    ("/ in the profile", lambda d: d["profile"].__setitem__("name", "/tmp"), "profile.name"),
])
def test_forged_records_are_refused_and_nothing_is_written(committed, tmp_path, what, change, words):
    path = copy_tree(committed, tmp_path)
    edit(path, change)
    before = all_files(tmp_path)
    r = reproduce(str(path))
    assert r.exit_code == 2, (what, r.output)
    assert words in r.output and "not reproduced" in r.output
    assert all_files(tmp_path) == before


def test_an_unregistered_method_is_named(committed, tmp_path):
    src = copy_tree(committed, tmp_path)
    dst = src.parents[1] / "evil" / src.name  # placed where its (forged) fields say, so only the name is wrong
    dst.parent.mkdir()

    edit(src, lambda d: (d["method"].__setitem__("name", "evil"), rehash(d)))
    src.rename(dst)
    r = reproduce(str(dst))
    assert r.exit_code == 2 and "unknown method 'evil'" in r.output


def test_a_verification_record_is_not_a_result(committed, tmp_path):
    path = copy_tree(committed, tmp_path)
    marker = verification_path(path)
    marker.write_text("{}")
    r = reproduce(str(marker))
    assert r.exit_code == 2 and "verification record" in r.output
