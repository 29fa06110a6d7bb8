"""`kd-lm`: token-level knowledge distillation of a causal LM on the ground-truth sequences (Hinton, Vinyals &
Dean, 2015, arXiv:1503.02531; the word-level KD of Kim & Rush, 2016, "Sequence-Level Knowledge Distillation",
arXiv:1606.07947, section 3.1).

The student reads the training split's ground-truth answers (teacher forcing) and at every answer token j
matches the teacher's next-token distribution, mixed with the usual cross-entropy:

    L = alpha * T^2 * (1/N) sum_j KL( p_t(. | y_<j, x; T) || p_s(. | y_<j, x; T) )
        + (1 - alpha) * (1/N) sum_j -log p_s(y_j | y_<j, x)

p(. ; T) = softmax(z / T); the sums run over the N answer tokens of the batch (EOS included); prompts and
padding carry no loss. Kim & Rush's word-level KD is T = 1 (their L_WORD-KD mixed with the NLL by alpha).
Convention: `alpha` weights the soft (teacher) term, as in `kd` and torchdistill; T^2 keeps the soft term's
gradients on the hard term's scale when T changes (Hinton et al., section 2).

At alpha = 0 the soft term is multiplied by an exact zero and the loss is `tasks._kit.lm.completion_loss`, the
loss of plain fine-tuning: the student's weights equal the control's bit for bit (a test checks it).
The student, data, recipe and control are `baselines.distillation._lm`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from baselines.distillation._lm import LMDistillConfig
from bench.config import check_range
from bench.api import Draft, Tokenizer, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class KDLMConfig(LMDistillConfig):
    temperature: float = 1.0  # T: Kim & Rush's word-level KD uses the plain distributions (T = 1)
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha weights the ground-truth cross-entropy

    def validate(self) -> None:
        super().validate()
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("alpha", self.alpha, lo=0, hi=1)


def kd_lm_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * mean_j KL(p_t^T || p_s^T) + (1 - alpha) * CE, over the answer tokens (labels != -100).
    Logits are [B, L, V] for a batch whose labels [B, L] are aligned with the input ids (the shift is here)."""
    import torch.nn.functional as F

    from tasks._kit.lm import completion_loss

    ce = completion_loss(student_logits, labels)
    keep = labels[:, 1:] != -100
    t = temperature
    s = F.log_softmax(student_logits[:, :-1][keep].float() / t, dim=-1)
    p = F.log_softmax(teacher_logits[:, :-1][keep].float() / t, dim=-1)
    kl = F.kl_div(s, p, reduction="batchmean", log_target=True)  # sum over tokens / N tokens
    return alpha * t * t * kl + (1 - alpha) * ce


@register_method("kd-lm", family="distillation", year=2016, url="https://arxiv.org/abs/1606.07947",
                 paper="Hinton et al. 2015; Kim & Rush, Sequence-Level Knowledge Distillation (word-level KD)",
                 modalities=("causal-lm",),
                 requires=(TrainingRows, Draft, Tokenizer),
                 summary="train the task's student LM on the teacher's token distributions over the "
                         "ground-truth answers, mixed with their cross-entropy")
class KDLM(Method):
    Config = KDLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.distillation import _lm

        cfg = self.config
        teacher = _lm.frozen_teacher(subject, ctx)
        examples = _lm.ground_truth_examples(task)

        def loss_fn(logits, ids, mask, labels):
            with torch.no_grad():
                z_t = teacher(input_ids=ids, attention_mask=mask).logits
            return kd_lm_loss(logits, z_t, labels, cfg.temperature, cfg.alpha)

        student, stats = _lm.train(task, ctx, cfg, examples, loss_fn=loss_fn,
                                   description=f"Distilling the student (T={cfg.temperature}, alpha={cfg.alpha})")
        control = _lm.control(task, ctx, cfg, examples)
        cost = Cost(stats.seconds, stats.steps, stats.samples_seen,
                    f"{stats.steps} AdamW steps of the student {_lm.cost_note(cfg.init)} on the ground-truth "
                    f"answers, with a teacher forward pass each", tokens_seen=stats.tokens_seen)
        return Applied(task.prepare(student, ctx), cost, [control])
