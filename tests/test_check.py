"""`bench check`: every rule it holds results to, as errors for what a pull request adds and warnings for what
is already merged, and its report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.check import CheckReport, check_results, resolve_base
from bench.cli import app
from bench.provenance import REPO_ROOT, config_hash

cli = CliRunner()
HEAD = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def good_record(tmp_path_factory) -> Path:
    """A full-budget record made from committed code on a matching machine (`none`: nothing to train)."""
    from bench.runner import run

    root = tmp_path_factory.mktemp("check") / "results"
    path = run("digits", "none", results_root=root, argv=["bench", "run", "--method", "none", "--task", "digits"]).path
    data = json.loads(path.read_text())
    data["provenance"].update(git_sha=HEAD or "0" * 40, git_dirty=False)
    data["profile"].update(matched=True, mismatches=[])
    # these tests are about check's rules, not this machine's load: a quiet, plausible timing verdict
    s = data["speed"]
    s.update(status="ok", reasons=[])
    s["interval"].update(low=min(s["interval"]["low"], 1.0, s["speedup"]), high=max(s["interval"]["high"], 1.0, s["speedup"]))
    path.write_text(json.dumps(data, indent=2))
    return path


def tree(good: Path, tmp_path: Path, change=None, move_to: str | None = None) -> tuple[Path, Path]:
    root = tmp_path / "results"
    shutil.copytree(good.parents[3], root)
    path = root / good.relative_to(good.parents[3])
    if change:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data, indent=2))
    if move_to:
        dst = root / move_to / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        path = path.rename(dst)
    return root, path


def rehash(d: dict) -> None:
    d["provenance"]["config_hash"] = config_hash(
        d["task"]["name"], d["task"]["version"], d["method"]["name"], d["method"]["version"],
        d["method"]["hyperparameters"], d["profile"]["name"], d["seed"], d["provenance"]["bench_version"])


def check(root: Path, new: bool = True, strict: bool = False) -> CheckReport:
    report = CheckReport()
    check_results(report, root, lambda p: new, strict)
    return report


def messages(report: CheckReport, level: str) -> str:
    return " | ".join(f.message for f in report.findings if f.level == level)


def test_a_clean_record_passes(good_record, tmp_path):
    report = check(tree(good_record, tmp_path)[0])
    assert report.ok and report.n_results == 1, report.findings
    assert not [f for f in report.findings if "history" not in f.message]  # at most: sha not in this clone


PROVENANCE_RULES = [
    ("dirty", lambda d: d["provenance"].update(git_dirty=True), "uncommitted changes"),
    ("no git", lambda d: d["provenance"].update(git_sha=None, git_dirty=None), "outside a git checkout"),
    ("other machine", lambda d: d["profile"].update(matched=False, mismatches=["1 CPU, the profile needs 2"]),
     "does not match profile 'cpu' (1 CPU"),
    ("smoke budget", lambda d: d.update(budget="smoke"),
     "--budget smoke"),
]


@pytest.mark.parametrize("what, change, words", PROVENANCE_RULES, ids=[r[0] for r in PROVENANCE_RULES])
def test_provenance_rules_fail_new_results_and_warn_on_merged_ones(good_record, tmp_path, what, change, words):
    root, _ = tree(good_record, tmp_path, change)
    assert words in messages(check(root, new=True), "error")
    merged = check(root, new=False)
    assert merged.ok and words in messages(merged, "warning")
    assert words in messages(check(root, new=False, strict=True), "error")


INVARIANTS = [
    ("family", lambda d: d["method"].update(family="distillation"), None, "is in family none"),
    ("config hash", lambda d: d.update(seed=7), None, "does not match the record's configuration"),
    ("forged method name", lambda d: (d["method"].update(name="evil"), rehash(d)), "cpu/digits/evil",
     "not registered here"),
    ("forged task name", lambda d: (d["task"].update(name="digitz"), rehash(d)), "cpu/digitz/none",
     "unknown task 'digitz'"),
    ("../ in a path field", lambda d: d["method"].update(name="../../../x"), None, "method.name"),
    ("mixed profiles", None, "h100-bf16/digits/none", "file is at h100-bf16/digits/none"),
    ("not JSON", lambda d: d.clear(), None, "schema: expected 'bench.result/1'"),
]


@pytest.mark.parametrize("what, change, move_to, words", INVARIANTS, ids=[r[0] for r in INVARIANTS])
def test_invariants_are_errors_whoever_made_the_result(good_record, tmp_path, what, change, move_to, words):
    root, _ = tree(good_record, tmp_path, change, move_to)
    report = check(root, new=False)
    assert not report.ok and words in messages(report, "error"), report.findings


def test_verification_records_must_sit_beside_what_they_verify(good_record, tmp_path):
    from bench.reproduce import make_verification, verification_path
    from bench.store import load_result

    root, path = tree(good_record, tmp_path)
    r = load_result(path)

    def marker(**change) -> str:  # what `bench reproduce` writes for a faithful re-run, then hand-edited
        v = make_verification(r, r, path.name, "a maintainer", [])
        return v.model_copy(update=change).to_json()

    verification_path(path).write_text(marker())
    report = check(root)
    assert report.ok and report.n_verified == 1 and report.n_results == 1  # a marker is never read as a result
    verification_path(path).write_text(marker(config_hash="0" * 64))
    assert "verifies another record" in messages(check(root), "error")
    verification_path(path).write_text(marker())
    (path.parent / "20200101T000000Z-00000000-0000.verified.json").write_text(marker())
    assert "which is not beside it" in messages(check(root), "error")
    (path.parent / "20200101T000000Z-00000000-0000.verified.json").write_text('{"verified": true}')
    assert "not a verification record" in messages(check(root), "error")
    (path.parent / "20200101T000000Z-00000000-0000.verified.json").unlink()
    inflated = r.speed.model_copy(update=dict(speedup=r.speed.speedup * 6))  # the record edited after it was verified
    verification_path(path).write_text(marker(rerun=r.model_copy(update=dict(speed=inflated)).model_dump(mode="json")))
    assert "does not verify" in messages(check(root), "error")
    verification_path(path).write_text(marker(forced=True))
    report = check(root)
    assert report.ok and report.n_verified == 0  # honest, but it verifies nothing


def test_the_report_names_each_problem_and_exits_1(good_record, tmp_path):
    root, path = tree(good_record, tmp_path, lambda d: d["provenance"].update(git_dirty=True))
    r = cli.invoke(app, ["check", "--results-dir", str(root), "--no-smoke", "--base", "HEAD"],
                   env={"COLUMNS": "400"})  # wide enough that rich never wraps the record's path in the table
    assert r.exit_code == 1, r.output
    assert "FAILED: 1 errors" in r.output and path.name in r.output and "uncommitted changes" in r.output, r.output
    root2, _ = tree(good_record, tmp_path / "ok")
    r = cli.invoke(app, ["check", "--results-dir", str(root2), "--no-smoke", "--base", "HEAD"],
                   env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "PASSED" in r.output and "results: 1 files" in r.output


def test_an_unknown_base_is_an_error():
    with pytest.raises(ValueError, match="not a commit"):
        resolve_base("no-such-branch-anywhere")
