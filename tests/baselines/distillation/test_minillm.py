"""`minillm`: the single-step reverse KL, the length-normalised future reward, the importance weights and the
gradient of the surrogate loss against direct computations; the teacher-mixed sampler against a recomputation
without KV caches."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.distillation import _lm
from baselines.distillation.minillm import MiniLLM, MiniLLMConfig, future_mean, minillm_loss
from bench.config import ConfigError, apply_overrides

# one response of 3 tokens (the last one padding) over a vocabulary of 3
S = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
T = torch.tensor([[[2.0, 0.0, -1.0], [-1.0, 0.5, 1.5], [0.0, 0.0, 0.0]]])
TOKENS = torch.tensor([[0, 2, 1]])
MASK = torch.tensor([[True, True, False]])


def sm(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_future_mean_is_the_mean_of_the_later_real_rewards():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 5.0, 7.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert future_mean(r, mask).flatten().tolist() == pytest.approx([14 / 3, 6, 8, 0, 6, 7, 0, 0], rel=1e-6)


def test_loss_value_and_gradient_equal_the_papers_estimator():
    alpha = 0.2
    z = S.clone().requires_grad_(True)
    loss, kl_mean = minillm_loss(z, T, TOKENS, MASK, alpha)
    q = [sm(S[0, t].tolist()) for t in range(2)]
    p = [sm(T[0, t].tolist()) for t in range(2)]
    y = TOKENS[0].tolist()
    rev_kl = [sum(qi * math.log(qi / pi) for qi, pi in zip(q[t], p[t])) for t in range(2)]
    r = [math.log(p[t][y[t]] / q[t][y[t]]) for t in range(2)]
    w = [q[t][y[t]] / (alpha * p[t][y[t]] + (1 - alpha) * q[t][y[t]]) for t in range(2)]
    future = [r[1], 0.0]  # R^Norm_{t+1}: the mean of the later rewards; none after the last real token
    want = sum(w[t] * (rev_kl[t] - future[t] * math.log(q[t][y[t]])) for t in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert kl_mean == pytest.approx(sum(rev_kl) / 2, rel=1e-5)
    loss.backward()
    for t in range(2):  # d/dz [KL(q||p)] = q (log q - log p - KL);  d/dz log q(y) = onehot(y) - q
        d_kl = [qi * (math.log(qi) - math.log(pi) - rev_kl[t]) for qi, pi in zip(q[t], p[t])]
        d_logq = [(1.0 if v == y[t] else 0.0) - qi for v, qi in enumerate(q[t])]
        want_grad = [w[t] * (a - future[t] * b) / 2 for a, b in zip(d_kl, d_logq)]
        assert z.grad[0, t].tolist() == pytest.approx(want_grad, rel=1e-4, abs=1e-7)
    assert z.grad[0, 2].abs().max() == 0  # padding carries no gradient


def test_without_teacher_mixing_the_weights_are_one_and_student_equal_to_teacher_gives_zero_kl():
    loss, kl_mean = minillm_loss(T.clone(), T, TOKENS, MASK, 0.0)
    assert kl_mean == pytest.approx(0.0, abs=1e-7) and loss.item() == pytest.approx(0.0, abs=1e-7)  # r = 0


def next_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=_lm.positions(mask)).logits[:, -1].float()


@pytest.mark.parametrize("mix", [0.0, 0.4])
def test_sampler_draws_from_the_mixture_it_would_recompute_without_caches(lm_task, ctx, mix):
    """Replaying the sampled prefixes through full forward passes (no KV cache) gives the same mixture at every
    step, so the same generator draws the same tokens; left padding and EOS handling included."""
    student, teacher = lm_task.draft_subject(ctx).model, lm_task.reference().eval()
    tok = lm_task.tokenizer
    prompts = [tok("Question: a b c\nAnswer:", add_special_tokens=False)["input_ids"],
               tok("Question: Tom has 3 boxes\nAnswer:", add_special_tokens=False)["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        seq, s_mask, c_mask = _lm.sample(student, teacher, ids, mask, 12, tok.eos_token_id, tok.pad_token_id,
                                         torch.Generator().manual_seed(3), mix)
        gen = torch.Generator().manual_seed(3)
        for step in range(seq.shape[1] - width):
            prefix, pmask = seq[:, :width + step], s_mask[:, :width + step]
            q = torch.softmax(next_logits(student, prefix, pmask), -1)
            if mix:
                q = mix * torch.softmax(next_logits(teacher, prefix, pmask), -1) + (1 - mix) * q
            drawn = torch.multinomial(q, 1, generator=gen).squeeze(1)
            live = c_mask[:, step]
            assert torch.equal(seq[live, width + step], drawn[live])
    for r in range(2):  # real tokens run up to and including the first EOS, then padding
        comp = seq[r, width:].tolist()
        n = int(c_mask[r].sum())
        assert c_mask[r, :n].all() and not c_mask[r, n:].any()
        assert tok.eos_token_id not in comp[:n - 1]
        assert comp[n - 1] == tok.eos_token_id or n == 12


def test_prompts_of_a_training_batch_are_left_padded():
    ids = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 4, 9]])
    out, mask = _lm.left_padded_prompts(ids, labels, 0)
    assert out.tolist() == [[0, 5, 6], [1, 2, 3]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_minillm_trains_the_student_on_its_rollouts(lm_task, teacher_subject, ctx):
    cfg = MiniLLMConfig(steps=2, batch_size=2, warmup_steps=1, max_new_tokens=6)
    before = lm_task.draft_subject(ctx).model.lm_head.weight.clone()
    applied = MiniLLM(cfg).apply(teacher_subject, lm_task, ctx)
    assert applied.cost.steps == 2 and applied.cost.tokens_seen > 0
    assert not torch.equal(applied.subject.model.lm_head.weight, before)
    stats = applied.stats()
    assert 0 < stats["mean_rollout_length"] <= 6 and stats["mean_rollout_reverse_kl_per_token"] > 0


@pytest.mark.parametrize("bad", [{"teacher_mix": "1"}, {"teacher_mix": "-0.1"}, {"max_new_tokens": "0"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(MiniLLMConfig(), bad)
