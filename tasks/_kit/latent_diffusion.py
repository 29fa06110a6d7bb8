"""What the full latent-diffusion tasks (`coco`, `imagenet-fid`) share: a diffusers pipeline loaded from the hub
or a local folder, sampled through the project's one loop, FID with per-image intervals, fidelity to the
reference's images, and the timed workload.

Subject: `Subject.model` is the pipeline's denoiser (`UNet2DConditionModel` for Stable Diffusion,
`DiTTransformer2DModel` for DiT), what the caching and pruning methods transform. The rest of the pipeline
(VAE, text encoder, tokenizer) stays in the loaded pipeline object, used by the closures in `Subject.extra`,
which follow `tasks._kit.diffusion`'s sampling interface: `scheduler` (DDIM built `from_config` of the checkpoint's
own scheduler config, so the noise schedule and timestep spacing are the checkpoint's), `num_inference_steps`,
`guidance_scale`, `denoise` (classifier-free guidance with the conditional and unconditional rows in one
batched call, in the order the diffusers pipeline uses), `decode` (the VAE: latents / scaling_factor) and
`backbone`. The caching methods and the samplers therefore apply unchanged.

Why not the pipeline's own `__call__`: the methods need the denoiser call of every step with its step index, a
scheduler they can swap and a reset at every batch start; the pipelines expose only a step-end callback. So the
loop is `tasks._kit.diffusion.sample`, and the tests check that it gives the pipeline's own images from the same
initial noise (to float tolerance) for both pipelines.

Evaluation: `n` images (the profile's `[eval_size]` for the task; `SMOKE_EVAL_SIZE` under `--budget smoke`),
image i from its own seeded noise (`fid_stats.per_image_noise`, run seed) and its own conditioning, generated
at the profile's image-generation batch size; FID against the task's reference statistics (`tasks._kit.fid_stats`),
per-image pseudo-values for the interval. Fidelity: mean SSIM (torchmetrics) of the first `FIDELITY_IMAGES`
images to the reference's images from the same noise and conditioning; those images are kept in the bench cache
under their content's sha256 (the cached evaluation record names the file). Workload: one batch of the profile's
image-generation size, end to end (conditioning, every denoising step, VAE decode); items are images.

Identity: the reference's sha256 is over all the pipeline's weights (denoiser, VAE, text encoder), as loaded;
`reference_canonical` is False (no published hash: the checkpoints could not be downloaded where this was
written). Models are `tasks._kit.pretrained` sources: a local diffusers folder (model_index.json and one subfolder
per component, as `save_pretrained` writes it) or a hub id, `org/name@revision` to pin.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from bench.api import CalibrationSampling, Pipeline
from tasks._kit.pretrained import Pretrained
from tasks.base import Evaluation, ReferenceWeights, RunContext, Subject, Task

if TYPE_CHECKING:
    import torch

SMOKE_EVAL_SIZE = 4  # images evaluated under --budget smoke
SMOKE_WORKLOAD = 2  # images per timed call under --budget smoke
FIDELITY_IMAGES = 64  # the first images, kept to compare with the reference's (SSIM)
WORKLOAD_SEED = 10_000  # the timed batch's noise seed: run seed + WORKLOAD_SEED, disjoint from the evaluation's
CALIBRATION_SEED = 20_000  # a method's calibration noise: run seed + CALIBRATION_SEED, disjoint from both
# torch-fidelity's Inception weights (`torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3`, a test keeps
# the two equal), downloaded into torch's hub cache on first use: named here so the preflight need not import it
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


def pipeline_hint(env: str) -> str:
    return (f"Set {env} to a local diffusers pipeline folder (model_index.json and the component subfolders, as "
            f"`DiffusionPipeline.save_pretrained` writes them) or to a hub id such as org/name or org/name@revision")


def data_root() -> Path:
    """`$BENCH_DATA`, else `<bench cache>/data` (the convention of `tasks.cifar10`). Not created: what writes
    there creates it, and a preflight may ask before the cache exists."""
    from bench import cache

    env = os.environ.get("BENCH_DATA")
    return Path(env).expanduser() if env else cache.cache_root() / "data"


def fid_weights_problem() -> str | None:
    """Why the FID features cannot be computed here, found without importing torch-fidelity: a `BENCH_FID_WEIGHTS`
    file that does not exist, or the default Inception's weights neither in torch's hub cache nor downloadable."""
    from bench import preflight
    from tasks._kit import fid_stats

    weights = os.environ.get(fid_stats.WEIGHTS_ENV, "").strip()
    if weights:
        if Path(weights).expanduser().is_file():
            return None
        return f"{fid_stats.WEIGHTS_ENV}={weights}: no such file (the FID feature extractor's weights)"
    if (os.environ.get(fid_stats.EXTRACTOR_ENV, "").strip() or fid_stats.DEFAULT_EXTRACTOR) != "inception-v3-compat":
        return None  # another extractor: its own download, not known here
    import torch

    name = INCEPTION_URL.rsplit("/", 1)[1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return None
    net = preflight.url_reachable(INCEPTION_URL)
    if net.ok:
        return None
    return (f"FID needs torch-fidelity's Inception weights, downloaded on first use from {INCEPTION_URL}, which "
            f"this machine cannot reach ({net.why}), and torch's hub cache has no copy ({cached}). Set "
            f"{fid_stats.WEIGHTS_ENV} to a local copy of {name}, or put one at {cached}")


def pipeline_source(env: str, default: str):
    from tasks._kit import pretrained

    try:
        return pretrained.model_source(env, default)
    except pretrained.PretrainedNotFound as e:
        raise pretrained.PretrainedNotFound(f"{env}={os.environ.get(env)}: no such folder. "
                                            f"{pipeline_hint(env)}") from e


def load_pipeline(cls, source, what: str, **kwargs):
    """`cls.from_pretrained` (weights in their stored dtype), with an error that names the variable."""
    from tasks._kit.pretrained import PretrainedNotFound

    try:
        return cls.from_pretrained(source.path, revision=source.revision, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise PretrainedNotFound(f"could not load the {what} ({cls.__name__}) from {source.describe()} "
                                 f"({source.env}): {e}\n{pipeline_hint(source.env)}") from e


def pipeline_sha256(pipe) -> str:
    """sha256 over every weight-bearing component's `state_sha256`, by component name."""
    import torch

    from tasks._kit.pretrained import state_sha256

    h = hashlib.sha256()
    for name, module in sorted(pipe.components.items()):
        if isinstance(module, torch.nn.Module):
            h.update(f"{name}:{state_sha256(module.state_dict())}\n".encode())
    return h.hexdigest()


