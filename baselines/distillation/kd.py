"""`kd`: knowledge distillation with soft targets (Hinton, Vinyals & Dean, 2015, arXiv:1503.02531).

The task's student is trained on the task's training split against a mix of the teacher's softened
distribution and the true labels:

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

z_t, z_s are teacher and student logits. The T^2 factor keeps the soft term's gradients on the same scale as
the hard term's when T changes (section 2 of the paper). Convention: `alpha` weights the soft term, as in
torchdistill and the paper's own experiments.

For the gain of distillation to be visible, the result also carries a control: the same student, the same
recipe and seed, trained on the labels alone (alpha = 0). That control is cached per task, recipe, seed and
device, since it does not depend on T or alpha.

No library was used for the loss: it is three lines, and torchdistill's would pull a config system in.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.api import Augmentation, Student, TrainingSplit
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 4.0  # T: softens both distributions; Hinton et al. found 2-20 works, 4 is common
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha weights the hard-label CE

    def validate(self) -> None:
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("alpha", self.alpha, lo=0, hi=1)


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(z_s, y), batch-mean."""
    import torch.nn.functional as F

    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1 - alpha) * hard


def student_without_teacher(task, ctx):
    """The control: the task's student trained on labels alone, cached. Returns (model, seconds).

    Its training time is cached in the same entry as its weights (`cache.cached_bundle`): an entry with either
    part missing or damaged is trained again, so a cached control always reports what it really cost."""
    from bench import cache
    from tasks._kit.classification import fit, seed_everything

    path = (cache.task_dir(task) / "controls" /
            f"student-{cache.key(task.student_recipe, ctx.seed, ctx.budget, ctx.device)}.safetensors")

    def build() -> tuple[dict, dict]:
        seed_everything(ctx.seed)
        model = task.build_student().to(ctx.device)
        stats = fit(model, task.training_split(), task.student_recipe, ctx, seed=ctx.seed,
                    description="Training the same student without the teacher (control, cached)",
                    augment=task.augment)
        return model.state_dict(), {"seconds": stats.seconds}

    state, meta, _, _ = cache.cached_bundle(path, build)
    model = task.build_student()
    model.load_state_dict(state)
    return model, meta["seconds"]


@register_method("kd", family="distillation", paper="Hinton et al., Distilling the Knowledge in a Neural Network",
                 year=2015, url="https://arxiv.org/abs/1503.02531", modalities=("image-classification",),
                 summary="train the task's student on the teacher's temperature-softened outputs",
                 requires=(TrainingSplit, Student, Augmentation))
class KnowledgeDistillation(Method):
    Config = KDConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        import torch

        from tasks._kit.classification import fit, seed_everything

        cfg = self.config
        teacher = copy.deepcopy(subject.model).float().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

        def loss_fn(logits, x, y):
            with torch.no_grad():
                z_t = teacher(x)
            return kd_loss(logits, z_t, y, cfg.temperature, cfg.alpha)

        seed_everything(ctx.seed)
        student = task.build_student().to(ctx.device)
        stats = fit(student, task.training_split(), task.student_recipe, ctx, seed=ctx.seed,
                    description=f"Distilling the student (T={cfg.temperature}, alpha={cfg.alpha})",
                    loss_fn=loss_fn, augment=task.augment)

        control_model, control_seconds = student_without_teacher(task, ctx)
        control_eval = task.evaluate(task.prepare(control_model, ctx), ctx)
        control = ControlResult(
            "student_without_teacher",
            "the same student architecture, recipe and seed trained on the labels alone (alpha = 0)",
            control_eval.value, control_eval.per_example, control_seconds)
        cost = Cost(stats.seconds, stats.steps, stats.samples_seen,
                    f"{stats.steps} Adam steps of the student with teacher forward passes")
        return Applied(task.prepare(student, ctx), cost, [control])
