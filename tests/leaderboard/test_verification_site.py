"""The site shows a record as verified only when the `.verified.json` beside it is a sound verification of the
record as it is now: never because the file exists. Empty, garbage, forced, failed, hand-edited or outdated
files each leave the record unverified, and a broken one is a named rejection, never a crash."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from leaderboard.build import BuildError, build_site
import leaderboard.data as D
from leaderboard.data import load_tree
from lb_synth import make_result, rerun_of, verification_of, write

runner = CliRunner()


def marker_of(path: Path) -> Path:
    return path.with_name(path.name[: -len(".json")] + ".verified.json")


def kd(n: int, speedup: float = 6.48, low: float = 6.24, high: float = 6.70):
    r = make_result(method="kd", hp={"temperature": 4.0, "alpha": 0.5, "n": n}, speedup=speedup, n=n)
    return r.model_copy(update=dict(speed=r.speed.model_copy(update=dict(
        interval=r.speed.interval.model_copy(update=dict(low=low, high=high))))))


def one(root: Path, record, text: str | bytes | None) -> Path:
    """`record` written under `root` with `text` as its verification file (None: none)."""
    path = write(record, root)
    if text is not None:
        m = marker_of(path)
        m.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def inflated_after_verification():
    """The issue's case: a sound verification of the 6.48x record, then the record edited to 40x [2, 45]."""
    true, claimed = kd(30), kd(30, 40.0, 2.0, 45.0)
    return claimed, verification_of(true)


def verified_then_forged_flags():
    """A re-run that does not support the record (6.48x measured, 40x claimed), with every flag set to pass."""
    claimed = kd(31, 40.0, 2.0, 45.0)
    data = json.loads(verification_of(claimed, rerun_of(claimed, speedup=6.48, sci=0.034)))
    data["verified"] = True
    data["speed"]["ok"] = True
    for c in data["checks"]:
        c["ok"] = True
    return claimed, json.dumps(data)


def of_another_record():
    other = kd(99)
    return kd(32), verification_of(other)


def deep():
    return kd(33), "[" * 200_000 + "]" * 200_000


