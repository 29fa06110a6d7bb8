from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bench.cli import app

runner = CliRunner()


@pytest.mark.parametrize("what, words", [("tasks", "digits"), ("methods", "magnitude"), ("profiles", "h100-bf16")])
def test_list(what, words):
    r = runner.invoke(app, ["list", what])
    assert r.exit_code == 0 and words in r.output


def test_list_methods_groups_by_family_with_paper_and_year():
    r = runner.invoke(app, ["list", "methods"], env={"COLUMNS": "250"})
    lines = [line for line in r.output.splitlines() if "│" in line]
    families = [line.split("│")[1].strip() for line in lines]
    order = [f for f in families if f]
    assert order == sorted(order, key=["distillation", "caching", "pruning", "decoding", "quantization", "none"].index)
    assert "Hinton" in r.output and "2015" in r.output


def test_list_is_fast_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench", "list", "methods"],
                         capture_output=True, text=True, check=True)
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}


def test_run_then_show_then_validate(tmp_path):
    r = runner.invoke(app, ["run", "--method", "magnitude", "--task", "digits", "--set", "sparsity=0.7",
                            "--seed", "1", "--budget", "smoke", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (path,) = tmp_path.rglob("*.json")
    assert path.parent == tmp_path / "cpu" / "digits" / "magnitude"
    record = json.loads(path.read_text())
    assert record["method"]["hyperparameters"]["sparsity"] == 0.7 and record["seed"] == 1
    assert "speedup" in r.output and str(path.name) in "".join(r.output.split())  # rich wraps and pads it
    shown = runner.invoke(app, ["show", str(path)])
    assert shown.exit_code == 0 and "top1_accuracy" in shown.output
    assert runner.invoke(app, ["validate", str(tmp_path)]).exit_code == 0


def test_validate_lists_every_bad_file_and_exits_1(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"schema": "bench.result/1", "status": "ok"}))
    r = runner.invoke(app, ["validate", str(tmp_path)])
    assert r.exit_code == 1
    assert "a.json" in r.output and "b.json" in r.output and "0 valid, 2 invalid" in r.output


@pytest.mark.parametrize("args, words", [
    (["run", "-m", "magnitud", "-t", "digits"], "Did you mean 'magnitude'"),
    (["run", "-m", "kd", "-t", "digits", "--set", "T=2"], "valid keys: temperature"),
    (["run", "-m", "kd", "-t", "digits", "--set", "alpha"], "key=value"),
    (["run", "-m", "kd", "-t", "digits", "--profile", "h100"], "Did you mean 'h100-bf16'"),
    (["run", "-m", "kd", "-t", "digits", "--budget", "huge"], "full, smoke"),
])
def test_run_errors_are_clear_and_write_nothing(tmp_path, args, words):
    r = runner.invoke(app, args + ["--results-dir", str(tmp_path / "results")])
    assert r.exit_code == 2 and words in " ".join(r.output.split())
    assert not (tmp_path / "results").exists()


def test_schema_check_passes():
    assert runner.invoke(app, ["schema", "--check"]).exit_code == 0
