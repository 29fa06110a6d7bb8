"""`kd-lm`: the loss against a direct computation, and alpha = 0 reproducing plain fine-tuning bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.distillation import _lm
from baselines.distillation.kd_lm import KDLM, KDLMConfig, kd_lm_loss
from bench.config import ConfigError, apply_overrides
from tasks._kit import lm


def test_loss_equals_a_direct_computation_on_hand_made_distributions():
    # one sequence of 4 tokens over a vocabulary of 3; the first two are the prompt (no loss), so the loss is on
    # the predictions made at positions 1 and 2 (of tokens 2 and 3)
    s = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [5.0, 5.0, 5.0]]])
    t = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, -2.0], [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 2, 1]])
    T, alpha = 2.0, 0.3

    def sm(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    kl, ce = 0.0, 0.0
    for pos, target in ((1, 2), (2, 1)):
        p, q = sm(t[0, pos].tolist()), sm(s[0, pos].tolist())
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
        z = s[0, pos].tolist()
        ce += (math.log(sum(math.exp(v) for v in z)) - z[target]) / 2
    want = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_lm_loss(s, t, labels, T, alpha).item() == pytest.approx(want, rel=1e-6)
    assert kd_lm_loss(s, s, labels, T, 1.0).item() == pytest.approx(0.0, abs=1e-7)  # student = teacher


def test_alpha_zero_is_plain_fine_tuning_bit_for_bit(lm_task, teacher_subject, ctx):
    """kd-lm with alpha = 0 trains the student to exactly the weights of plain fine-tuning (the control's loop)
    after the same steps with the same seed, although the teacher runs at every step."""
    cfg = KDLMConfig(alpha=0.0, temperature=2.0, steps=6, batch_size=2, warmup_steps=2)
    applied = KDLM(cfg).apply(teacher_subject, lm_task, ctx)
    plain, stats = _lm.train(lm_task, ctx, cfg, _lm.ground_truth_examples(lm_task), description="plain")
    got, want = applied.subject.model.state_dict(), plain.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert applied.cost.steps == 6 == stats.steps and applied.cost.tokens_seen == stats.tokens_seen > 0
    assert [c.name for c in applied.controls] == ["student_without_teacher"]
    # and the teacher does change the weights once it has a weight
    distilled = KDLM(KDLMConfig(alpha=0.5, steps=6, batch_size=2, warmup_steps=2)).apply(teacher_subject, lm_task, ctx)
    assert not torch.equal(distilled.subject.model.lm_head.weight, want["lm_head.weight"])


def test_the_control_is_cached_and_shared(lm_task, teacher_subject, ctx):
    cfg = KDLMConfig(steps=3, batch_size=2, warmup_steps=1)
    examples = _lm.ground_truth_examples(lm_task)
    first = _lm.control(lm_task, ctx, cfg, examples)
    again = _lm.control(lm_task, ctx, KDLMConfig(alpha=0.9, temperature=3.0, steps=3, batch_size=2,
                                                  warmup_steps=1), examples)
    assert first.value == again.value and first.cost_seconds == again.cost_seconds  # read back, not retrained


def test_the_student_starts_from_the_draft_or_from_scratch(lm_task, ctx):
    draft = _lm.initial_student(lm_task, ctx, "draft")
    assert torch.equal(draft.lm_head.weight, lm_task.draft_subject(ctx).model.lm_head.weight)
    fresh = _lm.initial_student(lm_task, ctx, "scratch")
    assert torch.equal(fresh.lm_head.weight, lm_task.build_student().lm_head.weight)
    assert not torch.equal(fresh.lm_head.weight, draft.lm_head.weight)


def test_every_step_is_a_step_and_the_smoke_budget_caps_it():
    cfg = KDLMConfig(steps=37, batch_size=5)
    r = cfg.recipe(101)  # 21 batches an epoch
    per_epoch = math.ceil(101 / 5)
    assert max(1, round(r.epochs * per_epoch)) == 37
    assert cfg.effective_steps(type("C", (), {"budget": "smoke"})()) == lm.SMOKE_STEPS


@pytest.mark.parametrize("bad", [{"alpha": "1.5"}, {"temperature": "0"}, {"steps": "0"}, {"init": "teacher"},
                                 {"lr": "-1"}])
def test_config_ranges_and_choices(bad):
    with pytest.raises(ConfigError):
        apply_overrides(KDLMConfig(), bad)
