"""`digits-gen` and `digits-gen-dit`: class-conditional diffusion on scikit-learn's digits, upsampled to 16x16.

Two tasks share this code and differ only in the reference denoiser (a task each, so `bench run --task` picks
the backbone with no new runner setting, and each has its own published weights and results table):
- `digits-gen`: a class-conditional diffusers `UNet2DModel` (~0.93 M parameters);
- `digits-gen-dit`: a class-conditional diffusers `DiTTransformer2DModel` (~0.83 M parameters, 4 blocks, patch 2),
  whose `transformer_blocks` diffusers' cache hooks attach to.
Both are trained by the harness with DDPM's epsilon objective (`tasks._kit.diffusion.train_ddpm`) and sampled by
DDIM, 50 steps, eta 0, no guidance. The sampling interface methods wrap is documented in `tasks._kit.diffusion`.

Quality: FID (lower is better) of `EVAL_SIZE` generated images (labels i mod 10, noise from the run's seed)
against the 450 real test digits, computed by torch-fidelity with the harness's own digits classifier as the
registered feature extractor (`tasks._kit.fid`); its interval comes from jackknife pseudo-values per image. Also
logged: the classifier's accuracy on the generated digits (does image i show digit i mod 10) and PSNR.
Fidelity: mean SSIM (torchmetrics, on the uint8 images) of each image to the reference's image from the same
noise and label. Workload: one batch of the profile's image-generation size (16 on the CPU), fixed noise and
labels; items are images.

Published references (trained by `tasks._kit.diffusion.train_ddpm` with each task's recipe, one thread, on the shared
2-core machine): the UNet, 1,500 steps at batch 128 (871 s), FID 12.14 and 95.4% generated-digit accuracy on
the 500 evaluation images; the DiT, 3,000 steps at batch 128 (1,814 s). `docs/digits-gen-reference.png` and
`docs/digits-gen-dit-reference.png` show 100 samples each (`python docs/digits_gen_grid.py <task> <png>`).
Cost per denoising step at batch B (one thread, median): UNet 5.6 ms at B = 1, 28.4 ms at 16, 92.3 ms at 64;
DiT 3.1, 18.3 and 87.5 ms. The fixed per-call part (Python and framework overhead, which no caching method
removes) is at most the whole B = 1 step: up to 20% of the UNet's step at B = 16 (17% for the DiT), but at
most 6% at B = 64 (DiT: 4%), so the cpu profile times batches of 64, where both are compute-bound
(`pytest --benchmark-only tests/benchmarks/test_caching_speed.py -k overhead -s` measures it).

Artifacts, published by `bench reference build <task> --publish` with their sha256 recorded below:
`tasks/artifacts/<task>/reference.safetensors` and the feature classifier, `tasks/artifacts/digits-gen/
classifier.safetensors` (shared by both tasks).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from bench.api import CalibrationSampling, FeatureNetwork, TrainingSplit
from bench.registry import register_task
from tasks.base import ARTIFACTS, Evaluation, RunContext, Subject, Task
from tasks._kit.diffusion import DIT, SCHEDULE, UNET, DiffusionRecipe

if TYPE_CHECKING:
    import torch

CLASSIFIER_SHA256 = "4897296cbd060d317d9d5260b910143856a9648b62ac71011b6ae0cd75d38e78"
CLASSIFIER_ART = ARTIFACTS / "digits-gen" / "classifier.safetensors"
EVAL_SIZE = 500  # generated images FID is computed on (50 per class)
SMOKE_EVAL_SIZE = 40
EVAL_BATCH = 100  # images per sampling call in calibration (evaluation: the profile's [eval_batch_size], 100 on cpu)
WORKLOAD_SEED = 10_000  # the timed batch's noise: seed + WORKLOAD_SEED, disjoint from the evaluation's
CALIBRATION_SEED = 20_000  # a method's calibration noise: seed + CALIBRATION_SEED, disjoint from both
FEATURE_NET_SEED = 1  # the FeatureNetwork classifier's init and batch order (FID's classifier: seed 0)


class DigitsGenTask(Task, TrainingSplit, CalibrationSampling, FeatureNetwork):
    backbone: ClassVar[str]
    recipe: ClassVar[DiffusionRecipe]
    arch: ClassVar[dict]

    def __init__(self) -> None:
        self._loaded = False
        self.last_metrics: dict[str, float] = {}

    # ---- data -----------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        from tasks._kit.diffusion import load_digits16

        self.train, self.test = load_digits16()
        self._loaded = True

    def training_split(self):
        """The digits at 16x16 in [-1, 1] with their labels (TrainingSplit)."""
        return self.train

    def data_fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.test.x, self.test.y, self.train.x, self.train.y):
            h.update(t.contiguous().numpy().tobytes())
        h.update(f"eval {EVAL_SIZE}/{SMOKE_EVAL_SIZE}, labels i mod 10, noise seed = run seed".encode())
        return h.hexdigest()

    def real_images(self) -> "torch.Tensor":
        from tasks._kit.diffusion import to_uint8

        return to_uint8(self.test.x)

    # ---- models ---------------------------------------------------------------------------------------------
    def build_reference(self):
        from tasks._kit import diffusion

        return diffusion.build_unet() if self.backbone == "unet" else diffusion.build_dit()

    def train_reference(self, ctx: RunContext) -> dict:
        from tasks._kit.diffusion import train_ddpm

        model = self.build_reference()
        seconds, loss = train_ddpm(model, self.train, self.recipe, ctx, f"Training the {self.spec.name} reference")
        ctx.progress.log(f"{self.spec.name} reference: {seconds:.0f} s, final loss (EMA) {loss:.4f}")
        return model.state_dict()

    def reference_cache_path(self, ctx: RunContext) -> Path:
        from bench import cache

        k = cache.key(self.spec.version, ctx.budget, ctx.device, self.recipe, self.arch, SCHEDULE,
                      self.data_fingerprint())
        return cache.cache_dir() / "tasks" / self.spec.name / f"v{self.spec.version}" / f"reference-{k}.safetensors"

    def prepare(self, model, ctx: RunContext) -> Subject:
        from tasks._kit.diffusion import sampling_extra

        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        return Subject(model, self.spec.modality, sampling_extra(self.backbone))

    def classifier_path(self, ctx: RunContext) -> Path:
        """The feature classifier's weights file: the published artifact when intact, else a cached build."""
        from bench import cache
        from tasks._kit import fid

        if CLASSIFIER_SHA256 and cache.load_weights(CLASSIFIER_ART, CLASSIFIER_SHA256) is not None:
            return CLASSIFIER_ART
        if CLASSIFIER_SHA256:
            warnings.warn(f"{CLASSIFIER_ART} is missing or does not match its sha256; FID uses a locally trained "
                          f"classifier", stacklevel=2)
        k = cache.key(ctx.budget, ctx.device, fid.CLASSIFIER_RECIPE, self.data_fingerprint())
        path = cache.cache_dir() / "tasks" / "digits-gen" / f"classifier-{k}.safetensors"
        cache.cached_weights(path, lambda: fid.train_classifier(self.train, ctx))
        return path

    def feature_network(self, ctx: RunContext):
        """FeatureNetwork: a digits classifier of FID's architecture and recipe (`fid.CLASSIFIER_RECIPE`) but its own
        initialisation and batch order (seed `FEATURE_NET_SEED`), trained once per machine and cached; frozen. It
        maps images in [-1, 1] to [16 x 8 x 8, 32 x 4 x 4, 64] features (the two conv stages, the penultimate layer).
        Not FID's extractor itself: a discriminator on that network's features would optimise the metric directly
        (a design change from ADD's issue, which named "the task's feature classifier")."""
        import torch
        from torch import nn

        from bench import cache
        from tasks._kit import fid
        from tasks._kit.classification import fit

        def build() -> dict:
            net = fid.build_classifier()
            torch.manual_seed(FEATURE_NET_SEED)
            for m in net:
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            fit(net, self.train, fid.CLASSIFIER_RECIPE, ctx, seed=FEATURE_NET_SEED,
                description="Training the digits-gen discriminator-feature classifier")
            return net.state_dict()

        k = cache.key("feature-network", FEATURE_NET_SEED, ctx.budget, ctx.device, fid.CLASSIFIER_RECIPE,
                      self.data_fingerprint())
        state, _, _ = cache.cached_weights(cache.cache_dir() / "tasks" / "digits-gen" / f"features-{k}.safetensors",
                                           build)
        net = fid.build_classifier()
        net.load_state_dict(state)

        class Stages(nn.Module):
            def __init__(self, body):
                super().__init__()
                self.body = body

            def forward(self, x):
                h1 = self.body[:3](x)
                h2 = self.body[3:6](h1)
                return [h1, h2, self.body[6:8](h2)]

        out = Stages(net[:8]).to(ctx.device).eval()
        for p in out.parameters():
            p.requires_grad_(False)
        return out

    def build_artifacts(self, ctx: RunContext, publish: bool) -> tuple[str, Path]:
        """`bench reference build`: the feature classifier and this task's reference, into the cache, and with
        `publish` into tasks/artifacts/. Returns the reference's sha256 and path."""
        from bench import cache
        from tasks._kit import fid

        clf = fid.train_classifier(self.train, ctx)
        ctx.progress.log(f"digits-gen classifier: sha256 {cache.save_weights(self._clf_cache(ctx), clf)}")
        state = self.train_reference(ctx)
        path = self.reference_cache_path(ctx)
        digest = cache.save_weights(path, state)
        if publish:
            for target, tensors in ((CLASSIFIER_ART, clf), (ARTIFACTS / self.spec.name / "reference.safetensors",
                                                            state)):
                cache.save_weights(target, tensors)
                target.with_name(target.name + ".sha256").unlink(missing_ok=True)  # the module records the published hash
            path = ARTIFACTS / self.spec.name / "reference.safetensors"
        return digest, path

    def _clf_cache(self, ctx: RunContext) -> Path:
        from bench import cache
        from tasks._kit import fid

        k = cache.key(ctx.budget, ctx.device, fid.CLASSIFIER_RECIPE, self.data_fingerprint())
        return cache.cache_dir() / "tasks" / "digits-gen" / f"classifier-{k}.safetensors"

    # ---- measurement ----------------------------------------------------------------------------------------
    def generate(self, subject: Subject, ctx: RunContext) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(uint8 images, labels) of the evaluation set: deterministic for a fixed seed and subject."""
        from tasks._kit.diffusion import eval_inputs, generate, to_uint8

        n = ctx.budget.pick(EVAL_SIZE, SMOKE_EVAL_SIZE)
        noise, labels = eval_inputs(n, ctx.seed, ctx.device, ctx.torch_dtype)
        return to_uint8(generate(subject, noise, labels, ctx.eval_batch_size)), labels.cpu()

    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        import torch

        from tasks._kit import fid

        images, labels = self.generate(subject, ctx)
        weights = self.classifier_path(ctx)
        value = fid.torch_fidelity_fid(images, self.real_images(), weights)
        gen_feats = fid.features(images, weights)
        real_mu, real_s = fid.gaussian(fid.features(self.real_images(), weights))
        per_image = fid.jackknife(gen_feats, real_mu, real_s, value)
        clf = fid.build_classifier()
        from safetensors.torch import load_file

        clf.load_state_dict(load_file(str(weights)))
        with torch.inference_mode():
            pred = clf.eval()(fid.uint8_to_input(images)).argmax(1)
        self.last_metrics = {"fid": value, "class_accuracy": float((pred == labels).double().mean())}
        ctx.progress.log(f"{self.spec.name}: FID {value:.3f} (torch-fidelity, {EXTRACTOR_DESC}), generated-digit "
                         f"accuracy {self.last_metrics['class_accuracy']:.4f}, n = {images.shape[0]}")
        return Evaluation(value, per_image, images.squeeze(1).numpy(),
                          metrics={"class_accuracy": self.last_metrics["class_accuracy"]})

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return "ssim_to_reference", image_fidelity(reference.outputs, method.outputs)["ssim"]

    def sample_calibration(self, subject: Subject, n: int, ctx: RunContext) -> "torch.Tensor":
        """CalibrationSampling: the subject's sampler on `n` inputs of seed + CALIBRATION_SEED (balanced labels)."""
        from tasks._kit.diffusion import eval_inputs, generate

        noise, labels = eval_inputs(n, ctx.seed + CALIBRATION_SEED, ctx.device, ctx.torch_dtype)
        return generate(subject, noise, labels, EVAL_BATCH)

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        from tasks._kit.diffusion import eval_inputs, sample

        noise, labels = eval_inputs(ctx.batch_size, ctx.seed + WORKLOAD_SEED, ctx.device, ctx.torch_dtype)
        return (lambda: sample(subject, noise, labels)), ctx.batch_size, \
            f"seconds to generate {ctx.batch_size} images (fixed noise and labels) with the subject's sampler"


