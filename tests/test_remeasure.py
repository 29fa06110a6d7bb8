"""`bench remeasure`: a record is re-timed from its configuration and only its `speed` changes; a record whose
model, reference or versions are not what this checkout rebuilds is refused and left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.store import load_result

cli = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    from bench.runner import run

    root = tmp_path_factory.mktemp("made") / "results"
    return run("digits", "magnitude", overrides={"sparsity": 0.5}, budget="smoke", results_root=root).path


def copy(src: Path, dst: Path) -> Path:
    root = src.parents[3]
    shutil.copytree(root, dst / "results")
    return dst / "results" / src.relative_to(root)


def test_remeasure_rewrites_only_the_speed(made, tmp_path):
    path = copy(made, tmp_path)
    before = json.loads(path.read_text())
    res = cli.invoke(app, ["remeasure", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code in (0, 1), res.output  # 1 only if this busy test machine made the timing unreliable
    after = json.loads(path.read_text())
    assert {k for k in before if before[k] != after[k]} <= {"speed", "profile"}
    assert {k for k in before["profile"] if before["profile"][k] != after["profile"][k]} <= {
        "detected", "matched", "mismatches"}  # the machine of the timing; never the profile's settings
    s = load_result(path).speed
    assert s.remeasured is not None and s.remeasured.command.startswith("bench remeasure")
    assert s.remeasured.packages.get("torch") and s.attempts and s.precision is not None
    assert s.remeasured.original_machine.model_dump() == before["profile"]["detected"]  # the run's, kept
    assert after["profile"]["detected"]["cpu_count"] >= 1
    assert "re-timed" in res.output


def test_remeasure_pools_worker_processes(made, tmp_path):
    from bench.remeasure import remeasure

    path = copy(made, tmp_path)
    new = remeasure(path, processes=2, argv=["bench", "remeasure", "--processes", "2", "x.json"])
    assert new.speed.processes == 2
    assert new.speed.reference.n >= 8  # smoke: at least 4 pairs in each of the two workers


@pytest.mark.parametrize("change, says", [
    (lambda d: d["size"]["method"].update(parameters=d["size"]["method"]["parameters"] + 1), "parameters, non-zeros"),
    (lambda d: d["task"].update(reference_sha256="0" * 64), "reference weights"),
    (lambda d: d["speed"].update(unit="seconds per something else"), "timed workload differs"),
])
def test_a_record_that_is_not_what_this_checkout_rebuilds_is_refused(made, tmp_path, change, says):
    path = copy(made, tmp_path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    before = path.read_text()
    res = cli.invoke(app, ["remeasure", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "refused" in res.output and says in res.output.replace("\n", " ")
    assert path.read_text() == before


def test_another_method_version_is_refused(made, tmp_path):
    from bench.provenance import config_hash

    path = copy(made, tmp_path)
    d = json.loads(path.read_text())
    d["method"]["version"] = "0"
    d["provenance"]["config_hash"] = config_hash(d["task"]["name"], d["task"]["version"], d["method"]["name"], "0",
                                                 d["method"]["hyperparameters"], d["profile"]["name"], d["seed"],
                                                 d["provenance"]["bench_version"])
    path.write_text(json.dumps(d, indent=2))
    res = cli.invoke(app, ["remeasure", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "other versions" in res.output
