"""Shared machinery of the image-classification tasks (`digits`, `cifar10`): training, evaluation, workload.

Module scope stays torch-free (see `bench.registry`); everything heavy is imported inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from abc import abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable

from bench.api import SMOKE_STEPS, Augmentation, Student, TrainingSplit  # noqa: F401 - SMOKE_STEPS re-exported
from tasks.base import Evaluation, RunContext, Subject, Task

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True, repr=False)
class TrainRecipe:
    epochs: int  # passes over the training split
    lr: float  # Adam learning rate, cosine-annealed to zero
    batch_size: int  # training batch (independent of the profile's timed batch size)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # steps of linear warm-up from 0 before the cosine; 0: none (cosine from the first step)
    clip: float = 0.0  # gradient-norm clipping before each step; 0: none

    def __repr__(self) -> str:
        """The fields, except the optional ones still at their defaults: a recipe that does not use them keeps
        the repr it had before they existed, and with it the cache keys built from it (`bench.cache.key`)."""
        shown = [f for f in fields(self) if f.name in _BASE_FIELDS or getattr(self, f.name) != f.default]
        return f"TrainRecipe({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"


_BASE_FIELDS = ("epochs", "lr", "batch_size", "weight_decay")  # shown in the repr always


@dataclass
class TrainStats:
    seconds: float = 0.0
    steps: int = 0
    samples_seen: int = 0

    def __iadd__(self, other: "TrainStats") -> "TrainStats":
        self.seconds += other.seconds
        self.steps += other.steps
        self.samples_seen += other.samples_seen
        return self


@dataclass
class Split:
    x: "torch.Tensor"  # float images, N x C x H x W, normalised
    y: "torch.Tensor"  # int64 labels, N


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(model: "torch.nn.Module", data: Split, recipe: TrainRecipe, ctx: RunContext, seed: int, description: str,
        loss_fn: Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"] | None = None,
        after_step: Callable[[], None] | None = None,
        augment: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None) -> TrainStats:
    """Train `model` in place with Adam and a cosine schedule (after the recipe's linear warm-up, if any; with
    its gradient clipping, if any), deterministically for a fixed `seed`.

    `loss_fn(logits, x, y)` replaces cross-entropy (distillation passes its own); `after_step` runs after
    every optimiser step (pruning re-applies its mask there); `augment(x, generator)` transforms a batch.
    """
    import torch
    import torch.nn.functional as F

    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(ctx.device).train()
    data = Split(data.x.to(ctx.device), data.y.to(ctx.device))  # training is always fp32
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = data.x.shape[0]
    per_epoch = (n + recipe.batch_size - 1) // recipe.batch_size
    epochs = ctx.budget.pick(recipe.epochs, 1)
    if ctx.budget.smoke:  # smoke: the same code path on a tiny budget
        per_epoch = min(per_epoch, SMOKE_STEPS)
    total = epochs * per_epoch
    if recipe.warmup_steps:  # smoke keeps a warm-up of at most a tenth of its steps
        warm = min(recipe.warmup_steps, max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup_cosine, warm=warm, total=total))
    else:  # no warm-up: exactly the schedule every recipe had before warm-up existed
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    stats = TrainStats()
    t0 = time.perf_counter()
    with ctx.progress.step(description, total=total) as advance:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(ctx.device)
            for i in range(per_epoch):
                idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                xb, yb = data.x[idx], data.y[idx]
                if augment is not None:
                    xb = augment(xb, gen)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb) if loss_fn is None else loss_fn(logits, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
                stats.steps += 1
                stats.samples_seen += int(idx.shape[0])
                advance(1)
    stats.seconds = time.perf_counter() - t0
    model.eval()
    return stats


def _warmup_cosine(step: int, warm: int, total: int) -> float:
    """The learning-rate factor at `step`: linear from 1/warm to 1 over `warm` steps, then cosine to zero."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def predict(model: "torch.nn.Module", x: "torch.Tensor", batch_size: int) -> "torch.Tensor":
    import torch

    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


class ImageClassificationTask(Task, TrainingSplit, Student, Augmentation):
    """A classification task over in-memory tensors: subclasses load the splits and define the models."""

    train: Split
    test: Split
    recipe: TrainRecipe  # how the reference is trained
    student_recipe: TrainRecipe  # how a student (distillation) is trained

    @abstractmethod
    def build_student(self) -> "torch.nn.Module":
        """The task's fixed, smaller student architecture, untrained, so every distillation method on
        the task compares the same student."""

    def augment(self, x: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        return x

    def training_split(self) -> Split:
        return self.train

    def data_fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:  # hashing a large training set takes seconds
            h = hashlib.sha256()
            for t in (self.test.x, self.test.y, self.train.x, self.train.y):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def train_reference(self, ctx: RunContext) -> dict:
        seed_everything(0)  # the reference never depends on the run's seed
        model = self.build_reference()
        fit(model, self.train, self.recipe, ctx, seed=0, description=f"Training the {self.spec.name} reference",
            augment=self.augment)
        return model.state_dict()

    def to_ctx(self, split: Split, ctx: RunContext) -> Split:
        return Split(split.x.to(device=ctx.device, dtype=ctx.torch_dtype), split.y.to(ctx.device))

    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        test = self.to_ctx(self.test, ctx)
        logits = predict(subject.model, test.x, ctx.eval_batch_size)
        pred = logits.argmax(dim=1)
        correct = (pred == test.y).double().cpu().numpy()
        return Evaluation(float(correct.mean()), correct, pred.cpu().numpy())

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return "top1_agreement", float((reference.outputs == method.outputs).mean())

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        import torch

        x = self.to_ctx(self.test, ctx).x
        batches = [x[i:i + ctx.batch_size] for i in range(0, x.shape[0], ctx.batch_size)]
        model = subject.model

        def run() -> object:
            with torch.inference_mode():
                return [model(b) for b in batches]

        return run, int(x.shape[0]), f"seconds to classify the {x.shape[0]} test images in batches of " \
                                     f"{ctx.batch_size}"
