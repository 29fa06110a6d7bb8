"""Every quantization method end to end through the runner on the full tasks `gsm8k` and `glue-*`, offline:
fixture files in the real formats (train splits included, for calibration) and tiny random models, reusing the
task tests' fixture writers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.registry import METHODS, get_method_spec, get_task_spec, supports
from bench.runner import run
from bench.store import load_result

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers

import full_fixtures  # noqa: E402

QUANTIZATION = [n for n in METHODS.names() if METHODS.get(n).family == "quantization"]
FULL = ["gsm8k", "glue-sst2", "glue-mnli"]
CASES = [(t, m) for t in FULL for m in QUANTIZATION if supports(get_method_spec(m), get_task_spec(t))]


@pytest.fixture(scope="module")
def full_env(tmp_path_factory):
    with full_fixtures.full_task_env(tmp_path_factory.mktemp("full"), separate_draft=False) as root:
        yield root


def test_every_quantization_method_runs_on_a_full_task():
    assert {"int8-dynamic", "weight-only"} <= set(QUANTIZATION)
    assert {m for _, m in CASES} == set(QUANTIZATION)  # none is left without a full task to run on


@pytest.mark.parametrize("task,method", CASES)
def test_quantization_method_runs_end_to_end_on_a_full_task(full_env, results_root, task, method):
    # the fixtures' models are 32 wide: groups of 32 divide every layer (the methods' default 64 does not)
    spec = get_method_spec(method)
    overrides = {"group_size": "32"} if "group_size" in spec.cls.Config.__dataclass_fields__ else None
    r = load_result(run(task, method, budget="smoke", overrides=overrides, results_root=results_root).path,
                    results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.method.family == "quantization"
    z = r.size
    assert z.runtime_low_precision is not None and z.quantization is not None  # said in the record
    assert z.method.bytes == z.quantization.serialized_bytes < z.reference.bytes
    assert r.speed.speedup > 0 and r.compute.method > 0
