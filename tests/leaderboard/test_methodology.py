"""The methodology page: generated from the profiles, the task registry and the schema; says what has no results."""

from __future__ import annotations

from pathlib import Path

from bench.profiles import profile_names
from bench.registry import TASKS
from leaderboard import methodology
from leaderboard.build import build_site


def test_every_top_level_field_of_the_record_is_explained():
    schema = methodology._schema()
    assert set(methodology.FIELDS) == set(schema["properties"]), \
        "explain each new top-level field of the record in leaderboard/methodology.py FIELDS"
    fields = {f["name"]: f for f in methodology.record_fields()}
    assert {s["name"] for s in fields["speed"]["sub"]} >= {"speedup", "interval", "status", "reasons"}
    assert all(f["text"] for f in fields.values())


def test_methodology_page_lists_profiles_tasks_and_what_has_no_results(results_tree: Path, tmp_path: Path):
    site = build_site(results_tree, tmp_path / "site").out
    page = (site / "methodology.html").read_text()
    for name in profile_names():  # every profile, with its hardware, whether or not it has results
        assert f'id="profile-{name}"' in page
    assert "bench run --method none --task cifar10 --profile a100-bf16" in page  # a100 has no result here
    for spec in TASKS:
        assert f'id="task-{spec.name}"' in page
    assert "bench run --method none --task gsm8k --profile h100-bf16" in page  # a full task with no results
    assert 'href="tasks/digits.html"' in page and 'href="tasks/gsm8k.html"' not in page
    assert "±3% target" in page  # the cpu profile's precision, from its TOML
    assert "Results up to 2025-01-01" in page  # the latest record's date, not the build's: builds stay identical
    assert "bench reproduce results/cpu/digits/" in page
    for doc in ("docs/CONTRIBUTING.md.txt", "docs/CITATION.cff.txt"):
        assert f'href="{doc}"' in page and (site / doc).is_file()
    home = (site / "index.html").read_text()
    assert 'id="not-run"' in home and "gsm8k" in home and 'href="methodology.html"' in home
    # the equal-quality view: families x tasks within each task's budget
    assert 'class="plain families"' in home and "≤ 1% of the reference" in home


def test_the_repository_link_is_given_or_said_missing(results_tree: Path, tmp_path: Path):
    import pytest

    from leaderboard.build import BuildError

    site = build_site(results_tree, tmp_path / "a", repo_url="https://example.org/bench").out
    assert '<a href="https://example.org/bench">Repository</a>' in (site / "methodology.html").read_text()
    with pytest.raises(BuildError, match="https://"):
        build_site(results_tree, tmp_path / "b", repo_url="javascript:alert(1)")
