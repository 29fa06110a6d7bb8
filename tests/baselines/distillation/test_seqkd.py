"""`seqkd`: the teacher's batched, left-padded greedy solutions equal its one-by-one greedy decoding, and the
student is fine-tuned on exactly those solutions (cached with the seconds they took)."""

from __future__ import annotations

import pytest
import torch

from baselines.distillation import _lm
from baselines.distillation.seqkd import SeqKD, SeqKDConfig, teacher_solutions
from bench.config import ConfigError, apply_overrides
from tasks._kit import lm


def prompt_ids(task):
    return task.tokenizer([lm.prompt_of(r["question"]) for r in task.train], add_special_tokens=False)["input_ids"]


def test_batched_solutions_are_the_teachers_greedy_decoding(lm_task, teacher_subject, ctx):
    prompts = prompt_ids(lm_task)
    got = teacher_solutions(teacher_subject, lm_task, ctx, prompts, max_new_tokens=10)
    for p, sol in zip(prompts, got):
        with torch.inference_mode():
            one = lm.generate_ids(teacher_subject, torch.tensor([p]), 10)
        assert sol == lm.completion_tokens(one, len(p), lm_task.tokenizer.eos_token_id)
        assert 0 < len(sol) <= 10


def test_the_student_is_fine_tuned_on_the_teachers_solutions(lm_task, teacher_subject, ctx, monkeypatch):
    cfg = SeqKDConfig(steps=3, batch_size=2, warmup_steps=1, max_new_tokens=8)
    seen = {}
    real_train = _lm.train

    def spy(task, ctx_, cfg_, examples, description, **kw):
        seen.setdefault("examples", examples)
        return real_train(task, ctx_, cfg_, examples, description, **kw)

    monkeypatch.setattr(_lm, "train", spy)
    applied = SeqKD(cfg).apply(teacher_subject, lm_task, ctx)
    examples = seen["examples"]
    assert len(examples) == 6  # steps * batch_size prompts, each once
    prompts = {tuple(p) for p in prompt_ids(lm_task)}
    for ids, labels in examples:
        n = labels.count(-100)
        assert tuple(ids[:n]) in prompts and labels[n:] == ids[n:]
        with torch.inference_mode():
            greedy = lm.generate_ids(teacher_subject, torch.tensor([ids[:n]]), 8)
        assert ids[n:] == lm.completion_tokens(greedy, n, lm_task.tokenizer.eos_token_id)
    assert applied.cost.steps == 3 and applied.stats()["teacher_prompts"] == 6
    again = SeqKD(cfg).apply(teacher_subject, lm_task, ctx)  # the solutions come from the cache, and so does
    assert again.stats()["teacher_seconds"] == applied.stats()["teacher_seconds"]  # their cost


@pytest.mark.parametrize("bad", [{"max_new_tokens": "0"}, {"batch_size": "0"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(SeqKDConfig(), bad)
