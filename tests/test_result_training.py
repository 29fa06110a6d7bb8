"""The result record's optional `training` block (a method that accelerates training, e.g. dataset distillation):
old records stay valid without it, its ratios are computed by the runner and checked as invariants, its version is
checked, and the terminal report shows it."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from bench.api import TrainingComparison
from bench.report import summary_table
from bench.result import Result, invariant_errors
from bench.runner import training_record
from bench.store import InvalidResult, load_result

sys.path.insert(0, str(Path(__file__).parent))  # for hostile_trees, under --import-mode=importlib too

from hostile_trees import RECORD, record  # noqa: E402  (a committed kd record on digits)

COMPARISON = TrainingComparison(rows=100, seconds=2.0, steps=200, samples_seen=10_000, full_rows=1348,
                                full_seconds=16.0, full_steps=880, full_samples_seen=53_920,
                                full_source="measured in this run", preparation_seconds=6.0,
                                description="the reference architecture on 10 synthetic images per class")


def with_training(block) -> dict:
    d = record()
    d["training"] = json.loads(block.model_dump_json()) if block is not None else None
    return d


def test_a_record_without_the_block_is_still_valid():
    d = record()
    assert "training" not in d  # committed before the block existed
    r = load_result(RECORD)
    assert r.training is None
    assert "training" in json.loads(r.to_json())  # written as null by the current writer, and read back
    assert Result.model_validate_json(r.to_json()) == r


def test_the_runner_computes_the_ratios_once():
    t = training_record(COMPARISON)
    assert t.version == 1
    assert t.time_ratio == pytest.approx(2.0 / 16.0)
    assert t.samples_ratio == pytest.approx(10_000 / 53_920)
    assert t.time_ratio_with_preparation == pytest.approx(8.0 / 16.0)
    assert training_record(None) is None


def test_a_record_with_the_block_validates_round_trips_and_reports(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(with_training(training_record(COMPARISON))))
    r = load_result(p)
    assert r.training.rows == 100 and r.training.full_rows == 1348
    assert Result.model_validate_json(r.to_json()) == r and invariant_errors(r) == []
    out = io.StringIO()
    Console(file=out, width=250).print(summary_table(r))
    text = out.getvalue()
    assert "training the architecture" in text and "0.125x" in text and "0.185x" in text
    assert "16.0 s on 1,348 rows" in text and "2.0 s on 100 rows" in text


@pytest.mark.parametrize("field,value", [("time_ratio", 0.5), ("samples_ratio", 0.9),
                                         ("time_ratio_with_preparation", 0.125)])
def test_ratios_that_do_not_match_their_figures_are_refused(tmp_path, field, value):
    d = with_training(training_record(COMPARISON))
    d["training"][field] = value
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    with pytest.raises(InvalidResult) as e:
        load_result(p)
    assert any(f"training.{field}" in problem for problem in e.value.problems), e.value.problems


@pytest.mark.parametrize("mutate,field", [
    (lambda t: t.__setitem__("version", 2), "training.version"),
    (lambda t: t.__setitem__("full_seconds", 0.0), "training.full_seconds"),
    (lambda t: t.__setitem__("seconds", -1.0), "training.seconds"),
    (lambda t: t.pop("full_source"), "training.full_source"),
    (lambda t: t.__setitem__("speedup", 8.0), "training.speedup"),
])
def test_an_unknown_version_or_a_bad_figure_names_the_field(tmp_path, mutate, field):
    d = with_training(training_record(COMPARISON))
    mutate(d["training"])
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    with pytest.raises(InvalidResult) as e:
        load_result(p)
    assert any(field in problem for problem in e.value.problems), e.value.problems
