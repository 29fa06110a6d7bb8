"""`assisted`: transformers' assisted generation with the task's draft gives the target's greedy output, and its
forward-call statistics add up."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError
from bench.registry import create_method
from decoding_models import DraftTask, greedy
from tasks.base import Subject


@pytest.mark.parametrize("which", ["noisy-copy", "unrelated"])
@pytest.mark.parametrize("overrides", [{}, {"num_assistant_tokens": "4", "assistant_confidence_threshold": "0"}])
def test_greedy_reproduces_the_target_token_for_token(target, drafts, prompts, tokenizer, ctx, which, overrides):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    applied = create_method("assisted", overrides).apply(Subject(target, "causal-lm", {"tokenizer": tokenizer}),
                                                         DraftTask(drafts[which]), ctx)
    gen = applied.subject.extra["generate"]
    emitted = 0
    for ids in prompts:
        with torch.inference_mode():
            out = gen(applied.subject, ids, 40, torch.ones_like(ids))
        new = out[0, ids.shape[1]:].tolist()
        new = new[:new.index(eos) + 1] if eos in new else new
        assert new == greedy(target, ids, 40, eos, pad)
        emitted += len(new)
    s = applied.stats()
    assert s["generated_tokens"] == emitted
    assert 0 < s["target_forward_passes"] <= emitted and s["drafted_tokens"] > 0
    assert 0 <= s["acceptance_rate"] < 1 and s["mean_accepted_length"] >= 1
    if which == "noisy-copy":
        assert s["target_forward_passes"] < emitted  # drafts were accepted
    if overrides:  # confidence stopping off: every round drafts 4 tokens (fewer only at the length limit)
        assert s["drafted_tokens"] >= 3.5 * s["target_forward_passes"] - 4 * len(prompts), s


def test_hooks_do_not_outlive_the_call(target, drafts, prompts, tokenizer, ctx):
    """The reference shares the target model: counting must not leave hooks on it."""
    applied = create_method("assisted").apply(Subject(target, "causal-lm", {"tokenizer": tokenizer}),
                                              DraftTask(drafts["noisy-copy"]), ctx)
    with torch.inference_mode():
        applied.subject.extra["generate"](applied.subject, prompts[0], 5, None)
    assert not target._forward_hooks and not drafts["noisy-copy"]._forward_hooks


@pytest.mark.parametrize("key,value", [("num_assistant_tokens", "0"), ("assistant_confidence_threshold", "1.5"),
                                       ("num_assistant_tokens_schedule", "sometimes")])
def test_invalid_config_is_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        create_method("assisted", {key: value})


@pytest.mark.slow
def test_end_to_end_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "assisted", budget="smoke", results_root=results_root).result
    assert r.status == "ok" and r.fidelity.value == 1.0
    assert r.method_stats["target_forward_passes"] > 0 and r.method_stats["mean_accepted_length"] >= 1
