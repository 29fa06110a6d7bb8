"""`minillm`: reverse-KL distillation on the student's own samples (Gu, Dong, Wei & Huang, 2024, "MiniLLM:
Knowledge Distillation of Large Language Models", ICLR 2024, arXiv:2306.08543).

Objective (eq. 1): the reverse KL of the student q_theta from the teacher p over whole responses,

    theta* = argmin KL[q_theta || p] = argmin - E_{x ~ p_x, y ~ q_theta(.|x)} log p(y|x) / q_theta(y|x),

whose policy gradient (eq. 3) is -E[ sum_t (R_t - 1) grad log q_theta(y_t | y_<t, x) ] with the reward-to-go
R_t = sum_{t'>=t} r_t', r_t = log p(y_t | y_<t, x) / q_theta(y_t | y_<t, x). The paper's three strategies, all
kept here, give the estimator of eq. 7 that this module follows:

  - single-step decomposition (eq. 4): the one-step part of the reward is taken in expectation over the
    vocabulary, exactly, and differentiated directly: sum_y' q_theta(y'|.) log p(y'|.) / q_theta(y'|.) = -KL_t,
    the token-level reverse KL at each position of the sampled response;
  - teacher-mixed sampling (eqs. 5-6): responses are sampled from p~ = alpha * p + (1 - alpha) * q_theta
    (alpha = `teacher_mix`, 0.2 in the paper) and every token is re-weighted by the single-token importance
    weight w_t = q_theta(y_t|.) / p~(y_t|.), the paper's approximation of the product over the prefix;
  - length normalisation: the long-term reward is the mean, not the sum, of the future rewards,
    R^Norm_{t+1} = (1 / (T - t)) sum_{t'=t+1..T} r_t' (0 at the last token).

    grad L = - E_{x, y ~ p~} [ sum_t w_t ( grad sum_y' q_theta(y'|.) log p(y'|.)/q_theta(y'|.)
                                           + R^Norm_{t+1} grad log q_theta(y_t|.) ) ]          (eq. 7)

`minillm_loss` is the surrogate whose gradient is that estimate, averaged over the response tokens (EOS
included; w and R^Norm are constants): (1/N) sum_t w_t [ KL(q_theta(.|t) || p(.|t)) - R^Norm_{t+1} log q_theta(y_t|t) ].

Left out, and why: the PPO machinery of the authors' code (several updates per rollout with a clipped ratio:
here each rollout gets one update, so the ratio is 1 and clipping would do nothing), its reward whitening
and clipping (not in the paper's equations), and the pre-training loss L_PT on a pre-training corpus (these
tasks have none). As in the paper, the student starts from one fine-tuned on the task (`init="draft"`, see
`baselines.distillation._lm`); rollouts start from the training prompts of each batch and run to EOS or
`max_new_tokens` at temperature 1 over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from baselines.distillation._lm import LMDistillConfig
from bench.config import check_range
from bench.api import Draft, Tokenizer, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class MiniLLMConfig(LMDistillConfig):
    teacher_mix: float = 0.2  # alpha of teacher-mixed sampling, the paper's value
    max_new_tokens: int = 160  # longest sampled response (arith's answers are at most ~110 tokens)

    def validate(self) -> None:
        super().validate()
        check_range("teacher_mix", self.teacher_mix, lo=0, hi=1, hi_open=True)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


def future_mean(r: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """R^Norm_{t+1}: the mean of r over the real positions after t (0 where none follow)."""
    import torch

    r = r * mask
    after = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) - r  # sum over t' > t
    count = torch.flip(torch.cumsum(torch.flip(mask.float(), [1]), 1), [1]) - mask.float()
    return torch.where(count > 0, after / count.clamp(min=1), torch.zeros_like(after))


def minillm_loss(student_logits, teacher_logits, tokens, mask, teacher_mix: float):
    """The surrogate loss of eq. 7 (module docstring) for responses `tokens` [B, G] sampled from p~, with
    `mask` [B, G] marking their real tokens; logits [B, G, V] are those that predict each token.
    Returns (loss, mean per-token reverse KL of the student from the teacher on these responses)."""
    import torch
    import torch.nn.functional as F

    m = mask.float()
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1).detach()
    lq = log_q.gather(-1, tokens[..., None]).squeeze(-1)
    single = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q_t || p_t): gradient through q, exactly
    with torch.no_grad():
        lp = log_p.gather(-1, tokens[..., None]).squeeze(-1)
        r = lp - lq  # r_t = log p(y_t) / q(y_t)
        w = torch.exp(lq - torch.log(teacher_mix * lp.exp() + (1 - teacher_mix) * lq.exp()))
        future = future_mean(r, m)
    per_token = w * (single - future * lq)
    n = m.sum().clamp(min=1)
    return (per_token * m).sum() / n, float((single.detach() * m).sum() / n)


@register_method("minillm", family="distillation", paper="Gu et al., MiniLLM: Knowledge Distillation of Large "
                 "Language Models", year=2024, url="https://arxiv.org/abs/2306.08543", modalities=("causal-lm",),
                 requires=(TrainingRows, Draft, Tokenizer),
                 summary="reverse KL of the student from the teacher on the student's own (teacher-mixed) "
                         "samples, by policy gradient with single-step decomposition and length normalisation")
class MiniLLM(Method):
    Config = MiniLLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.distillation import _lm

        cfg = self.config
        teacher = _lm.frozen_teacher(subject, ctx)
        examples = _lm.ground_truth_examples(task)
        tok = task.tokenizer
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        seen = {"kl": 0.0, "length": 0.0, "rollouts": 0}

        def batch_loss(model, ids, mask, labels):
            prompts, p_mask = _lm.left_padded_prompts(ids, labels, tok.pad_token_id)
            with torch.no_grad():
                seq, s_mask, c_mask = _lm.sample(model, teacher, prompts, p_mask, cfg.max_new_tokens,
                                                 tok.eos_token_id, tok.pad_token_id, gen, cfg.teacher_mix)
                z_t = _lm.completion_logits(teacher, seq, s_mask, prompts.shape[1])
            z_s = _lm.completion_logits(model, seq, s_mask, prompts.shape[1])
            loss, kl = minillm_loss(z_s, z_t, seq[:, prompts.shape[1]:], c_mask, cfg.teacher_mix)
            seen["kl"] += kl
            seen["length"] += float(c_mask.sum()) / c_mask.shape[0]
            seen["rollouts"] += 1
            return loss, int(s_mask.sum())

        student, stats = _lm.train(task, ctx, cfg, examples, batch_loss=batch_loss,
                                   description=f"MiniLLM: reverse KL on the student's samples "
                                               f"(teacher mix {cfg.teacher_mix})")
        control = _lm.control(task, ctx, cfg, examples)
        cost = Cost(stats.seconds, stats.steps, stats.samples_seen,
                    f"{stats.steps} AdamW steps of the student {_lm.cost_note(cfg.init)}, each on a fresh "
                    f"teacher-mixed rollout of {cfg.batch_size} training prompts (teacher and student decode every "
                    f"token)", tokens_seen=stats.tokens_seen)
        k = max(1, seen["rollouts"])
        out = {"mean_rollout_reverse_kl_per_token": seen["kl"] / k, "mean_rollout_length": seen["length"] / k}
        return Applied(task.prepare(student, ctx), cost, [control], stats=lambda: out)