def vae_decode(vae) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """latents -> images in [-1, 1], as the pipelines decode (latents / scaling_factor, plus shift if any)."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def decode(latents):
        return vae.decode(latents / scale + shift).sample

    return decode


def save_images(images: "torch.Tensor", folder: Path) -> Path:
    """uint8 images, kept under the sha256 of their bytes (written once, atomically, with a sha256 sidecar)."""
    from bench import cache

    images = images.contiguous().cpu()
    path = folder / f"{hashlib.sha256(images.numpy().tobytes()).hexdigest()}.safetensors"
    if cache.load_weights(path) is None:
        cache.save_weights(path, {"images": images})
    return path


def load_images(path: str) -> "torch.Tensor":
    from bench import cache

    hit = cache.load_weights(Path(path))
    if hit is None:
        raise FileNotFoundError(f"the images kept for the fidelity comparison are missing or damaged: {path}. They "
                                f"live in the bench cache beside the cached reference evaluation; clear "
                                f"<bench cache>/evals to evaluate the reference again")
    return hit[0]["images"]


class LatentDiffusionTask(Pretrained, Task, Pipeline, CalibrationSampling):
    """A full task on a diffusers latent-diffusion pipeline (see the module docstring); its reference is the
    loaded pipeline's denoiser, kept as `Pretrained` keeps a checkpoint (`subject_from_state` reuses it). Subclasses load their
    data and reference statistics in `load` (setting `n`, `reference_stats`, `data_digest`) and define the
    conditioning and the sampling extras."""

    reference_sha256 = None  # no pinned artifact: the hash of the weights as loaded is recorded
    reference_env: ClassVar[str]  # the variable naming the pipeline (folder or hub id)
    reference_id: ClassVar[str]  # the default hub id
    pipeline_class: ClassVar[str]  # diffusers pipeline class name
    backbone_attr: ClassVar[str]  # the pipeline's denoiser attribute ("unet", "transformer")
    num_inference_steps: ClassVar[int]  # the reference sampler's DDIM steps
    guidance_scale: ClassVar[float]  # the reference's classifier-free guidance scale

    def __init__(self) -> None:
        self._loaded = False
        self._pipe = None
        self._kept: "tuple[dict, torch.nn.Module] | None" = None
        self.last_metrics: dict[str, float] = {}

    # ---- what the task needs -----------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """The evaluation size (the profile's, unless smoke), the reference pipeline and the FID features'
        weights; a subclass adds its data (`super().preflight(...) + ...`)."""
        from tasks._kit import pretrained

        problems = []
        name, profile = self.spec.name, ctx.profile
        if not ctx.budget.smoke and name not in profile.eval_size:
            from bench.profiles import load_profile, profile_names

            sizes = [f"{n} ({load_profile(n).eval_size[name]:,} images)" for n in profile_names()
                     if name in load_profile(n).eval_size]
            problems.append(
                f"{name} evaluates as many images as the profile sets, and profile {profile.name!r} sets none (it "
                f"has no `{name} = N` under [eval_size] in bench/profiles/{profile.name}.toml). Use a profile that "
                f"does: {', '.join(sizes) or 'none yet'}; or --budget smoke, which generates {SMOKE_EVAL_SIZE} "
                f"images on any profile (a check run, not a result)")
        problems.append(pretrained.source_problem(self.reference_env, self.reference_id, f"{name} reference pipeline",
                                                  marker="model_index.json", hint=pipeline_hint(self.reference_env),
                                                  make=pipeline_source))
        problems.append(fid_weights_problem())
        return [p for p in problems if p]

    # ---- data ---------------------------------------------------------------------------------------------
    def eval_size(self, ctx: RunContext) -> int:
        """Images per evaluation: the profile's `[eval_size]` entry for this task (smoke: `SMOKE_EVAL_SIZE`, on
        any profile, whether or not it sets a size)."""
        if ctx.budget.smoke:
            return SMOKE_EVAL_SIZE
        return ctx.profile.eval_size_for(self.spec.name)

    def data_fingerprint(self) -> str:
        from tasks._kit import fid_stats

        return hashlib.sha256(json.dumps({
            "data": self.data_digest, "reference_statistics": fid_stats.stats_digest(self.reference_stats),
            "features": self.fid.identity(), "n": self.n, "resolution": self.resolution,
            "sampler": ["DDIM", self.num_inference_steps, self.guidance_scale], "noise": "per image, run seed",
        }, sort_keys=True).encode()).hexdigest()

    def load_common(self, ctx: RunContext) -> None:
        """What every subclass's `load` starts with: the FID features and the image size."""
        from tasks._kit import fid_stats

        self.fid = fid_stats.fid_config()
        self.n = self.eval_size(ctx)
        self.resolution = self.image_size()

    def stats_cache(self, *parts) -> Path:
        from bench import cache

        return cache.cache_dir() / "tasks" / self.spec.name / f"real-stats-{cache.key(*parts)}.npz"

    # ---- models -------------------------------------------------------------------------------------------
    def reference_source(self):
        return pipeline_source(self.reference_env, self.reference_id)

    def pipeline_kwargs(self) -> dict:
        return {}

    def pipeline(self, ctx: RunContext):
        if self._pipe is None:
            import diffusers

            src = self.reference_source()
            with ctx.progress.step(f"Loading the {self.spec.name} reference pipeline from {src.describe()}"):
                self._pipe = load_pipeline(getattr(diffusers, self.pipeline_class), src,
                                           f"{self.spec.name} reference", **self.pipeline_kwargs())
        return self._pipe

    def image_size(self) -> int:
        """Generated images' side: the denoiser's sample size times the VAE's downsampling factor (read from the
        configs, without loading weights)."""
        import diffusers

        src = self.reference_source()
        backbone = getattr(diffusers, self.backbone_class())
        try:
            b = backbone.load_config(src.path, subfolder=self.backbone_attr, revision=src.revision)
            v = diffusers.AutoencoderKL.load_config(src.path, subfolder="vae", revision=src.revision)
        except (OSError, ValueError) as e:
            from tasks._kit.pretrained import PretrainedNotFound

            raise PretrainedNotFound(f"could not read the {self.spec.name} pipeline's configs from "
                                     f"{src.describe()} ({src.env}): {e}\n{pipeline_hint(src.env)}") from e
        return int(b["sample_size"]) * 2 ** (len(v["block_out_channels"]) - 1)

    def backbone_class(self) -> str:
        return {"unet": "UNet2DConditionModel", "transformer": "DiTTransformer2DModel"}[self.backbone_attr]

    def build_reference(self):
        import diffusers

        if self._kept is not None:
            model = self._kept[1]
            return type(model).from_config(model.config)
        src, cls = self.reference_source(), getattr(diffusers, self.backbone_class())
        return cls.from_config(cls.load_config(src.path, subfolder=self.backbone_attr, revision=src.revision))

    def train_reference(self, ctx: RunContext) -> dict:
        """A published checkpoint is not trained here: the reference's weights are the loaded ones."""
        return self.reference_weights(ctx).state

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        pipe, src = self.pipeline(ctx), self.reference_source()
        backbone = getattr(pipe, self.backbone_attr)
        state = backbone.state_dict()
        self._kept = (state, backbone)
        where = src.path if src.local else f"hf://{src.path}@{src.revision or 'main'}"
        return ReferenceWeights(state, pipeline_sha256(pipe), False, where)

    def prepare(self, model, ctx: RunContext) -> Subject:
        pipe = self.pipeline(ctx)
        pipe.to(ctx.device, ctx.torch_dtype)
        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        extra = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                 "decode": vae_decode(pipe.vae), "backbone": "unet" if self.backbone_attr == "unet" else "dit"}
        from diffusers import DDIMScheduler

        extra["scheduler"] = DDIMScheduler.from_config(pipe.scheduler.config)
        extra.update(self.sampling_extra(pipe, model, ctx))
        return Subject(model, self.spec.modality, extra)

    # ---- what a subclass defines ----------------------------------------------------------------------------
    @abstractmethod
    def sampling_extra(self, pipe, model, ctx: RunContext, guidance_scale: float | None = None) -> dict:
        """`denoise` (with its guidance: the task's scale, or `guidance_scale`) and whatever else the subject
        needs beyond the common keys."""

    @abstractmethod
    def conditioning(self, subject: Subject, indices: list[int], ctx: RunContext) -> Callable[[], "torch.Tensor"]:
        """A function giving the `labels` of images `indices` (called inside the timed region)."""

    def begin_metrics(self, ctx: RunContext) -> None:
        """Start the task's other metrics (CLIP score) for one evaluation; none by default."""

    def on_generated(self, images: "torch.Tensor", indices: list[int], ctx: RunContext) -> None:
        """Feed a generated batch (uint8, on the profile's device) to the task's other metrics; none by default."""

    def end_metrics(self) -> dict[str, float]:
        return {}

    # ---- measurement --------------------------------------------------------------------------------------
    TRAIN_CONDITION_OFFSET = 1_000_000  # training conditions come from indices past any evaluation's

    def training_conditions(self, subject: Subject, n: int, ctx: RunContext) -> "torch.Tensor":
        """The conditioning of indices past any evaluation's (Pipeline); coco uses captions instead."""
        idx = list(range(self.TRAIN_CONDITION_OFFSET, self.TRAIN_CONDITION_OFFSET + n))
        return self.conditioning(subject, idx, ctx)()

    def noise(self, subject: Subject, indices, seed: int, ctx: RunContext) -> "torch.Tensor":
        from tasks._kit.fid_stats import per_image_noise

        m = subject.model.config
        shape = (m.in_channels, m.sample_size, m.sample_size)
        return per_image_noise(indices, shape, seed).to(device=ctx.device, dtype=ctx.torch_dtype)

    def sample_calibration(self, subject: Subject, n: int, ctx: RunContext) -> "torch.Tensor":
        """CalibrationSampling: the subject's sampler on noise of seed + CALIBRATION_SEED and the training
        conditions (indices past any evaluation's), in batches of the run's size; the decoded images."""
        import torch

        from tasks._kit.diffusion import sample

        out, cond = [], self.training_conditions(subject, n, ctx)
        for start in range(0, n, ctx.batch_size):
            idx = list(range(start, min(start + ctx.batch_size, n)))
            out.append(sample(subject, self.noise(subject, idx, ctx.seed + CALIBRATION_SEED, ctx),
                              cond[start:start + len(idx)]))
        return torch.cat(out)

    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        import numpy as np
        import torch

        from bench import cache
        from tasks._kit import fid_stats
        from tasks._kit.diffusion import sample, to_uint8

        extractor, feats, kept = fid_stats.create_extractor(self.fid, ctx.device), [], []
        self.begin_metrics(ctx)
        with ctx.progress.step(f"Generating {self.n} images ({self.spec.name})", total=self.n) as advance:
            for start in range(0, self.n, ctx.eval_batch_size):  # the profile's evaluation batch
                idx = list(range(start, min(start + ctx.eval_batch_size, self.n)))
                labels = self.conditioning(subject, idx, ctx)()
                images = to_uint8(sample(subject, self.noise(subject, idx, ctx.seed, ctx), labels))
                feats.append(fid_stats.extract(extractor, images, self.fid.layer))
                self.on_generated(images.to(ctx.device), idx, ctx)
                if start < FIDELITY_IMAGES:
                    kept.append(images[:FIDELITY_IMAGES - start])
                advance(len(idx))
        feats = np.concatenate(feats)
        value = fid_stats.fid_value(fid_stats.statistics(feats), self.reference_stats)
        per_image = fid_stats.pseudo_values(feats, self.reference_stats, value)
        path = save_images(torch.cat(kept), cache.cache_dir() / "tasks" / self.spec.name / "images")
        secondary = self.end_metrics()
        self.last_metrics = {"fid": value, **secondary}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items())
        ctx.progress.log(f"{self.spec.name}: {shown} (features {self.fid.describe()}), n = {self.n}")
        return Evaluation(value, per_image, np.asarray([str(path)]), metrics=secondary)  # recorded beside FID

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return "ssim_to_reference", image_ssim(load_images(str(reference.outputs[0])),
                                               load_images(str(method.outputs[0])))

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        from tasks._kit.diffusion import sample

        m = ctx.budget.pick(ctx.batch_size, min(ctx.batch_size, SMOKE_WORKLOAD))
        idx = list(range(m))
        noise, labels = self.noise(subject, idx, ctx.seed + WORKLOAD_SEED, ctx), self.conditioning(subject, idx, ctx)
        steps = subject.extra.get("num_inference_steps")
        return (lambda: sample(subject, noise, labels())), m, \
            (f"seconds to generate {m} images of {self.resolution}x{self.resolution} end to end (conditioning, "
             f"the subject's sampler, {steps} steps for the reference's DDIM, VAE decode)")


def image_ssim(reference: "torch.Tensor", method: "torch.Tensor", chunk: int = 8) -> float:
    """Mean SSIM (torchmetrics, Gaussian 11x11, data range 1) of uint8 images paired by index."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    n = min(reference.shape[0], method.shape[0])
    scores = [ssim(method[i:i + chunk].float() / 255, reference[i:i + chunk].float() / 255, data_range=1.0,
                   reduction="none") for i in range(0, n, chunk)]
    return float(torch.cat([s.reshape(-1) for s in scores]).mean())
