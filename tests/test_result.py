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
