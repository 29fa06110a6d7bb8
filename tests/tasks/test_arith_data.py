"""The `arith` generator: deterministic, GSM8K's format, arithmetic that checks out, disjoint splits."""

from __future__ import annotations

import collections
import random
import re
from fractions import Fraction

import pytest

from tasks import arith_data
from tasks.arith_data import ANNOTATION, FAMILIES, final_answer, fingerprint, generate



@pytest.fixture(scope="module")
def splits():
    return generate()


def _eval(expr: str) -> Fraction:
    """Evaluate `a op b` (the only form the annotations take) exactly."""
    m = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr)
    assert m, expr
    a, op, b = Fraction(int(m.group(1))), m.group(2), Fraction(int(m.group(3)))
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def check_problem(p: dict) -> int:
    """Assert one problem is well formed and its steps compute its answer; return the number of steps."""
    assert set(p) == {"question", "answer"}
    q, a = p["question"], p["answer"]
    assert q.endswith("?") and "\n" not in q and "  " not in q
    lines = a.split("\n")
    last = lines[-1]
    assert re.fullmatch(r"#### \d+", last), last
    assert final_answer(a) == last[5:]
    results = []
    for line in lines[:-1]:
        (m,) = ANNOTATION.finditer(line)  # exactly one calculator annotation per step
        expr, r = m.group(1), m.group(2)
        value = _eval(expr)
        assert value.denominator == 1 and value >= 0 and value == int(r), line
        # the text before the annotation states the same operation: "a x b = <<a*b=r>>r"
        shown = expr.replace("*", " x ").replace("+", " + ").replace("-", " - ").replace("/", " / ")
        assert f" {shown} = <<{expr}={r}>>{r}" in line, line
        results.append(int(r))
    assert 1 <= len(results) <= 3
    assert int(last[5:]) == results[-1]  # the answer is what the last step computes
    return len(results)


def test_splits_have_the_documented_sizes_and_are_disjoint(splits):
    train, test = splits
    assert len(train) == arith_data.TRAIN_SIZE == 20_000 and len(test) == arith_data.TEST_SIZE == 500
    train_q = {p["question"] for p in train}
    test_q = {p["question"] for p in test}
    assert len(train_q) == len(train) and len(test_q) == len(test)  # no duplicates within a split
    assert not train_q & test_q


def test_generation_is_deterministic(splits):
    again = generate()
    assert again == splits
    assert generate(seed=1)[1] != splits[1]
    small = generate(seed=0, n_test=5, n_train=7)
    assert small[1] == splits[1][:5]  # the same stream: a smaller split is a prefix


def test_fingerprints_are_pinned(splits):
    train, test = splits
    """The published splits: a change to the generator must bump GENERATOR_VERSION and these."""
    assert fingerprint(test) == "f316672b6c4d61f599114a8aefd697fb2885616af8a432b39cf579407d45fdd0"
    assert fingerprint(train) == "e183cb3e6c2183cf64664a86c415f366bbb296f39400f32dc499383e4d960189"


def test_every_problem_is_in_gsm8k_format_and_its_steps_compute_its_answer(splits):
    train, test = splits
    counts = collections.Counter(check_problem(p) for p in test + train)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 0.25 * len(test + train)


def test_variety_of_families_names_and_objects(splits):
    train, test = splits
    text = " ".join(p["question"] for p in test)
    assert sum(name in text for name, _ in arith_data.NAMES) >= 35
    assert sum(obj in text for obj in arith_data.OBJECTS) >= 25
    leads = collections.Counter(p["answer"].split(" ")[0] for p in test)
    assert len(leads) >= 20
    for fn, counts in FAMILIES.values():  # every family makes each of its operation counts, well formed
        rng = random.Random(1)
        for n_ops in counts:
            for _ in range(50):
                q, lines, value = fn(rng, n_ops)
                check_problem({"question": q, "answer": arith_data._answer(lines, value)})


def test_numbers_stay_small(splits):
    train, test = splits
    values = [int(final_answer(p["answer"])) for p in train + test]
    assert max(values) < 300 and min(values) >= 0
    for p in test:
        for m in ANNOTATION.finditer(p["answer"]):
            a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", m.group(1)).groups()
            assert int(m.group(2)) < 300
            if op == "*":
                assert min(int(a), int(b)) <= 4 or max(int(a), int(b)) <= 12


def test_final_answer():
    assert final_answer("x = <<1+2=3>>3\n#### 3") == "3"
    assert final_answer("#### 1,234") == "1234"
    assert final_answer("no answer") is None


def test_drills_are_correct_deterministic_and_disjoint_from_the_problem_stream():
    from tasks.arith_data import drills

    lines = drills(50)
    assert lines == drills(50) and len(lines) == 50
    for line in lines:
        steps = list(ANNOTATION.finditer(line))
        assert len(steps) == 10
        for m in steps:
            assert eval(m.group(1).replace("/", "//")) == int(m.group(2))  # noqa: S307 - digits and + - * / only
