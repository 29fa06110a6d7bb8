"""The evaluation batch (issue 26, point 4): a per-modality `[eval_batch_size]` in the profiles, separate from the
timed `[batch_size]`, carried by `RunContext.eval_batch_size`; evaluation results do not depend on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.profiles import Profile, load_profile, profile_names, validate_tables
from bench.progress import Reporter
from bench.registry import RegistryError
from tasks.base import RunContext

GPU_PROFILES = ("a100-bf16", "h100-bf16", "h200-bf16", "l4-fp16")


def test_a_profile_without_the_table_evaluates_at_its_timing_batch():
    data = load_profile("cpu").model_dump()
    data["eval_batch_size"] = {}
    p = Profile.model_validate(data)
    assert all(p.eval_batch_for(m) == p.batch_for(m) for m in p.batch_size)
    with pytest.raises(RegistryError, match="sets no batch size for modality 'audio'"):
        p.eval_batch_for("audio")


def test_cpu_profiles_keep_their_evaluation_batches():
    """What the CPU profiles evaluated at before the table: the timing batch, and digits-gen's 100 images."""
    for name in ("cpu", "cpu-bf16"):
        p = load_profile(name)
        assert {m: p.eval_batch_for(m) for m in p.batch_size} == {
            "image-classification": 64, "text-classification": 32, "causal-lm": 1, "image-generation": 100,
            "diffusion-lm": 1, "vision-language": 1}


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_evaluate_in_larger_batches(name):
    p = load_profile(name)
    for m in ("image-classification", "text-classification", "image-generation"):
        assert p.eval_batch_for(m) > p.batch_for(m), (name, m)
    # a method's own decoding runs one sequence at a time; a batched bf16 reference would round differently
    assert p.eval_batch_for("causal-lm") == 1


def test_bad_tables_are_refused():
    data = load_profile("cpu").model_dump()
    for table, bad, msg in (("eval_batch_size", {"audio": 4}, r"unknown modality \['audio'\] in \[eval_batch_size\]"),
                            ("eval_batch_size", {"causal-lm": 0}, r"at least 1"),
                            ("batch_size", {**data["batch_size"], "video": 2}, r"unknown modality \['video'\]")):
        p = Profile.model_validate({**data, table: bad})
        with pytest.raises(RegistryError, match=msg):
            validate_tables(p)
    for name in profile_names():
        validate_tables(load_profile(name))


def test_run_context_defaults_the_evaluation_batch_to_the_timing_batch():
    p = load_profile("cpu")
    assert RunContext(profile=p, seed=0, progress=Reporter(), batch_size=5).eval_batch_size == 5
    assert RunContext(profile=p, seed=0, progress=Reporter(), batch_size=5, eval_batch_size=9).eval_batch_size == 9


def _ctx(eval_batch_size: int, budget: str = "full") -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=64, budget=budget,
                      eval_batch_size=eval_batch_size)


def test_a_classifiers_evaluation_is_the_same_at_any_evaluation_batch():
    from tasks.digits import Digits

    torch.set_num_threads(1)
    task = Digits()
    task.load(_ctx(64))
    subject = task.subject_from_state(task.reference_weights(_ctx(64)).state, _ctx(64))
    a, b = task.evaluate(subject, _ctx(7)), task.evaluate(subject, _ctx(1000))
    assert a.value == b.value
    np.testing.assert_array_equal(a.per_example, b.per_example)
    np.testing.assert_array_equal(a.outputs, b.outputs)


def test_a_samplers_evaluation_is_the_same_at_any_evaluation_batch(monkeypatch):
    """digits-gen samples its evaluation images at the evaluation batch (the noise is drawn for the whole set
    first): the images, and so FID, do not depend on it."""
    from tasks._kit import diffusion
    from tasks.digits_gen import DigitsGen

    torch.set_num_threads(1)
    task = DigitsGen()
    task.load(_ctx(100, "smoke"))
    subject = task.subject_from_state(task.reference_weights(_ctx(100, "smoke")).state, _ctx(100, "smoke"))
    sizes = []

    original = diffusion.generate

    def spy(subj, noise, labels, batch_size):
        sizes.append(batch_size)
        return original(subj, noise, labels, batch_size)

    monkeypatch.setattr(diffusion, "generate", spy)
    a, _ = task.generate(subject, _ctx(7, "smoke"))
    b, _ = task.generate(subject, _ctx(100, "smoke"))
    assert sizes == [7, 100]
    assert torch.equal(a, b)
