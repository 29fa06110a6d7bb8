"""Every pruning method end to end through the runner on the full tasks `gsm8k` and `glue-*`, offline: fixture
files in the real formats (train splits included, for calibration) and tiny random models, reusing the task
tests' fixture writers. Methods whose modality a task lacks are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.registry import METHODS, RegistryError, check_supports, get_method_spec, get_task_spec
from bench.runner import run
from bench.store import load_result

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers

import full_fixtures  # noqa: E402

LANGUAGE = {"causal-lm", "text-classification"}  # the image-generation ones run on coco in their own tests
PRUNING = [n for n in METHODS.names()
           if METHODS.get(n).family == "pruning" and LANGUAGE & set(METHODS.get(n).modalities)]
FULL = ["gsm8k", "glue-sst2", "glue-mnli"]
CASES = [(t, m) for t in FULL for m in PRUNING if get_task_spec(t).modality in get_method_spec(m).modalities]
STRUCTURAL = {"layer-drop", "head-prune"}


@pytest.fixture(scope="module")
def full_env(tmp_path_factory):
    with full_fixtures.full_task_env(tmp_path_factory.mktemp("full"), separate_draft=False) as root:
        yield root


def test_every_pruning_method_runs_on_a_full_task():
    assert {m for _, m in CASES} == set(PRUNING)  # none is left without a full task to run on
    assert ("gsm8k", "head-prune") not in CASES  # head-prune is for encoders only


@pytest.mark.parametrize("task,method", CASES)
def test_pruning_method_runs_end_to_end_on_a_full_task(full_env, results_root, task, method):
    overrides = {"layers": "1"} if method == "layer-drop" else None
    r = load_result(run(task, method, budget="smoke", overrides=overrides, results_root=results_root).path,
                    results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.method.family == "pruning"
    assert r.size.runtime_exploits_sparsity is False  # dense kernels here; said in the record, not hidden
    if method in STRUCTURAL:
        assert r.size.method.parameters < r.size.reference.parameters  # removed, not zeroed
        assert r.compute.method < r.compute.reference
    else:
        assert r.size.method.parameters == r.size.reference.parameters
        assert r.method_stats["sparsity_of_pruned_layers"] == pytest.approx(0.5, abs=0.01)
        assert r.size.method.nonzero_parameters < r.size.reference.nonzero_parameters
    assert r.cost.seconds > 0 and r.speed.speedup > 0


def test_a_method_without_the_tasks_modality_is_refused_by_name():
    with pytest.raises(RegistryError, match="text-classification"):
        check_supports(get_method_spec("head-prune"), get_task_spec("gsm8k"))
