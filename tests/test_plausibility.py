"""Speed figures that cannot be right: a noise floor that excludes 1.0, a speedup beyond its compute ideal, an
unreliable verdict. `bench validate` warns (exit 0); `bench check` refuses them in new records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent / "leaderboard"))
from lb_synth import make_result, write  # noqa: E402

from bench.cli import app  # noqa: E402
from bench.plausibility import problems  # noqa: E402
from bench.result import Compute  # noqa: E402

cli = CliRunner()


def with_macs(r, ref: float, met: float):
    return r.model_copy(update={"compute": Compute(unit="MACs", reference=ref, method=met)})


def test_a_plausible_record_has_no_problem():
    assert problems(with_macs(make_result(speedup=2.0, sci=0.05), 4e6, 1e6)) == []
    assert problems(make_result(method="none", hp={}, speedup=1.01, sci=0.03)) == []


def test_the_noise_floor_must_contain_one():
    (p,) = problems(make_result(method="none", hp={}, speedup=0.87, sci=0.05))
    assert "timed against itself" in p and "0.870x" in p


def test_a_speedup_beyond_its_mac_ideal():
    r = with_macs(make_result(speedup=1.81, sci=0.02), 1.61e6, 1e6)  # the deepcache record's shape
    (p,) = problems(r)
    assert "exceeds its MACs ideal of 1.610x" in p
    assert problems(with_macs(make_result(speedup=1.65, sci=0.05), 1.61e6, 1e6)) == []  # inside its interval
    assert problems(with_macs(make_result(speedup=3.0, sci=0.01), 1e6, 2e6)) == []  # more MACs: no ideal


def test_a_registered_explanation_exempts_the_method(monkeypatch):
    import dataclasses

    from bench import registry

    spec = registry.get_method_spec("kd")
    monkeypatch.setitem(registry.METHODS._entries, "kd",
                        dataclasses.replace(spec, beyond_compute="memory traffic the MAC count does not see"))
    assert problems(with_macs(make_result(speedup=1.81, sci=0.02), 1.61e6, 1e6)) == []


def test_an_unreliable_verdict_is_a_problem():
    (p,) = problems(make_result(speed_status="unreliable"))
    assert p.startswith("speed is unreliable: contended")


def test_validate_warns_and_check_refuses(tmp_path):
    root = tmp_path / "results"
    write(make_result(method="none", hp={}, speedup=0.87, sci=0.05), root)
    res = cli.invoke(app, ["validate", str(root)], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "timed against itself" in res.output and "1 speed warnings" in res.output
    res = cli.invoke(app, ["check", "--results-dir", str(root), "--no-smoke", "--strict"], env={"COLUMNS": "250"})
    assert res.exit_code == 1 and "timed against itself" in res.output
