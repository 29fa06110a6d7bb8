"""`distillm`: skew KL divergence with an adaptive off-policy schedule of student-generated outputs (Ko, Kim,
Chen & Yun, 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024,
arXiv:2402.03898).

The loss (section 3.1). With p the teacher's and q_theta the student's next-token distribution at a response
position, and a skew alpha in [0, 1) (`skew`, 0.1 in the paper), token by token over the response:

    SKL_alpha(p || q_theta)  = KL( p       || alpha p + (1 - alpha) q_theta )
                             = sum_v p(v) [ log p(v) - log( alpha p(v) + (1 - alpha) q_theta(v) ) ]
    SRKL_alpha(p || q_theta) = KL( q_theta || (1 - alpha) p + alpha q_theta )
                             = sum_v q(v) [ log q(v) - log( (1 - alpha) p(v) + alpha q_theta(v) ) ]

(`divergence` = "skl" or "srkl"). At alpha = 0 they are the forward KL(p || q_theta) and the reverse KL(q_theta ||
p); the gradient flows through q_theta inside the mixture too (the paper's gradient-stability argument is about
exactly that term). `skew_divergence` averages them over the response tokens of a batch (EOS included), the
loss of every step (the authors' kd-ratio 1: no cross-entropy term).

The data (section 3.2, Algorithm 1). The student trains on ground-truth answers (off-policy, teacher forcing)
or on student-generated outputs (SGO: responses it samples itself from the batch's prompts at temperature 1,
whole vocabulary, up to `max_new_tokens`), kept in a replay buffer D_R of `capacity` sequences (first in,
first out). At step t of T, with u ~ U(0, 1) and phi the current probability of SGO (`AdaptiveSchedule.choose`):

    u < phi (1 - t/T), or u < phi while D_R is not full  ->  sample fresh SGO, add them to D_R, train on them
    otherwise u < phi                                     ->  train on a batch drawn uniformly from D_R (replay)
    otherwise                                             ->  train on the ground-truth batch

so the share of fresh generations decays over training while replay takes over (the authors' "decreasing"
replay ratio). phi follows the validation loss L_val, the student's cross-entropy on held-out ground-truth
answers, measured before training and every `val_every` steps (`AdaptiveSchedule.observe`):

    if L_val >= L_prev + epsilon:  phi <- min(phi + delta, 1),  L_prev <- L_val                     (Algorithm 1)

with phi_0 = `init_prob` (0), delta = `prob_step` (0.1), epsilon = `loss_eps` (0.1), L_prev the loss at the
start or at the last rise: a validation loss that climbs (the student drifting from what it will be asked at
inference) turns on more of its own outputs; one that falls leaves phi where it is.

What is ours. The validation rows are `val_rows` training rows (at most a quarter of them), held out of the
student's training, seeded; the tasks declare no separate validation split (the paper uses its datasets' own).
The authors validate once an epoch (about 20 times a run); here every `val_every` steps. Their buffer holds 1,000
sequences, about 6% of the sequences a GPT-2 run trains on; `capacity` defaults to the same share of the default
150 steps of 8. Their pre-training loss term (an OpenWebText corpus) has no counterpart here. The student, data,
recipe (`tasks._kit.lm.fit_lm`) and control are `baselines.distillation._lm`'s: the control is the shared one,
fine-tuned on all the training rows.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from baselines.base import Applied, Cost, Method
from baselines.distillation._lm import LMDistillConfig
from bench.api import Draft, Tokenizer, TrainingRows, pick
from bench.config import ConfigError, check_range
from bench.registry import register_method

if TYPE_CHECKING:
    import torch

DIVERGENCES = ("skl", "srkl")


@dataclass(frozen=True)
class DistiLLMConfig(LMDistillConfig):
    divergence: Literal["skl", "srkl"] = "skl"  # skew KL (the authors' scripts: adaptive-sfkl) or skew reverse KL
    skew: float = 0.1  # alpha, the teacher's (SKL) or student's (SRKL) share of the mixture: the paper's 0.1
    init_prob: float = 0.0  # phi_0, the starting probability of training on student-generated outputs (authors: 0)
    prob_step: float = 0.1  # delta, phi's rise when the validation loss rises (authors: 0.1)
    loss_eps: float = 0.1  # epsilon, the rise of the validation loss (nats per token) that counts (authors: 0.1)
    val_every: int = 15  # steps between validation losses: 10 checks in the default 150 steps (authors: each epoch)
    val_rows: int = 100  # training rows held out for the validation loss (at most a quarter of the rows)
    capacity: int = 64  # replay buffer, in sequences: the authors' share (1,000 of ~17,600) of the default 150 x 8
    max_new_tokens: int = 160  # longest sampled response (arith's answers are at most ~110 tokens)

    def validate(self) -> None:
        super().validate()
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence={self.divergence!r} is not one of {', '.join(DIVERGENCES)}")
        check_range("skew", self.skew, lo=0, hi=1, hi_open=True)
        check_range("init_prob", self.init_prob, lo=0, hi=1)
        check_range("prob_step", self.prob_step, lo=0, hi=1)
        check_range("loss_eps", self.loss_eps, lo=0)
        check_range("val_every", self.val_every, lo=1)
        check_range("val_rows", self.val_rows, lo=1)
        if self.capacity < self.batch_size:
            raise ConfigError(f"capacity={self.capacity} must be >= batch_size={self.batch_size} (a replayed batch "
                              f"is drawn from the buffer without replacement)")
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


# ---- the loss (section 3.1) ---------------------------------------------------------------------------------

def log_mix(log_a: "torch.Tensor", log_b: "torch.Tensor", a: float) -> "torch.Tensor":
    """log(a A + (1 - a) B) from log A and log B, stably (a in [0, 1))."""
    import torch

    if a == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(a), log_b + math.log1p(-a))


def skew_divergence(student_logits, teacher_logits, mask, skew: float, divergence: str) -> "torch.Tensor":
    """The mean over the positions where `mask` [B, G] is true of SKL_alpha(p || q) (`divergence="skl"`) or
    SRKL_alpha(p || q) ("srkl"), alpha = `skew`, from logits [B, G, V] (the module docstring's equations)."""
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1).detach()
    if divergence == "skl":  # KL(p || alpha p + (1 - alpha) q)
        per = (log_p.exp() * (log_p - log_mix(log_p, log_q, skew))).sum(-1)
    elif divergence == "srkl":  # KL(q || (1 - alpha) p + alpha q)
        per = (log_q.exp() * (log_q - log_mix(log_q, log_p, skew))).sum(-1)
    else:
        raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")
    m = mask.float()
    return (per * m).sum() / m.sum().clamp(min=1)


