"""`gkd`: TRL's generalised JSD against direct computations (its beta end points are the forward and the reverse
KL, with the paper's P = teacher, Q = student), and TRL's GKDTrainer running offline on tiny local models."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.distillation.gkd import GKD, GKDConfig, collator, generalized_jsd
from bench.config import ConfigError, apply_overrides

# two positions over a vocabulary of 3, as logits; the teacher is sharper
STUDENT = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 1.0, 0.0]]])
TEACHER = torch.tensor([[[2.0, 0.0, -1.0], [-1.0, 0.5, 1.5]]])


def probs(z):
    return torch.softmax(z, dim=-1)[0].tolist()


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def jsd(p, q, beta):
    """The paper's eq. 1: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q."""
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def mean_over_positions(f):
    pt, ps = probs(TEACHER), probs(STUDENT)
    return sum(f(a, b) for a, b in zip(pt, ps)) / len(pt)


def test_beta_zero_is_the_forward_kl_of_teacher_from_student():
    got = generalized_jsd(STUDENT, TEACHER, beta=0.0).item()
    assert got == pytest.approx(mean_over_positions(lambda p, q: kl(p, q)), rel=1e-6)


def test_beta_one_is_the_reverse_kl_of_student_from_teacher():
    got = generalized_jsd(STUDENT, TEACHER, beta=1.0).item()
    assert got == pytest.approx(mean_over_positions(lambda p, q: kl(q, p)), rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_interior_beta_is_the_papers_generalised_jsd(beta):
    got = generalized_jsd(STUDENT, TEACHER, beta=beta).item()
    assert got == pytest.approx(mean_over_positions(lambda p, q: jsd(p, q, beta)), rel=1e-5)


def test_the_normalised_limits_approach_the_end_points():
    """JSD(beta)/beta -> KL(P || Q) as beta -> 0 and JSD(beta)/(1 - beta) -> KL(Q || P) as beta -> 1 (paper)."""
    eps = 1e-4
    fwd = mean_over_positions(lambda p, q: kl(p, q))
    rev = mean_over_positions(lambda p, q: kl(q, p))
    assert generalized_jsd(STUDENT.double(), TEACHER.double(), beta=eps).item() / eps == pytest.approx(fwd, rel=1e-3)
    assert generalized_jsd(STUDENT.double(), TEACHER.double(), beta=1 - eps).item() / eps == \
        pytest.approx(rev, rel=1e-3)


def test_labels_mask_positions():
    labels = torch.tensor([[-100, 7]])
    got = generalized_jsd(STUDENT, TEACHER, beta=0.0, labels=labels).item()
    assert got == pytest.approx(kl(probs(TEACHER)[1], probs(STUDENT)[1]), rel=1e-6)


def test_collator_right_pads_sequences_and_left_pads_prompts():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "prompt_len": 2},
            {"input_ids": [1, 2, 3], "labels": [-100, -100, 3], "prompt_len": 2},
            {"input_ids": [9, 3], "labels": [-100, 3], "prompt_len": 1}]
    b = collator(0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 0], [9, 3, 0, 0]]
    assert b["labels"][2].tolist() == [-100, 3, -100, -100] and b["attention_mask"][1].tolist() == [1, 1, 1, 0]
    assert b["prompts"].tolist() == [[5, 6], [1, 2], [0, 9]]
    assert b["prompt_attention_mask"].tolist() == [[1, 1], [1, 1], [0, 1]]


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_trl_gkd_trainer_runs_offline_on_local_models(lm_task, teacher_subject, ctx, lmbda):
    cfg = GKDConfig(steps=3, batch_size=2, warmup_steps=1, lmbda=lmbda, max_new_tokens=6)
    before = lm_task.draft_subject(ctx).model.lm_head.weight.clone()
    applied = GKD(cfg).apply(teacher_subject, lm_task, ctx)
    assert applied.cost.steps == 3 and applied.cost.samples_seen == 6 and applied.cost.tokens_seen > 0
    assert not torch.equal(applied.subject.model.lm_head.weight, before)
    assert applied.controls[0].name == "student_without_teacher"
    assert all(p.requires_grad for p in teacher_subject.model.parameters())  # a copy was frozen, not the subject


@pytest.mark.parametrize("bad", [{"lmbda": "1.5"}, {"beta": "-0.1"}, {"temperature": "0"}, {"max_new_tokens": "0"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(GKDConfig(), bad)
