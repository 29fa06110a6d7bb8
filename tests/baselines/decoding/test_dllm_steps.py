"""dllm-steps: the diffusion LM's sampler with fewer steps. Its step count resolved from `steps` or `fraction`
(validation messages name the valid values), the reference reproduced at the reference's own steps, the network
calls and tokens per step counted, and bench run's path at smoke budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.decoding.dllm_steps import DLLMSteps, DLLMStepsConfig, resolve_steps
from bench.config import ConfigError
from tasks._kit import dllm

MASK = 19
SAMPLING = dllm.Sampling(gen_length=16, steps=16, block_length=8)


def tiny_subject(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.base import Subject

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    return Subject(model, "diffusion-lm", {"sampling": SAMPLING, "mask_id": MASK, "generate": dllm.generate_hook()})


def sample(subject, prompt):
    with torch.no_grad():
        return subject.extra["generate"](subject, prompt, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps=0 must be >= 1"),
    (dict(fraction=0.0), r"fraction=0.0 must be in \(0, 1\]"),
    (dict(fraction=1.5), r"fraction=1.5 must be in \(0, 1\]"),
])
def test_bad_settings_are_refused_with_the_valid_range(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DLLMStepsConfig(**kwargs).validate()


def test_steps_resolve_to_a_multiple_of_the_blocks():
    assert resolve_steps(SAMPLING, DLLMStepsConfig()) == 8  # half of 16, 4 per block
    assert resolve_steps(SAMPLING, DLLMStepsConfig(fraction=0.3)) == 4  # 4.8 steps: 2.4 per block, rounded to 2
    assert resolve_steps(SAMPLING, DLLMStepsConfig(fraction=0.01)) == 2  # at least one per block
    assert resolve_steps(SAMPLING, DLLMStepsConfig(steps=4)) == 4
    with pytest.raises(ConfigError, match="multiple of the sampler's 2 blocks between 2 and gen_length=16"):
        resolve_steps(SAMPLING, DLLMStepsConfig(steps=5))
    with pytest.raises(ConfigError, match="valid: 2, 4, 6"):
        resolve_steps(SAMPLING, DLLMStepsConfig(steps=18))


def test_the_reference_steps_reproduce_the_reference_and_fewer_steps_unmask_more_per_call():
    subject = tiny_subject()
    prompt = torch.randint(0, MASK, (1, 5))
    ref = sample(subject, prompt)
    same = DLLMSteps(DLLMStepsConfig(steps=16)).apply(subject, None, None)
    assert torch.equal(sample(same.subject, prompt), ref)
    fewer = DLLMSteps(DLLMStepsConfig()).apply(subject, None, None)
    out = sample(fewer.subject, prompt)
    assert not (out == MASK).any()
    for p in (prompt, torch.randint(0, MASK, (1, 7))):
        sample(fewer.subject, p)
    stats = fewer.stats()
    assert stats["steps"] == 8 and stats["reference_steps"] == 16
    assert stats["sequences"] == 3 and stats["network_calls"] == 24 and stats["steps_per_sequence"] == 8
    assert stats["tokens_unmasked_per_step"] == 2.0  # 16 positions over 8 calls
    assert stats["tokens_recomputed_per_step"] == pytest.approx((2 * 21 + 23) * 8 / 24)  # every position, every call
    assert stats["cache_hit_share"] == 0.0
    assert subject.extra["sampling"] is SAMPLING  # the reference subject is untouched


def test_an_observer_already_on_the_subject_still_sees_every_step():
    seen = []
    subject = tiny_subject()
    subject = dataclasses.replace(subject, extra={**subject.extra, "observe": lambda s: seen.append(s["index"])})
    applied = DLLMSteps(DLLMStepsConfig(steps=4)).apply(subject, None, None)
    sample(applied.subject, torch.randint(0, MASK, (1, 5)))
    assert seen == [0, 1, 0, 1]


@pytest.mark.slow  # trains the smoke reference and evaluates through lm-eval: minutes on a loaded machine
def test_end_to_end_smoke_run(results_root):
    from bench.runner import run

    r = run("arith-dllm", "dllm-steps", budget="smoke", results_root=results_root).result
    assert r.status == "ok", r.error
    stats = r.method_stats
    assert stats["steps"] == 8 and stats["reference_steps"] == 16  # smoke: 16 positions
    assert stats["steps_per_sequence"] <= 8 and stats["tokens_unmasked_per_step"] >= 2
    assert r.method.hyperparameters["fraction"] == 0.5
