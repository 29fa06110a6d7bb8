"""Every distillation method end to end through the runner on the full tasks, offline: `gsm8k` for the LM
methods, `glue-sst2` and `glue-mnli` for the encoder methods, on fixture files in the real formats (train
splits included: the students train on them) and tiny random models, at the smoke budget (20 steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.registry import METHODS, get_method_spec, get_task_spec
from bench.runner import run
from bench.store import load_result

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers

import full_fixtures  # noqa: E402

LANGUAGE = {"causal-lm", "text-classification"}  # kd (images) has its own full task, cifar10
DISTILLATION = [n for n in METHODS.names()
                if METHODS.get(n).family == "distillation" and LANGUAGE & set(METHODS.get(n).modalities)]
FULL = ["gsm8k", "glue-sst2", "glue-mnli"]
CASES = [(t, m) for t in FULL for m in DISTILLATION if get_task_spec(t).modality in get_method_spec(m).modalities]
SHORT = {"max_new_tokens": "12", "batch_size": "2"}  # on-policy sampling from a random model runs to the limit
# a gsm8k run costs ~40 s of CPU, mostly lm-eval's 5-shot evaluations (reference, student, control): kd-lm keeps
# the task's path (train split, draft student, control, evaluation) in the default suite; the other LM methods'
# own mechanics have fast tests on a stand-in task, and their gsm8k runs are slow
FAST = {("gsm8k", "kd-lm")}
# the controls each method's record carries (the LM kit's plain fine-tuning of the student, unless listed)
CONTROLS = {"minitron": ["pruned_without_teacher", "student_same_tokens"], "ei-bert": ["plain_kd_same_student"]}
PARAMS = [pytest.param(t, m, marks=() if t != "gsm8k" or (t, m) in FAST else pytest.mark.slow) for t, m in CASES]


@pytest.fixture(scope="module")
def full_env(tmp_path_factory):
    with full_fixtures.full_task_env(tmp_path_factory.mktemp("full"), separate_draft=True) as root:
        yield root


def test_every_distillation_method_runs_on_a_full_task():
    assert {m for _, m in CASES} == set(DISTILLATION)
    lm_methods = {"kd-lm", "seqkd", "minillm", "gkd", "distillm", "minitron"}
    assert {m for t, m in CASES if t == "gsm8k"} == lm_methods
    assert {m for t, m in CASES if t.startswith("glue")} == {"distilbert", "tinybert", "minilm", "ei-bert"}


@pytest.mark.parametrize("task,method", PARAMS)
def test_distillation_method_runs_end_to_end_on_a_full_task(full_env, results_root, task, method):
    overrides = {k: v for k, v in SHORT.items() if k in get_method_spec(method).cls.Config.__dataclass_fields__}
    r = load_result(run(task, method, budget="smoke", overrides=overrides, results_root=results_root).path,
                    results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.method.family == "distillation"
    assert 0 < r.cost.steps <= 40 and r.cost.seconds > 0  # tinybert's and minilm's two stages: 20 steps each
    assert [c.name for c in r.controls] == CONTROLS.get(method, ["student_without_teacher"])
    assert all(c.gain_interval is not None for c in r.controls)  # method minus control, paired over the examples
    assert r.size.method.parameters < r.size.reference.parameters  # a smaller student
    if task == "gsm8k":
        assert r.cost.tokens_seen > 0
