from __future__ import annotations

import json

import pytest

from bench.result import SCHEMA_FILE, Result, json_schema
from bench.store import InvalidResult, load_result, write_result


def test_json_schema_file_in_sync_with_model():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), "run `bench schema --write`"


def test_round_trip(kd_digits_run):
    r = kd_digits_run.result
    again = Result.model_validate_json(r.to_json())
    assert again == r and again.to_json() == r.to_json()


def test_record_has_design_fields(kd_digits_run):
    d = json.loads(kd_digits_run.path.read_text())
    assert d["schema"] == "bench.result/1" and d["status"] == "ok"
    for key in ("run_id", "created_at", "task", "method", "profile", "seed", "quality", "fidelity", "speed",
                "memory", "size", "compute", "cost", "provenance"):
        assert key in d
    assert set(d["provenance"]) >= {"bench_version", "git_sha", "git_dirty", "command", "config_hash",
                                    "packages", "platform"}
    assert d["task"]["reference_canonical"] is True
    assert "torch" in d["provenance"]["packages"]


def _mutate(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("mutation, field", [
    (lambda d: d["quality"].pop("metric"), "quality.metric"),
    (lambda d: d["speed"].__setitem__("speedup", -1), "speed.speedup"),
    (lambda d: d.__setitem__("status", "great"), "status"),
    (lambda d: d["method"].__setitem__("family", "magic"), "method.family"),
    (lambda d: d.__setitem__("surprise", 1), "surprise"),
    (lambda d: d["method"].__setitem__("name", "../../etc"), "method.name"),
    (lambda d: d.pop("quality"), "quality"),
])
def test_invalid_records_name_the_field(kd_digits_run, tmp_path, mutation, field):
    p = tmp_path / "r.json"
    p.write_text(kd_digits_run.path.read_text())
    _mutate(p, mutation)
    with pytest.raises(InvalidResult) as e:
        load_result(p)
    assert any(field in problem for problem in e.value.problems), e.value.problems


@pytest.mark.parametrize("mutation, words", [
    (lambda d: d["quality"].__setitem__("value", 0.1), "delta"),  # value changed, delta not
    (lambda d: d["speed"].__setitem__("speedup", 1000.0), "outside its interval"),
    (lambda d: d["method"]["hyperparameters"].__setitem__("alpha", 0.1), "config_hash"),
    (lambda d: d["size"]["method"].__setitem__("nonzero_parameters", 10**9), "nonzero_parameters"),
])
def test_invariants(kd_digits_run, tmp_path, mutation, words):
    p = tmp_path / "r.json"
    p.write_text(kd_digits_run.path.read_text())
    _mutate(p, mutation)
    with pytest.raises(InvalidResult, match=words):
        load_result(p)


def test_file_in_wrong_place_is_reported(kd_digits_run, tmp_path):
    r = kd_digits_run.result
    wrong = tmp_path / "cpu" / "digits" / "magnitude" / f"{r.run_id}.json"
    wrong.parent.mkdir(parents=True)
    wrong.write_text(r.to_json())
    with pytest.raises(InvalidResult, match="its fields place it at"):
        load_result(wrong, results_root=tmp_path)
    assert load_result(write_result(r, tmp_path), results_root=tmp_path) == r


def test_the_recorded_command_leaves_out_the_results_folder():
    from bench.provenance import portable_command

    assert portable_command(["/usr/bin/bench", "run", "--method", "kd", "--results-dir", "/tmp/x", "--task",
                             "digits"]) == ["bench", "run", "--method", "kd", "--task", "digits"]
    assert portable_command(["bench", "run", "--results-dir=/home/me/r", "--seed", "1"]) == \
        ["bench", "run", "--seed", "1"]


# ---- finite numbers only, no local folders (issue 18, cases 3 and 4) -------------------------------------------

def _committed() -> dict:
    from pathlib import Path

    return json.loads(sorted((Path(__file__).resolve().parents[1] / "results" / "cpu" / "digits" / "kd")
                             .glob("*.json"))[0].read_text())


def _set(d: dict, dotted: str, value) -> dict:
    *head, last = dotted.split(".")
    for k in head:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[last] = value


@pytest.mark.parametrize("field", ["speed.speedup", "speed.interval.low", "speed.interval.high", "cost.seconds",
                                   "fidelity.value", "quality.value", "quality.delta_interval.high",
                                   "speed.reference.median_s", "speed.attempts.0.speedup", "compute.method",
                                   "profile.detected.load_average_1m"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_the_model_refuses_non_finite_numbers_naming_the_field(field, value):
    """A record built in Python (the runner) cannot hold NaN or an infinity either: it fails naming the field."""
    from pydantic import ValidationError

    d = _committed()
    _set(d, field, value)
    with pytest.raises(ValidationError, match="finite number") as e:
        Result.model_validate(d)
    assert any(".".join(map(str, err["loc"])) == field for err in e.value.errors()), e.value.errors()


def test_hyperparameters_and_method_stats_are_finite_too():
    from pydantic import ValidationError

    d = _committed()
    d["method"]["hyperparameters"]["schedule"] = {"steps": [1.0, float("nan")]}
    with pytest.raises(ValidationError, match=r"schedule.steps\[1\] is not a finite number"):
        Result.model_validate(d)
    d = _committed()
    d["method_stats"] = {"acceptance_rate": float("inf")}
    with pytest.raises(ValidationError, match="method_stats.acceptance_rate"):
        Result.model_validate(d)
    assert Result.model_validate(_committed()).to_json().count("NaN") == 0


@pytest.mark.parametrize("command, bad", [
    ("bench run --method kd --task digits --results-dir /tmp/x", "/tmp/x"),
    ("bench remeasure /home/me/results/cpu/digits/kd/r.json", "/home/me/results/cpu/digits/kd/r.json"),
    ("bench run --method kd --task digits --set data=~/cifar", "data=~/cifar"),  # the home folder is local too
    ("bench run --method kd --task digits --cache=/var/cache/bench", "--cache=/var/cache/bench"),
    ("bench run --method kd --task digits --set structure=2:4", None),
    ("bench remeasure results/cpu/digits/kd/r.json", None),
    ("/usr/local/bin/pytest -q tests/test_result.py", None),  # the program is the writer's to name
])
def test_commands_with_absolute_paths_are_invariant_errors(command, bad):
    from bench.result import absolute_paths, invariant_errors

    assert absolute_paths(command) == ([bad] if bad else [])
    d = _committed()
    d["provenance"]["command"] = command
    problems = invariant_errors(Result.model_validate(d))
    assert any("provenance.command holds the absolute path" in p for p in problems) == bool(bad), problems


def test_a_remeasured_command_with_an_absolute_path_is_an_invariant_error():
    from bench.result import invariant_errors

    d = _committed()
    d["speed"]["remeasured"] = {"at": "2026-01-01T00:00:00+00:00", "bench_version": "0", "git_sha": None,
                                "git_dirty": None, "command": "bench remeasure /root/work/results/x.json"}
    assert any(p.startswith("speed.remeasured.command holds the absolute path '/root/work/results/x.json'")
               for p in invariant_errors(Result.model_validate(d)))
