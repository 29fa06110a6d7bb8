"""The contract between tasks and methods (bench/api.py): a method reads a task only through the capabilities
the task declares, and the registry refuses a pair that does not fit before any work starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import api
from bench.registry import METHODS, TASKS, RegistryError, check_supports, missing_capabilities, supports

ROOT = Path(__file__).resolve().parents[1]


def task_modules() -> set[str]:
    """The modules under tasks/ that register a task (as opposed to shared machinery)."""
    return {s.cls.__module__.split(".")[-1] for s in TASKS}


def test_no_method_names_a_task_probes_it_or_imports_its_module():
    names = {s.name for s in TASKS}
    mods = task_modules()
    bad = []
    for f in sorted((ROOT / "baselines").rglob("*.py")):
        text = f.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
            if re.search(r"spec\.name\s*(==|!=|in\b)", code) or re.search(r"\bname\s*(==|in)\s*PUBLISHED", code):
                bad.append(where)
            if re.search(r"hasattr\(\s*task\b", code) or re.search(r"getattr\(\s*task\s*,", code):
                bad.append(where)
            m = re.search(r"(?:from|import)\s+tasks\.(\w+)", code)
            if m and m.group(1) in mods:
                bad.append(where)
            if re.search(r"from tasks import (\w+)", code) and re.search(r"from tasks import (\w+)", code).group(1) in mods:
                bad.append(where)
            for name in names:
                if re.search(rf"""["']{re.escape(name)}["']""", code) and "description" not in code:
                    bad.append(where)
    assert not bad, "methods must read tasks through bench.api capabilities:\n" + "\n".join(bad)


def test_every_task_of_a_kind_offers_the_same_capabilities():
    """An embedded task and the full task of its kind declare the same capabilities, so every method that runs
    on one runs on the other through the same path."""
    caps = {s.name: {c for c in api.CAPABILITIES if api.offers(s.cls, c)} for s in TASKS}
    pairs = [("arith", "gsm8k"), ("arith-nli", "glue-sst2"), ("arith-nli", "glue-mnli"), ("digits", "cifar10"),
             ("arith-dllm", "gsm8k-dllm"), ("digits-vlm", "textvqa")]
    for a, b in pairs:
        if a in caps and b in caps:
            assert caps[a] == caps[b], (a, sorted(c.__name__ for c in caps[a]), b, sorted(c.__name__ for c in caps[b]))


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_a_method_runs_where_the_registry_says_and_is_refused_elsewhere(method):
    m = next(s for s in METHODS if s.name == method)
    for t in TASKS:
        if supports(m, t):
            check_supports(m, t)
        else:
            with pytest.raises(RegistryError) as e:
                check_supports(m, t)
            from bench.registry import requirement_name

            if t.modality in m.modalities:  # else refused for its modality, before any capability
                for req in missing_capabilities(m, t):
                    assert requirement_name(req) in str(e.value)


def test_the_refusal_names_the_capability_and_the_tasks_that_have_it():
    from bench.registry import MethodSpec, TaskSpec

    class Bare:
        pass

    m = MethodSpec("needs-draft", "decoding", "p", None, ("causal-lm",), "s", requires=(api.Draft,))
    t = TaskSpec("bare", "causal-lm", "embedded", "exact_match", True, "s", cls=Bare)
    with pytest.raises(RegistryError, match=r"needs Draft .*arith"):
        check_supports(m, t)


def test_require_names_what_is_missing():
    class Bare:
        pass

    with pytest.raises(api.CapabilityMissing, match="does not offer TrainingRows"):
        api.require(Bare(), api.TrainingRows)


def test_budget_caps_steps_and_compares_as_a_string():
    assert api.Budget("smoke") == "smoke" and api.Budget.FULL == "full"
    assert api.Budget.SMOKE.steps(500) == api.SMOKE_STEPS and api.Budget.FULL.steps(500) == 500
    assert api.Budget.SMOKE.steps(3) == 3  # a cap, never a floor
    assert api.Budget.FULL.pick(1000, 8) == 1000 and api.Budget.SMOKE.pick(1000, 8) == 8
    from bench.profiles import load_profile
    from bench.progress import Reporter

    ctx = api.RunContext(load_profile("cpu"), 0, Reporter(), budget="smoke")
    assert ctx.budget is api.Budget.SMOKE


def test_no_bare_budget_string_is_compared_in_tasks_or_methods():
    """The budget is asked (`ctx.budget.smoke`, `.steps(n)`, `.pick(full, smoke)`), never compared with a bare
    string: one place decides what smoke means."""
    bad = []
    for folder in ("tasks", "baselines"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"budget\s*[!=]=\s*[\"'](smoke|full)[\"']", line.split("#", 1)[0]):
                    bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_the_contract_types_are_one_set():
    import baselines.base as b
    import tasks.base as t

    assert t.RunContext is api.RunContext and t.Subject is api.Subject and t.Evaluation is api.Evaluation
    assert b.Applied is api.Applied and b.Cost is api.Cost and b.ControlResult is api.ControlResult
