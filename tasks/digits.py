"""`digits`: scikit-learn's 8x8 handwritten digits, a small CNN teacher and a ~40x smaller CNN student.

The data ships inside scikit-learn, so the task runs offline. The split is fixed (stratified, seed 0,
a quarter held out: 1,348 train / 449 test). The reference is trained by `bench reference build digits`
and published as `tasks/artifacts/digits/reference.safetensors`, whose sha256 is recorded below: every
result on `digits` is measured against those exact weights on every machine.
"""

from __future__ import annotations

from bench.api import Sections
from bench.registry import register_task
from tasks._kit.classification import ImageClassificationTask, Split, TrainRecipe
from tasks.base import RunContext


def _teacher():
    from torch import nn

    # ~160k parameters, ~2.4 M MACs per image
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 4 x 4
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 128 x 2 x 2
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def _student():
    from torch import nn

    # ~3.7k parameters: small enough that it has something to learn from the teacher
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 4 x 4
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 2 x 2
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@register_task("digits", modality="image-classification", tier="embedded", metric="top1_accuracy",
               higher_is_better=True, version="1",
               summary="scikit-learn 8x8 digits; CNN teacher (160k params) vs a 3.7k-param student")
class Digits(ImageClassificationTask, Sections):
    # the published reference: `bench reference build digits --publish` rebuilds it bit for bit on x86-64
    reference_sha256 = "d37485ee3a580ed07772f5ffe661aa7a6ab73be902107d2b8e083a88f4c05189"
    recipe = TrainRecipe(epochs=40, lr=2e-3, batch_size=64)  # teacher: ~98-99% top-1 in ~15 s on 2 cores
    student_recipe = TrainRecipe(epochs=40, lr=5e-3, batch_size=64)  # every digits student trains like this

    def __init__(self) -> None:
        self._loaded = False

    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # [0, 16] -> [-1, 1]
        y = d.target.astype(np.int64)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        self.train = Split(torch.from_numpy(xtr).unsqueeze(1), torch.from_numpy(ytr))
        self.test = Split(torch.from_numpy(xte).unsqueeze(1), torch.from_numpy(yte))
        self._loaded = True

    def build_reference(self):
        return _teacher()

    def build_student(self):
        return _student()

    @property
    def reference_recipe(self) -> TrainRecipe:  # the Sections capability's name for the reference's recipe
        return self.recipe

    def sections(self, model):
        """Three stages of the backbone (32 x 8 x 8, 64 x 4 x 4 and 128 x 2 x 2 feature maps), then the head
        (flatten and the two linear layers): slices of the Sequential, sharing its modules."""
        return [model[0:2], model[2:5], model[5:8], model[8:]]
