"""`prompt-lookup`: transformers' prompt lookup decoding gives the target's greedy output, with fewer target
passes than tokens when the continuation repeats the text."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError
from bench.registry import create_method
from decoding_models import greedy
from tasks.base import Subject


@pytest.mark.parametrize("overrides", [{}, {"prompt_lookup_num_tokens": "3", "max_matching_ngram_size": "1"}])
def test_greedy_reproduces_the_target_token_for_token(target, prompts, tokenizer, ctx, overrides):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    applied = create_method("prompt-lookup", overrides).apply(
        Subject(target, "causal-lm", {"tokenizer": tokenizer}), None, ctx)
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
    assert s["generated_tokens"] == emitted and 0 < s["target_forward_passes"] <= emitted
    assert s["mean_accepted_length"] == pytest.approx(emitted / s["target_forward_passes"])


def test_a_repeating_continuation_is_looked_up(target, tokenizer, ctx):
    """A random model falls into loops; once the loop's tokens are in the text, lookups verify several per pass."""
    applied = create_method("prompt-lookup").apply(Subject(target, "causal-lm", {"tokenizer": tokenizer}), None, ctx)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]])
    with torch.inference_mode():
        out = applied.subject.extra["generate"](applied.subject, ids, 60, None)
    assert out[0, ids.shape[1]:].tolist() == greedy(target, ids, 60, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert applied.stats()["mean_accepted_length"] > 1


@pytest.mark.parametrize("key,value", [("prompt_lookup_num_tokens", "0"), ("max_matching_ngram_size", "0")])
def test_invalid_config_is_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        create_method("prompt-lookup", {key: value})


@pytest.mark.slow
def test_end_to_end_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "prompt-lookup", budget="smoke", results_root=results_root).result
    assert r.status == "ok" and r.fidelity.value == 1.0
    assert r.method_stats["target_forward_passes"] > 0 and r.method_stats["mean_accepted_length"] >= 1