BROKEN = {  # what: (record, verification text, words in the rejection)
    "empty file": (lambda: (kd(20), ""), "not JSON"),
    "empty object": (lambda: (kd(21), "{}\n"), "schema: expected 'bench.verification/2'"),
    "garbage bytes": (lambda: (kd(22), b"\x00\xff\xfe<script>"), "not JSON"),
    "a JSON list": (lambda: (kd(23), "[]"), "not an object"),
    "the old format": (lambda: (kd(24), json.dumps({"schema": "bench.verification/1", "verified": True})),
                       "reproduce it again"),
    "checks that failed": (lambda: (kd(25), verification_of(kd(25), rerun_of(kd(25), speedup=3.0, sci=0.03))),
                           "its own checks failed: speedup"),
    "NaN in a figure": (lambda: (kd(26), verification_of(kd(26)).replace('"ratio": 1.0', '"ratio": NaN')),
                        "NaN is not a JSON number"),
    "record inflated after verification": (inflated_after_verification,
                                           "the record does not match its re-run: speedup"),
    "flags forged to pass": (verified_then_forged_flags, "the record does not match its re-run: speedup"),
    "a verification of another record": (of_another_record, "verifies another record"),
    "nested 200,000 deep": (deep, "nested too deeply"),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_verification_is_a_named_rejection_and_never_verifies(tmp_path: Path, what: str):
    make, words = BROKEN[what]
    record, text = make()
    root = tmp_path / "results"
    path = one(root, record, text)
    loaded = load_tree(root)
    (r, rel, verified), = loaded.results
    assert verified is False, what  # the file exists, and proves nothing
    assert rel not in loaded.verified_files
    (bad,) = loaded.invalid
    assert bad.path == marker_of(path) and words in "; ".join(bad.problems), (what, bad.problems)
    assert f"not shown as verifying {rel}" in bad.problems[0]


def test_the_built_site_shows_only_the_sound_verification(tmp_path: Path):
    root = tmp_path / "results"
    sound = one(root, kd(1), verification_of(kd(1)))
    forced = one(root, kd(2), verification_of(kd(2), forced=True))
    for make, _ in BROKEN.values():
        record, text = make()
        one(root, record, text)
    loaded = load_tree(root)
    assert {rel for _, rel, v in loaded.results if v} == {sound.relative_to(root).as_posix()}
    frel = forced.relative_to(root).as_posix()
    assert "--force" in loaded.unverified[frel][0] and "numpy" in " ".join(loaded.unverified[frel])
    assert all(str(e.path) != str(marker_of(forced)) for e in loaded.invalid)  # forced is honest, not broken
    assert len(loaded.invalid) == len(BROKEN)

    report = build_site(root, tmp_path / "site")
    assert len(report.invalid) == len(BROKEN)
    page = (tmp_path / "site" / "tasks" / "digits.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="lb-data">(.*?)</script>', page, re.S).group(1))
    shown = {r["file"]: r["verified"] for r in data["rows"]}
    assert shown.pop(sound.relative_to(root).as_posix()) is True and not any(shown.values())
    published = sorted(p.name for p in (tmp_path / "site" / "results").rglob("*.verified.json"))
    assert published == [marker_of(sound).name]  # no broken or forced file is published as a verification
    run_page = (tmp_path / "site" / "runs" / frel).with_suffix(".html").read_text()
    assert "verification-forced" in run_page and "verification-verified" not in run_page

    res = runner.invoke(app, ["leaderboard", "build", "--results", str(root), "--out", str(tmp_path / "s2")])
    assert res.exit_code == 0, res.output
    assert "verifies another record" in " ".join(res.output.split())
    with pytest.raises(BuildError, match="verified.json"):
        build_site(root, tmp_path / "s3", strict=True)


def test_a_named_pipe_beside_a_record_neither_hangs_nor_verifies(tmp_path: Path):
    root = tmp_path / "results"
    path = one(root, kd(40), None)
    os.mkfifo(marker_of(path))
    state, reasons = D.verification_status(marker_of(path), kd(40), path.name)
    assert state == "rejected" and "not a regular file" in reasons[0]
    (_, _, verified), = load_tree(root).results
    assert verified is False


def test_a_forced_verification_is_not_verified(tmp_path: Path):
    root = tmp_path / "results"
    path = one(root, kd(41), verification_of(kd(41), forced=True))
    state, reasons = D.verification_status(marker_of(path), kd(41), path.name)
    assert state == "forced" and "past version differences" in reasons[0]
    loaded = load_tree(root)
    assert [v for _, _, v in loaded.results] == [False] and loaded.invalid == []


def test_a_record_re_timed_since_its_verification_is_no_longer_verified(tmp_path: Path):
    """The verification judged 6.48x; the record now says 4.0x (re-timed, or edited): the stored re-run no
    longer supports it, so the site stops calling it verified."""
    root = tmp_path / "results"
    path = one(root, kd(42), verification_of(kd(42)))
    assert [v for _, _, v in load_tree(root).results] == [True]
    write(kd(42, 4.0, 3.9, 4.1), root)
    loaded = load_tree(root)
    assert [v for _, _, v in loaded.results] == [False]
    assert "speedup" in loaded.invalid[0].problems[0] and loaded.invalid[0].path == marker_of(path)


# --- forced and warned verifications on the run page ------------------------------------------------------------

WARNING = "package transformers: record 5.23.0, here 5.25.0 (not imported by the task or the method)"


def built_run_page(tmp_path: Path, record, text: str) -> tuple[str, D.Loaded]:
    root = tmp_path / "results"
    path = one(root, record, text)
    build_site(root, tmp_path / "site")
    page = (tmp_path / "site" / "runs" / path.relative_to(root)).with_suffix(".html").read_text()
    return " ".join(page.split()), load_tree(root)


def test_a_forced_verification_is_shown_as_forced_with_its_differences(tmp_path: Path):
    page, loaded = built_run_page(tmp_path, kd(50), verification_of(kd(50), forced=True, warnings=[WARNING]))
    (_, rel, verified), = loaded.results
    state, details = loaded.verification[rel]
    assert verified is False and state == "forced"
    assert details[1:] == ["package numpy: record 2.3.0, here 2.4.0", WARNING]
    assert '<span class="warn verification-forced">forced</span>' in page
    assert "Verification: <span class=\"warn\">forced</span>" in page and "Reproduced with --force past version differences" in page
    assert "<code>package numpy: record 2.3.0, here 2.4.0</code>" in page and f"<code>{WARNING}</code>" in page
    assert "verification-verified" not in page and "<td><code>forced</code></td>" in page  # the Run section
    (row,) = D.rows_of(loaded)
    assert row["verification"] == "forced" and row["verified"] is False


def test_a_verification_with_warnings_is_verified_and_lists_them(tmp_path: Path):
    page, loaded = built_run_page(tmp_path, kd(51), verification_of(kd(51), warnings=[WARNING]))
    (_, rel, verified), = loaded.results
    assert verified is True and loaded.verification[rel] == ("verified", [WARNING])
    assert '<span class="ok verification-verified">verified</span>' in page
    assert "past these differences, which do not refuse a reproduction" in page and f"<code>{WARNING}</code>" in page
    (row,) = D.rows_of(loaded)
    assert row["verification"] == "verified" and row["verified"] is True


def test_without_a_verification_the_run_page_says_unverified(tmp_path: Path):
    page, loaded = built_run_page(tmp_path, kd(52), None)
    (_, rel, verified), = loaded.results
    assert loaded.verification[rel] == ("none", []) and '<span class="muted verification-none">unverified</span>' in page
    (row,) = D.rows_of(loaded)
    assert row["verification"] == "none"