# ---- the adaptive off-policy schedule (Algorithm 1) --------------------------------------------------------

class AdaptiveSchedule:
    """phi, the probability of training on student-generated outputs, driven by the validation loss."""

    def __init__(self, init_prob: float, prob_step: float, loss_eps: float):
        self.phi, self.prob_step, self.loss_eps = init_prob, prob_step, loss_eps
        self.prev: float | None = None  # L_prev: the first validation loss, then the one at the last rise
        self.rises = 0

    def observe(self, val_loss: float) -> bool:
        """Record a validation loss; True when it rose by epsilon or more over L_prev (and phi with it)."""
        if self.prev is None:
            self.prev = val_loss
            return False
        if val_loss >= self.prev + self.loss_eps:
            self.phi = min(self.phi + self.prob_step, 1.0)
            self.prev = val_loss
            self.rises += 1
            return True
        return False

    def choose(self, u: float, t: int, total: int, buffered: int, capacity: int) -> str:
        """What step t of `total` (1-based) trains on, for u ~ U(0, 1): "generate" (fresh SGO, into the buffer),
        "replay" (a batch from the buffer) or "data" (the ground-truth batch)."""
        if u < self.phi * (1 - t / total) or (u < self.phi and buffered < capacity):
            return "generate"
        return "replay" if u < self.phi else "data"


class ReplayBuffer:
    """Student-generated sequences, first in first out, each kept as (prompt tokens, response tokens)."""

    def __init__(self, capacity: int):
        self.items: deque[tuple[list[int], list[int]]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, seq: "torch.Tensor", seq_mask: "torch.Tensor", comp_mask: "torch.Tensor") -> None:
        """Add a sampled batch (`_lm.sample`'s outputs: left-padded prompts, then the responses)."""
        width = seq.shape[1] - comp_mask.shape[1]
        for row, m, c in zip(seq.cpu(), seq_mask.cpu(), comp_mask.cpu()):
            self.items.append((row[:width][m[:width].bool()].tolist(), row[width:][c.bool()].tolist()))

    def sample(self, k: int, rng) -> list[tuple[list[int], list[int]]]:
        return rng.sample(list(self.items), k)