EXTRACTOR_DESC = "features: the harness's digits classifier"


def image_fidelity(reference_images, method_images) -> dict[str, float]:
    """PSNR (dB, over the whole set; inf when identical) and mean SSIM of uint8 images (N x 16 x 16)."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    a = torch.as_tensor(np.asarray(reference_images), dtype=torch.float64).unsqueeze(1) / 255
    b = torch.as_tensor(np.asarray(method_images), dtype=torch.float64).unsqueeze(1) / 255
    mse = float(((a - b) ** 2).mean())
    return {"psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1 / mse)),
            "ssim": float(ssim(b, a, data_range=1.0, kernel_size=7))}


@register_task("digits-gen", modality="image-generation", tier="embedded", metric="fid", higher_is_better=False,
               quality_budget="2%",  # FID within +-2% of the reference (MLPerf-style tolerance)
               version="1", summary="class-conditional diffusion on 16x16 digits; 0.93M-param UNet, DDIM-50; "
                                    "FID with a digits-classifier feature extractor")
class DigitsGen(DigitsGenTask):
    backbone = "unet"
    arch = UNET
    reference_sha256 = "d6054bb2b8e8dabbbbbe51df94da2d1f753641747aa7b87f95b42bccb7cae997"
    recipe = DiffusionRecipe(steps=1500, batch_size=128, lr=1e-3)


@register_task("digits-gen-dit", modality="image-generation", tier="embedded", metric="fid", higher_is_better=False,
               quality_budget="2%",  # FID within +-2% of the reference (MLPerf-style tolerance)
               version="1", summary="class-conditional diffusion on 16x16 digits; 0.83M-param DiT (4 blocks, "
                                    "patch 2), DDIM-50; FID with a digits-classifier feature extractor")
class DigitsGenDiT(DigitsGenTask):
    backbone = "dit"
    arch = DIT
    reference_sha256 = "f82888c7942d40433c9df88b1df2adaa2920d164c85f784d3a05d0e27094328e"
    # 3,000 steps: at 1,500 the DiT drew wobbly digits (80-90% class accuracy on 200 samples; 93% at 3,000)
    recipe = DiffusionRecipe(steps=3000, batch_size=128, lr=1e-3)
