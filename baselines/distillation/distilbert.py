"""`distilbert`: DistilBERT's distillation on a classification task (Sanh, Debut, Chaumond & Wolf, 2019,
"DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter", arXiv:1910.01108).

Student: the teacher's architecture with half its layers, initialised from the teacher "by taking one layer
out of two" (section 3): student layer i is a copy of teacher layer 2i (0-based: layers 0, 2, 4, ...), and
the embeddings, pooler and classifier are copied as they are. Its width is the teacher's, which the cosine
loss and the copy both need; on `arith-nli` this is therefore not the task's own (narrower) student but the
reference with every other layer (1 of 2 layers there), and on `glue-*` it is the task's 6-of-12-layer student.

Loss (section 3, "a linear combination of the distillation loss L_ce with the supervised training loss ...
[and] a cosine embedding loss L_cos"), with the supervised loss here the task's label cross-entropy in place
of pre-training's masked-LM loss:

    L = a_ce * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )
        + a_label * CE(z_s, y)
        + a_cos * (1 / N) sum_tokens ( 1 - cos(h_s, h_t) )

z are the classifier logits, h the last layer's hidden states at the N real tokens of the batch. The paper's
L_ce = sum_i t_i log s_i is the soft-target cross-entropy; the KL differs from it by the teacher's entropy, a
constant for the student (same gradients), and is zero when the two agree. The weights and T are those of
the authors' training command (huggingface/transformers `examples/research_projects/distillation`: T = 2,
alpha_ce 5, alpha_mlm 2 -> a_label here, alpha_cos 1), the T^2 as in their `KLDivLoss` term.

Training: the task's student recipe (`baselines.distillation._encoder`) by `tasks._kit.classification.fit`. The
paper distils during pre-training and then fine-tunes; with no pre-training corpus here, the same objective
is applied on the task's training split (task-specific distillation). Control: the same half-depth
architecture from a fresh init, trained on the labels alone (so the gain includes the initialisation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.api import EncoderData, Student, TrainingSplit
from bench.registry import register_method


@dataclass(frozen=True)
class DistilBERTConfig:
    temperature: float = 2.0  # T of the soft targets (the authors' training command)
    alpha_ce: float = 5.0  # weight of the soft-target term (theirs)
    alpha_label: float = 2.0  # weight of the label cross-entropy (their alpha_mlm, the supervised term)
    alpha_cos: float = 1.0  # weight of the hidden-state cosine term (theirs)

    def validate(self) -> None:
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        for name in ("alpha_ce", "alpha_label", "alpha_cos"):
            check_range(name, getattr(self, name), lo=0)


def every_other_layer(teacher):
    """A copy of the (packed) teacher keeping layers 0, 2, 4, ... (DistilBERT's initialisation)."""
    from torch import nn

    from baselines.distillation._encoder import bert_parts

    student = copy.deepcopy(teacher)
    hf = getattr(student, "hf", student)
    _, layers = bert_parts(student)
    kept = nn.ModuleList([layers[i] for i in range(0, len(layers), 2)])
    for i, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    getattr(hf, "base_model", hf).encoder.layer = kept
    hf.config.num_hidden_layers = len(kept)
    return student


def distilbert_loss(z_s, z_t, y, h_s, h_t, mask, cfg: DistilBERTConfig):
    """The loss of the module docstring; h are [B, L, d] last hidden states, mask [B, L] the real tokens."""
    import torch.nn.functional as F

    t = cfg.temperature
    soft = F.kl_div(F.log_softmax(z_s / t, dim=-1), F.log_softmax(z_t / t, dim=-1), reduction="batchmean",
                    log_target=True) * t * t
    hard = F.cross_entropy(z_s, y)
    cos = (1 - F.cosine_similarity(h_s[mask], h_t[mask], dim=-1)).mean()
    return cfg.alpha_ce * soft + cfg.alpha_label * hard + cfg.alpha_cos * cos


@register_method("distilbert", family="distillation", paper="Sanh et al., DistilBERT, a distilled version of BERT",
                 year=2019, url="https://arxiv.org/abs/1910.01108", modalities=("text-classification",),
                 requires=(TrainingSplit, Student, EncoderData),
                 summary="half-depth student initialised from every other teacher layer; soft targets + "
                         "label CE + hidden-state cosine")
class DistilBERT(Method):
    Config = DistilBERTConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.distillation import _encoder as enc
        from tasks._kit.classification import fit, seed_everything

        cfg = self.config
        teacher = enc.frozen(enc.packed(subject.model, task), ctx)
        seed_everything(ctx.seed)
        student = every_other_layer(teacher).train()
        for p in student.parameters():
            p.requires_grad_(True)
        data, recipe = enc.training_data(task), enc.recipe_of(task)
        rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)

        def loss_fn(logits, x, y):
            with torch.no_grad():
                z_t = teacher(x)
            mask = enc.token_mask(student, x)
            return distilbert_loss(logits, z_t, y, rec_s.hidden[-1], rec_t.hidden[-1], mask, cfg)

        n_t, n_s = len(enc.bert_parts(teacher)[1]), len(enc.bert_parts(student)[1])
        stats = fit(student, data, recipe, ctx, seed=ctx.seed, loss_fn=loss_fn,
                    description=f"DistilBERT: {n_s} of the teacher's {n_t} layers, soft targets + cosine")
        rec_s.remove()
        rec_t.remove()
        what = f"the same {n_s}-layer student architecture (the teacher's width)"
        control = enc.control(task, ctx, student, data, recipe, what)
        cost = Cost(stats.seconds, stats.steps, stats.samples_seen,
                    f"{stats.steps} Adam steps of the {n_s}-layer student initialised from teacher layers "
                    f"{', '.join(str(i) for i in range(0, n_t, 2))}, with a teacher forward pass each")
        return Applied(task.prepare(enc.unpacked(student, task), ctx), cost, [control],
                       stats=lambda: {"student_layers": float(n_s), "teacher_layers": float(n_t)})
