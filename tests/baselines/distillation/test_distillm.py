"""`distillm`: the skew KL and skew reverse KL against direct computations (values and gradients; alpha = 0 is
the forward and the reverse KL), the adaptive schedule of Algorithm 1 (phi follows the validation loss; fresh
samples, replay and data by u), the replay buffer's layout, training through `apply` on a stand-in task, the
settings' ranges, and whole smoke runs through the runner on arith and, offline, on gsm8k (slow)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from baselines.distillation import _lm
from baselines.distillation.distillm import (AdaptiveSchedule, DistiLLM, DistiLLMConfig, ReplayBuffer, pack,
                                             skew_divergence, validation_loss)
from bench.config import ConfigError, apply_overrides

# two response positions and a padding one, over a vocabulary of 3, as logits; the teacher is sharper
S = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 1.0, 0.0], [3.0, -2.0, 0.0]]])
T = torch.tensor([[[2.0, 0.0, -1.0], [-1.0, 0.5, 1.5], [0.0, 0.0, 0.0]]])
MASK = torch.tensor([[True, True, False]])


def sm(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def direct(alpha: float, divergence: str) -> float:
    """The paper's eqs., by hand: mean over the two real positions of KL(p || a p + (1 - a) q) (SKL) or
    KL(q || (1 - a) p + a q) (SRKL)."""
    out = []
    for t in range(2):
        p, q = sm(T[0, t].tolist()), sm(S[0, t].tolist())
        if divergence == "skl":
            out.append(kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)]))
        else:
            out.append(kl(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q)]))
    return sum(out) / 2


@pytest.mark.parametrize("divergence", ["skl", "srkl"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_loss_equals_the_papers_skew_divergences(divergence, alpha):
    got = skew_divergence(S, T, MASK, alpha, divergence).item()
    assert got == pytest.approx(direct(alpha, divergence), rel=1e-5, abs=1e-8)  # float32 logits


def test_skew_zero_is_the_forward_and_the_reverse_kl():
    p = [sm(T[0, t].tolist()) for t in range(2)]
    q = [sm(S[0, t].tolist()) for t in range(2)]
    assert skew_divergence(S, T, MASK, 0.0, "skl").item() == pytest.approx((kl(p[0], q[0]) + kl(p[1], q[1])) / 2,
                                                                           rel=1e-6)
    assert skew_divergence(S, T, MASK, 0.0, "srkl").item() == pytest.approx((kl(q[0], p[0]) + kl(q[1], p[1])) / 2,
                                                                            rel=1e-6)


def test_skew_shrinks_the_divergence_and_student_equal_to_teacher_gives_zero():
    for divergence in ("skl", "srkl"):
        values = [skew_divergence(S, T, MASK, a, divergence).item() for a in (0.0, 0.1, 0.5, 0.9)]
        assert all(a > b > 0 for a, b in zip(values, values[1:]))
        assert skew_divergence(T, T, MASK, 0.1, divergence).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("divergence", ["skl", "srkl"])
def test_gradient_flows_through_the_mixture_as_the_direct_formula_says(divergence):
    """Autograd of the module's loss equals autograd of the formula written out in probabilities (the student
    inside the mixture included), and padding gets no gradient."""
    alpha = 0.1
    z = S.clone().requires_grad_(True)
    skew_divergence(z, T, MASK, alpha, divergence).backward()
    w = S.clone().requires_grad_(True)
    q, p = torch.softmax(w, -1)[:, :2], torch.softmax(T, -1)[:, :2]
    if divergence == "skl":
        want = (p * (p.log() - (alpha * p + (1 - alpha) * q).log())).sum(-1).mean()
    else:
        want = (q * (q.log() - ((1 - alpha) * p + alpha * q).log())).sum(-1).mean()
    want.backward()
    assert torch.allclose(z.grad, w.grad, rtol=1e-5, atol=1e-7)
    assert z.grad[0, 2].abs().max() == 0


def test_sgo_probability_rises_with_the_validation_loss_as_algorithm_1_says():
    s = AdaptiveSchedule(init_prob=0.0, prob_step=0.1, loss_eps=0.1)
    assert not s.observe(2.0) and s.phi == 0.0  # the first loss is the reference L_prev
    assert not s.observe(1.5) and s.phi == 0.0  # falling: phi stays
    assert not s.observe(2.05) and s.phi == 0.0  # a rise below epsilon over L_prev (2.0) does not count
    assert s.observe(2.1) and s.phi == pytest.approx(0.1)  # >= L_prev + epsilon: phi + delta, L_prev <- 2.1
    assert not s.observe(2.15) and s.phi == pytest.approx(0.1)  # measured from the new L_prev
    assert s.observe(2.3) and s.phi == pytest.approx(0.2) and s.rises == 2
    for k in range(20):
        s.observe(3.0 + k)
    assert s.phi == 1.0  # capped


def test_choice_between_fresh_samples_replay_and_data():
    s = AdaptiveSchedule(init_prob=0.0, prob_step=0.1, loss_eps=0.1)
    assert {s.choose(u, 5, 10, 64, 64) for u in (0.0, 0.5, 0.99)} == {"data"}  # phi = 0: the ground truth only
    s.phi = 1.0
    assert {s.choose(u, 9, 10, 10, 64) for u in (0.0, 0.5, 0.99)} == {"generate"}  # the buffer fills first
    # full buffer, 3/4 through: fresh samples with probability phi (1 - t/T) = 0.25, replay up to phi
    assert [s.choose(u, 75, 100, 64, 64) for u in (0.1, 0.24, 0.26, 0.99)] == ["generate"] * 2 + ["replay"] * 2
    s.phi = 0.4
    assert [s.choose(u, 50, 100, 64, 64) for u in (0.19, 0.21, 0.39, 0.41)] == ["generate", "replay", "replay",
                                                                                  "data"]
    # the shares over many draws: 0.2 fresh, 0.2 replay, 0.6 data
    rng = random.Random(0)
    kinds = [s.choose(rng.random(), 50, 100, 64, 64) for _ in range(20000)]
    assert [kinds.count(k) / 20000 for k in ("generate", "replay", "data")] == pytest.approx([0.2, 0.2, 0.6],
                                                                                             abs=0.015)


def test_replay_buffer_gives_back_the_sampled_batch_and_forgets_the_oldest(lm_task, ctx):
    tok = lm_task.tokenizer
    student, teacher = lm_task.draft_subject(ctx).model, lm_task.reference().eval()
    prompts = [tok("Question: a b c\nAnswer:", add_special_tokens=False)["input_ids"],
               tok("Question: Tom has 3 boxes\nAnswer:", add_special_tokens=False)["input_ids"]]
    ids, mask = pack([(p, []) for p in prompts], tok.pad_token_id)[:2]
    with torch.no_grad():
        seq, s_mask, c_mask = _lm.sample(student, teacher, ids, mask, 9, tok.eos_token_id, tok.pad_token_id,
                                         torch.Generator().manual_seed(0))
    buf = ReplayBuffer(capacity=3)
    buf.add(seq, s_mask, c_mask)
    assert [p for p, _ in buf.items] == prompts and [len(c) for _, c in buf.items] == c_mask.sum(1).tolist()
    again = pack(list(buf.items), tok.pad_token_id)
    assert all(torch.equal(a, b) for a, b in zip(again, (seq, s_mask, c_mask)))
    buf.add(seq, s_mask, c_mask)
    assert len(buf) == 3 and buf.items[0][0] == prompts[1]  # first in, first out
    assert len(buf.sample(2, random.Random(0))) == 2


def test_validation_loss_is_the_answer_cross_entropy(lm_task, ctx):
    from tasks._kit import lm

    model = lm_task.draft_subject(ctx).model
    examples = _lm.ground_truth_examples(lm_task)
    ids, mask, labels = lm.collate(examples, list(range(len(examples))), lm_task.tokenizer.pad_token_id)
    with torch.no_grad():
        want = lm.completion_loss(model(input_ids=ids, attention_mask=mask).logits, labels).item()
    assert validation_loss(model, examples, lm_task.tokenizer.pad_token_id, "cpu", 2) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("divergence", ["skl", "srkl"])
def test_distillm_trains_on_fresh_and_replayed_samples(lm_task, teacher_subject, ctx, divergence):
    cfg = DistiLLMConfig(steps=6, batch_size=2, warmup_steps=1, max_new_tokens=6, init_prob=1.0, capacity=2,
                         val_every=2, divergence=divergence)
    before = lm_task.draft_subject(ctx).model.lm_head.weight.clone()
    applied = DistiLLM(cfg).apply(teacher_subject, lm_task, ctx)
    s = applied.stats()
    assert applied.cost.steps == 6 and applied.cost.tokens_seen > 0 and applied.cost.samples_seen > 0
    assert s["steps_on_data"] == 0 and s["steps_generated"] >= 1 and s["steps_replayed"] >= 1
    assert s["steps_generated"] + s["steps_replayed"] == 6 and s["validation_checks"] == 3
    assert s["final_sgo_probability"] == 1.0 and s["mean_skew_divergence"] > 0
    assert not torch.equal(applied.subject.model.lm_head.weight, before)
    assert applied.controls[0].name == "student_without_teacher"
    assert all(p.requires_grad for p in teacher_subject.model.parameters())  # a copy was frozen, not the subject


def test_at_phi_zero_with_a_flat_validation_loss_it_never_samples(lm_task, teacher_subject, ctx):
    cfg = DistiLLMConfig(steps=3, batch_size=2, warmup_steps=1, max_new_tokens=6, loss_eps=100.0, val_every=1)
    s = DistiLLM(cfg).apply(teacher_subject, lm_task, ctx).stats()
    assert s["steps_on_data"] == 3 and s["final_sgo_probability"] == 0 and s["validation_checks"] == 3


@pytest.mark.parametrize("bad", [{"divergence": "jsd"}, {"skew": "1"}, {"skew": "-0.1"}, {"init_prob": "1.5"},
                                 {"prob_step": "-0.1"}, {"loss_eps": "-1"}, {"val_every": "0"}, {"val_rows": "0"},
                                 {"capacity": "4"}, {"max_new_tokens": "0"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(DistiLLMConfig(), bad)


def test_config_errors_name_the_valid_options():
    with pytest.raises(ConfigError, match="skl.*srkl"):
        apply_overrides(DistiLLMConfig(), {"divergence": "fkl"})
    with pytest.raises(ConfigError, match="skl, srkl"):
        DistiLLMConfig(divergence="fkl").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size=8"):
        DistiLLMConfig(capacity=4).validate()


# ---- whole runs (slow) -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_run_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "distillm", budget="smoke", overrides={"init_prob": "0.5", "capacity": "8"},
            results_root=results_root).result
    assert r.status == "ok" and r.method.family == "distillation"
    assert r.cost.steps == 20 and r.cost.seconds > 0 and r.cost.tokens_seen > 0
    assert [c.name for c in r.controls] == ["student_without_teacher"] and r.controls[0].gain_interval is not None
    s = r.method_stats
    assert s["steps_generated"] + s["steps_replayed"] + s["steps_on_data"] == 20 and s["steps_generated"] >= 1
    assert r.size.method.parameters < r.size.reference.parameters


@pytest.mark.slow
def test_smoke_run_on_gsm8k_offline(tmp_path, results_root):
    import sys
    from pathlib import Path

    from bench.runner import run
    from bench.store import load_result

    sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))
    import full_fixtures

    (tmp_path / "full").mkdir()
    with full_fixtures.full_task_env(tmp_path / "full", separate_draft=True):
        out = run("gsm8k", "distillm", budget="smoke", results_root=results_root,
                  overrides={"max_new_tokens": "12", "batch_size": "2", "capacity": "2", "init_prob": "0.5"})
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.cost.steps == 20 and r.cost.tokens_seen > 0
    assert [c.name for c in r.controls] == ["student_without_teacher"] and r.controls[0].gain_interval is not None
    assert r.size.method.parameters < r.size.reference.parameters
