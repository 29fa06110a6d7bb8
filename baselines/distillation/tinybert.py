"""`tinybert`: TinyBERT's task-specific distillation (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural
Language Understanding", Findings of EMNLP 2020, arXiv:1909.10351).

Student: the task's own student (`task.build_student()`, fresh init): arith-nli's narrower encoder, glue's
6-of-12-layer BERT. Layer mapping n = g(m) = m * N / M (the paper's uniform strategy), m = 1..M student
layers, N teacher layers; g(0) = 0 is the embedding layer.

Stage 1, intermediate-layer distillation (eqs. 7-9), for the first half of the recipe's epochs:

    L_attn(m)   = (1/h) sum_i MSE( A_i^S(m), A_i^T(g(m)) )     A = Q K^T / sqrt(d_head), unnormalised, per head
    L_hidn(m)   = MSE( H^S(m) W_h, H^T(g(m)) )                  H: layer outputs; W_h a learned d_S x d_T map
    L_embd      = MSE( E^S W_e, E^T )                           E: embedding outputs; W_e learned
    L_stage1    = L_embd + sum_m ( L_attn(m) + L_hidn(m) )

Stage 2, prediction-layer distillation (eq. 10), for the rest: L_pred = KL( softmax(z_T / t) || softmax(z_S / t) ).
The paper writes the soft cross-entropy -softmax(z_T/t) . log_softmax(z_S/t); the KL differs by the teacher's
entropy, a constant for the student (same gradients), and is zero when student and teacher agree: all four
losses vanish for a student equal to the teacher with identity maps (a test checks it). Means run over real
tokens (attention: real query-key pairs) only. The paper fits the attention scores before the softmax "for
faster convergence"; transformers returns only the probabilities, so the scores are recomputed from hooked Q
and K (`baselines.distillation._encoder.Recorder`).

Where the heads differ in number (arith-nli: teacher 4, student 2), the teacher's scores are averaged over
consecutive groups of heads (teacher heads 2j, 2j+1 -> student head j): our adaptation, the paper's students
have the teacher's head count. Left out: general distillation on a pre-training corpus (none here: the
student starts from a fresh init, not from general TinyBERT) and the paper's data augmentation (GloVe/BERT
word replacement, which needs embeddings this project cannot download). Training: the task's student recipe
split into the two stages (`tasks._kit.classification.fit`, Adam and cosine restarted per stage as in the paper's
two runs; at 1 epoch each stage gets 1). Control: the same student on the labels alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.api import EncoderData, Student, TrainingSplit, require
from bench.registry import register_method


@dataclass(frozen=True)
class TinyBERTConfig:
    temperature: float = 1.0  # t of prediction-layer distillation (the paper: t = 1 works well)

    def validate(self) -> None:
        check_range("temperature", self.temperature, lo=0, lo_open=True)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """g(m) for m = 1..M (1-based teacher layers), the uniform strategy."""
    return [round(m * n_teacher / n_student) for m in range(1, n_student + 1)]


def group_heads(scores, heads: int):
    """Teacher scores [B, H_T, L, L] averaged to `heads` heads over consecutive groups."""
    if scores.shape[1] == heads:
        return scores
    if scores.shape[1] % heads:
        raise ValueError(f"the teacher's {scores.shape[1]} attention heads cannot be grouped into the student's "
                         f"{heads}: tinybert needs the teacher's head count to be a multiple of the student's")
    return scores.view(scores.shape[0], heads, -1, *scores.shape[2:]).mean(dim=2)


def intermediate_losses(rec_s, rec_t, proj_e, proj_h, mapping: list[int], mask) -> dict:
    """{"embd", "attn", "hidn"} of stage 1 for the last forward passes recorded by `rec_s` and `rec_t`."""
    from baselines.distillation._encoder import masked_mse

    pairs = mask[:, None, :, None] & mask[:, None, None, :]
    out = {"embd": masked_mse(proj_e(rec_s.hidden[0]), rec_t.hidden[0], mask), "attn": 0.0, "hidn": 0.0}
    for m, n in enumerate(mapping, start=1):
        a_s = rec_s.scores(m)
        out["attn"] = out["attn"] + masked_mse(a_s, group_heads(rec_t.scores(n), a_s.shape[1]), pairs)
        out["hidn"] = out["hidn"] + masked_mse(proj_h(rec_s.hidden[m]), rec_t.hidden[n], mask)
    return out


def prediction_loss(z_s, z_t, temperature: float):
    import torch.nn.functional as F

    t = temperature
    return F.kl_div(F.log_softmax(z_s / t, dim=-1), F.log_softmax(z_t / t, dim=-1), reduction="batchmean",
                    log_target=True)


@register_method("tinybert", family="distillation", paper="Jiao et al., TinyBERT: Distilling BERT for Natural "
                 "Language Understanding", year=2020, url="https://arxiv.org/abs/1909.10351",
                 modalities=("text-classification",),
                 requires=(TrainingSplit, Student, EncoderData),
                 summary="attention-score and hidden-state MSE through a learned projection, then "
                         "prediction-layer distillation, into the task's student")
class TinyBERT(Method):
    Config = TinyBERTConfig

    def apply(self, subject, task, ctx) -> Applied:
        from dataclasses import replace

        import torch
        from torch import nn

        from baselines.distillation import _encoder as enc
        from tasks._kit.classification import fit

        cfg = self.config
        teacher = enc.frozen(enc.packed(subject.model, task), ctx)
        student = enc.packed(require(task, Student).build_student(), task).to(ctx.device)
        data, recipe = enc.training_data(task), enc.recipe_of(task)
        d_s = enc.bert_parts(student)[0].word_embeddings.embedding_dim
        d_t = enc.bert_parts(teacher)[0].word_embeddings.embedding_dim
        mapping = layer_map(len(enc.bert_parts(student)[1]), len(enc.bert_parts(teacher)[1]))

        class Stage1(nn.Module):  # the student with its maps W_e, W_h, so that Adam trains all three
            def __init__(self):
                super().__init__()
                self.student, self.proj_e, self.proj_h = student, nn.Linear(d_s, d_t), nn.Linear(d_s, d_t)

            def forward(self, x):
                return self.student(x)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            stage1 = Stage1().to(ctx.device)
        rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)
        last = {}

        def loss1(logits, x, y):
            with torch.no_grad():
                teacher(x)
            parts = intermediate_losses(rec_s, rec_t, stage1.proj_e, stage1.proj_h, mapping,
                                        enc.token_mask(student, x))
            last.update({k: float(v.detach()) for k, v in parts.items()})
            return parts["embd"] + parts["attn"] + parts["hidn"]

        def loss2(logits, x, y):
            with torch.no_grad():
                z_t = teacher(x)
            return prediction_loss(logits, z_t, cfg.temperature)

        e1 = max(1, recipe.epochs // 2)
        e2 = max(1, recipe.epochs - e1)
        s1 = fit(stage1, data, replace(recipe, epochs=e1), ctx, seed=ctx.seed, loss_fn=loss1,
                 description=f"TinyBERT stage 1: attention and hidden states, layers {mapping}")
        s2 = fit(student, data, replace(recipe, epochs=e2), ctx, seed=ctx.seed + 1, loss_fn=loss2,
                 description="TinyBERT stage 2: prediction layer")
        rec_s.remove()
        rec_t.remove()
        control = enc.control(task, ctx, student, data, recipe, "the same student (the task's)")
        cost = Cost(s1.seconds + s2.seconds, s1.steps + s2.steps, s1.samples_seen + s2.samples_seen,
                    f"{s1.steps} Adam steps of intermediate-layer distillation (student layers -> teacher layers "
                    f"{mapping}), then {s2.steps} of prediction-layer distillation, with a teacher forward pass each")
        out = {f"stage1_final_{k}_loss": v for k, v in last.items()}
        return Applied(task.prepare(enc.unpacked(student, task), ctx), cost, [control], stats=lambda: out)