def pack(items: list[tuple[list[int], list[int]]], pad_id: int, device="cpu"):
    """(sequences [B, P + G], attention mask, response mask [B, G]): prompts left-padded to P, responses
    right-padded to G, the layout `_lm.sample` returns and `_lm.completion_logits` reads."""
    import torch

    width = max(len(p) for p, _ in items)
    length = max(len(c) for _, c in items)
    seq = torch.full((len(items), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(seq)
    for r, (p, c) in enumerate(items):
        seq[r, width - len(p):width + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[r, width - len(p):width + len(c)] = 1
    return seq.to(device), mask.to(device), mask[:, width:].bool().to(device)


def validation_loss(model, examples, pad_id: int, device, batch_size: int) -> float:
    """The student's cross-entropy per answer token on `examples` (token-weighted), in eval mode, no gradients."""
    import torch
    import torch.nn.functional as F

    from tasks._kit import lm

    training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            idx = list(range(i, min(i + batch_size, len(examples))))
            ids, mask, labels = (t.to(device) for t in lm.collate(examples, idx, pad_id))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    model.train(training)
    return total / max(count, 1)


@register_method("distillm", family="distillation", paper="Ko et al., DistiLLM: Towards Streamlined Distillation "
                 "for Large Language Models", year=2024, url="https://arxiv.org/abs/2402.03898",
                 modalities=("causal-lm",),
                 requires=(TrainingRows, Draft, Tokenizer),
                 summary="skew KL (or skew reverse KL) between teacher and student on the data and on the "
                         "student's own replayed samples, used with a probability that follows the validation loss")
class DistiLLM(Method):
    Config = DistiLLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        import random

        import torch

        from baselines.distillation import _lm

        cfg = self.config
        teacher = _lm.frozen_teacher(subject, ctx)
        examples = _lm.ground_truth_examples(task)
        held = set(pick(len(examples), max(1, min(cfg.val_rows, len(examples) // 4)), ctx.seed))
        val = [e for i, e in enumerate(examples) if i in held]
        train = [e for i, e in enumerate(examples) if i not in held]
        tok = task.tokenizer
        total = cfg.effective_steps(ctx)
        schedule = AdaptiveSchedule(cfg.init_prob, cfg.prob_step, cfg.loss_eps)
        buffer = ReplayBuffer(cfg.capacity)
        rng = random.Random(ctx.seed)  # u at every step, and the replayed batches
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)  # the student's samples
        seen = {"step": 0, "generate": 0, "replay": 0, "data": 0, "divergence": 0.0, "val": []}

        def batch_loss(model, ids, mask, labels):
            step = seen["step"]
            seen["step"] += 1
            if step % cfg.val_every == 0:
                seen["val"].append(validation_loss(model, val, tok.pad_token_id, ctx.device,
                                                   cfg.batch_size))
                schedule.observe(seen["val"][-1])
            kind = schedule.choose(rng.random(), step + 1, total, len(buffer), cfg.capacity)
            seen[kind] += 1
            if kind == "data":  # teacher forcing on the ground truth: logits at t predict token t + 1
                keep = labels[:, 1:] != -100
                z_s = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                with torch.no_grad():
                    z_t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
                loss = skew_divergence(z_s, z_t, keep, cfg.skew, cfg.divergence)
                seen["divergence"] += float(loss.detach())
                return loss, int(mask.sum())
            if kind == "generate":
                prompts, p_mask = _lm.left_padded_prompts(ids, labels, tok.pad_token_id)
                model.eval()
                with torch.no_grad():
                    seq, s_mask, c_mask = _lm.sample(model, teacher, prompts, p_mask, cfg.max_new_tokens,
                                                     tok.eos_token_id, tok.pad_token_id, gen)
                model.train()
                buffer.add(seq, s_mask, c_mask)
            else:
                seq, s_mask, c_mask = pack(buffer.sample(cfg.batch_size, rng), tok.pad_token_id, ctx.device)
            width = seq.shape[1] - c_mask.shape[1]
            with torch.no_grad():
                z_t = _lm.completion_logits(teacher, seq, s_mask, width)
            z_s = _lm.completion_logits(model, seq, s_mask, width)
            loss = skew_divergence(z_s, z_t, c_mask, cfg.skew, cfg.divergence)
            seen["divergence"] += float(loss.detach())
            return loss, int(s_mask.sum())

        name = {"skl": "skew KL", "srkl": "skew reverse KL"}[cfg.divergence]
        student, stats = _lm.train(task, ctx, cfg, train, batch_loss=batch_loss,
                                   description=f"DistiLLM: {name} (alpha {cfg.skew}), adaptive off-policy SGO")
        control = _lm.control(task, ctx, cfg, examples)
        cost = Cost(stats.seconds, stats.steps, stats.samples_seen,
                    f"{stats.steps} AdamW steps of the student {_lm.cost_note(cfg.init)} on the training rows less "
                    f"{len(val)} held out for the validation loss ({seen['generate']} on fresh samples of its own, "
                    f"{seen['replay']} replayed, {seen['data']} on the ground truth; a teacher forward pass each)",
                    tokens_seen=stats.tokens_seen)
        val_losses = seen["val"]
        out = {"final_sgo_probability": schedule.phi, "sgo_probability_rises": float(schedule.rises),
               "steps_generated": float(seen["generate"]), "steps_replayed": float(seen["replay"]),
               "steps_on_data": float(seen["data"]), "validation_checks": float(len(val_losses)),
               "first_validation_loss": val_losses[0] if val_losses else float("nan"),
               "last_validation_loss": val_losses[-1] if val_losses else float("nan"),
               "mean_skew_divergence": seen["divergence"] / max(1, seen["step"])}
        return Applied(task.prepare(student, ctx), cost, [control], stats=lambda: out)
