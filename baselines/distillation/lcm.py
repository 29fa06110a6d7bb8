"""`lcm`: latent consistency models (Luo et al. 2023, arXiv:2310.04378): consistency distillation (Song et al.
2023, arXiv:2303.01469) of the task's reference into a model that samples in 1 to 8 steps with diffusers'
`LCMScheduler`.

The student is the reference's own denoiser (initialised from it), read through the consistency function

    f_theta(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t),   x0_theta = (x - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)

with c_skip, c_out of `LCMScheduler.get_scalings_for_boundary_condition_discrete` (sigma_data 0.5, timestep
scaling 10), so f(x, 0) = x exactly and the trained epsilon-network samples correctly with `LCMScheduler`.
Training (`_lcm.distil`, the paper's Algorithm 1): x_{t_{n+k}} from the data by the forward process, one DDIM
step of the frozen reference from t_{n+k} to t_n (the ODE solver, skipping k of the 1,000 training timesteps),
and the pseudo-Huber distance between f_theta(x_{t_{n+k}}) and the EMA target network's f_theta-(x_{t_n}).

Skipping step: the paper's k = 20 on a 1,000-step schedule (T / k = 50 grid points, LCMScheduler's default
`original_inference_steps`; on `digits-gen` exactly the reference's own DDIM-50 grid, 999, 979, ..., 19). The
default here is k = 50 (a 20-point grid, 49, 99, ..., 999): on digits-gen's CPU budget it distilled better (see
`LCMConfig.skip`); `original_inference_steps` = 1000 / k at sampling keeps LCMScheduler on the trained grid.

Two choices the paper does not make, both for a pixel-space model on DDPM's linear schedule (abar_999 = 4e-5,
where an x0 estimate multiplies epsilon errors by 160; SD's latent schedule ends at 5e-3): f clips x0 to the
data range wherever the reference sampler does (so the trained f is the one `LCMScheduler.step` computes), and
the distance is weighted by sqrt(abar_t / (1 - abar_t)) (`weighting`="snr"; "uniform" is the paper's). Measured
on digits-gen at 100 steps, 4-step FID: 231 with neither, 78 with the clip, 44 with both (92 untrained).

Guidance: LCD folds classifier-free guidance into the solver (the teacher's eps is eps_u + w (eps_c - eps_u)),
and LCM conditions the student on w through an embedding. The digits-gen references are purely conditional
(no unconditional branch): w does not apply there and no guidance embedding is added. On the full tasks the
training path's solver is the reference's own guided eps (w = the task's scale: 7.5 on coco, 1.5 on
imagenet-fid), fixed, so no w embedding either (as LCM-LoRA, which conditions on no w); the student is then
sampled conditionally (`guidance_scale` 1, one network call per step).

Per task:
- `digits-gen`, `digits-gen-dit`: trains on the task's training digits (the paper trains on data), one timestep
  per row; the student is cached by `bench.cache` under everything that shapes its weights, with its training
  seconds and steps beside it.
- `coco`: by default loads the published LCM-LoRA for SD v1.5 (`latent-consistency/lcm-lora-sdv1-5`, Luo et
  al. 2023b, arXiv:2311.05556; `lora` may name a local folder) with diffusers' LoRA loader (`lora_state_dict`
  and `load_lora_into_unet`, the two steps of `load_lora_weights`, on a copy of the UNet so the reference stays
  untouched; needs `peft`), fused into the weights; `published=false` distils instead.
- `imagenet-fid` (and `coco` with `published=false`): trains data-free on x0 latents drawn from the reference's
  own guided sampler (`teacher_samples` of them; coco's captions for them are COCO captions outside the
  evaluation's subset; imagenet's classes cycle), one timestep per batch.

Sampling: `LCMScheduler` from the reference's scheduler config (its noise schedule and x0 clip) with
`original_inference_steps` = 1000 / k, `num_inference_steps` steps. Its step injects fresh noise between steps
from a generator; the subject's scheduler (`_lcm.seeded_lcm_scheduler`) seeds one generator per image from
the image's initial noise, so the task's loop stays deterministic given (noise, labels) and an image does not
depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import Pipeline, TrainingSplit, offers, require
from bench.registry import register_method

LCM_LORA_SD15 = "latent-consistency/lcm-lora-sdv1-5"
# pipelines (by hub id) with published LCM weights: their reference is distilled already
PUBLISHED = {"stable-diffusion-v1-5/stable-diffusion-v1-5": LCM_LORA_SD15}
TRAIN_CONDITION_OFFSET = 1_000_000  # imagenet-fid: training samples' indices, disjoint from the evaluation's


@dataclass(frozen=True)
class LCMConfig:
    # LCMScheduler steps at sampling; the paper reports 1, 2, 4 and 8 and recommends 4 (its main setting)
    num_inference_steps: int = 4
    # k, the skipping step. The paper uses 20 on 1,000 training steps (a 50-point grid: on digits-gen the
    # reference's own DDIM-50 grid) and its ablation prefers it at SD's budget; on digits-gen at 100 steps the
    # 4-step FID was 44 at k = 20, 32 at k = 50 and 44 at k = 100: a 20-point grid needs fewer steps to carry
    # consistency from t = 0 to t = 999 (measured, see the README note)
    skip: int = 50
    # optimiser steps. digits-gen at batch 64 (2-core CPU), FID at 4 / 8 sampling steps: 200 steps (64 s) 34.3 /
    # 16.1; 800 steps (242 s) 47.8 / 20.3 (its 1-step sample improves, 4-step does not). 200 is the better default
    steps: int = 200
    batch_size: int = 64  # training rows per step
    lr: float = 3e-4  # Adam (digits-gen at 100 steps: 1e-3 was worse, 4-step FID 132 against 44)
    ema_decay: float = 0.95  # mu of the target network's EMA, the paper's value
    loss: Literal["huber", "l2"] = "huber"  # distance d: pseudo-Huber (the LCM scripts' choice) or squared L2
    huber_c: float = 0.001  # c of the pseudo-Huber distance (the LCM scripts' default)
    # lambda(t): "uniform" is the paper's; "snr" (sqrt(abar_t / (1 - abar_t))) measures the distance in epsilon
    # units. digits-gen's linear schedule ends at abar = 4e-5, where x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    # scales epsilon errors by 160, so the uniform loss is all t = 999 (4-step FID 78 uniform, 44 snr, 100 steps)
    weighting: Literal["snr", "uniform"] = "snr"
    # classifier-free guidance at sampling on tasks that have it (coco, imagenet-fid): 1 = conditional only, one
    # call per step (LCM-LoRA's recommended 1-2); must stay 1 on digits-gen, whose references have no
    # unconditional branch
    guidance_scale: float = 1.0
    published: bool = True  # coco: load the published LCM-LoRA rather than distil (no effect elsewhere)
    lora: str = LCM_LORA_SD15  # the LCM-LoRA: a hub id (org/name or org/name@revision) or a local folder
    teacher_samples: int = 256  # full tasks' training path: x0 latents drawn from the reference's sampler

    def validate(self) -> None:
        check_range("num_inference_steps", self.num_inference_steps, lo=1, hi=1000)
        check_range("skip", self.skip, lo=1, hi=1000)
        if self.num_inference_steps > 1000 // self.skip:
            raise ConfigError(f"num_inference_steps={self.num_inference_steps} exceeds the {1000 // self.skip} "
                              f"points of the skip={self.skip} grid (LCMScheduler samples a subset of it): lower "
                              f"num_inference_steps or skip")
        check_range("steps", self.steps, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("ema_decay", self.ema_decay, lo=0, hi=1)
        check_range("huber_c", self.huber_c, lo=0)
        check_range("guidance_scale", self.guidance_scale, lo=0)
        check_range("teacher_samples", self.teacher_samples, lo=1)
        if not self.lora.strip():
            raise ConfigError("lora must name the LCM-LoRA (a hub id or a local folder); use published=false to "
                              "distil instead")


def load_lcm_lora(unet, pipeline_cls, source: str):
    """A copy of `unet` with the LCM-LoRA at `source` (local folder, or hub id with optional @revision) loaded by
    diffusers' LoRA loader and fused into its weights: W + (alpha / r) B A for every adapted layer."""
    import copy
    from pathlib import Path

    folder = Path(source).expanduser()
    kwargs = {}
    if folder.is_dir():
        where = str(folder.resolve())
    else:
        where, _, rev = source.partition("@")
        kwargs = {"revision": rev} if rev else {}
    try:
        state, alphas = pipeline_cls.lora_state_dict(where, **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the LCM-LoRA from {source!r}: {e}. Set lora= to a local folder "
                                f"holding pytorch_lora_weights.safetensors, or to a hub id (default "
                                f"{LCM_LORA_SD15})") from e
    foreign = sorted({k.split(".", 1)[0] for k in state if not k.startswith("unet.")})
    if foreign:
        raise ValueError(f"the LoRA at {source!r} adapts {foreign} besides the UNet; only UNet LoRAs are supported "
                         f"(the text encoder is shared with the reference)")
    model = copy.deepcopy(unet)
    pipeline_cls.load_lora_into_unet(state, alphas, model)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return model


@register_method("lcm", family="distillation", paper="Luo et al., Latent Consistency Models: Synthesizing "
                 "High-Resolution Images with Few-Step Inference", year=2023, url="https://arxiv.org/abs/2310.04378",
                 modalities=("image-generation",),
                 summary="consistency distillation of the reference (DDIM solver, skipping step, EMA target) "
                         "sampled in 1-8 steps by LCMScheduler; the published LCM-LoRA on coco",
                 requires=((TrainingSplit, Pipeline),))
class LatentConsistency(Method):
    Config = LCMConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.decoding._samplers import check_diffusion_subject, with_scheduler
        from baselines.distillation._lcm import seeded_lcm_scheduler

        cfg = self.config
        check_diffusion_subject(subject, "lcm")
        guided = subject.extra.get("guidance_scale") is not None
        if not guided and cfg.guidance_scale != 1.0:
            raise ConfigError(f"guidance_scale={cfg.guidance_scale}: task {task.spec.name!r} has no classifier-free "
                              f"guidance (its reference is purely conditional); leave guidance_scale at 1")
        if cfg.published and offers(task, Pipeline) and task.reference_id in PUBLISHED:
            pipe = task.pipeline(ctx)
            with ctx.progress.step(f"Loading and fusing the LCM-LoRA ({cfg.lora})"):
                model = load_lcm_lora(subject.model, type(pipe), cfg.lora)
            original, cost = 50, Cost(description=f"none: the published LCM-LoRA {cfg.lora}, fused")
        else:
            model, cost = self.distilled(subject, task, ctx)
            original = 1000 // cfg.skip
        student = task.prepare(model, ctx)
        if guided:  # the consistency model samples with its own guidance (1: the conditional branch only)
            student.extra.update(task.sampling_extra(task.pipeline(ctx), student.model, ctx,
                                                     guidance_scale=cfg.guidance_scale))
        applied = with_scheduler(student, seeded_lcm_scheduler(), cfg.num_inference_steps, "lcm",
                                 original_inference_steps=original, timestep_scaling=10.0)
        applied.cost = cost
        return applied

    # ---- the training path ------------------------------------------------------------------------------------
    def distilled(self, subject, task, ctx):
        """(student denoiser, Cost): trained, or loaded from the bench cache with the cost it had."""
        import dataclasses

        from bench import cache
        from bench.api import SMOKE_STEPS

        cfg = self.config
        steps = ctx.budget.pick(cfg.steps, SMOKE_STEPS)
        train_cfg = {k: v for k, v in dataclasses.asdict(cfg).items()
                     if k not in ("num_inference_steps", "guidance_scale", "published", "lora")}
        k = cache.key(task.spec.name, task.spec.version, cache.weights_digest(subject.model), train_cfg, steps,
                      ctx.seed, ctx.budget, ctx.device, ctx.dtype, "lcm-1")
        path = cache.method_dir("lcm", task) / f"student-{k}.safetensors"
        def build() -> tuple[dict, dict]:
            record = self.train(subject, task, ctx, steps)
            return {n: v.detach().cpu().contiguous() for n, v in record.pop("model").state_dict().items()}, record

        state, meta, _, _ = cache.cached_bundle(path, build)  # weights and their cost: one entry
        model = task.build_reference()
        model.load_state_dict(state)
        ctx.progress.log(f"lcm: {meta['steps']} steps in {meta['seconds']:.0f} s, loss {meta['loss_first']:.4f} -> "
                         f"{meta['loss_last']:.4f} (first / last 50 steps)")
        desc = (f"{meta['steps']} Adam steps of consistency distillation (k={cfg.skip}, batch {cfg.batch_size}, "
                f"{cfg.weighting} weighting; teacher + EMA-target forward passes per step){meta.get('extra', '')}")
        return model, Cost(meta["seconds"], meta["steps"], meta["steps"] * cfg.batch_size, desc)

    def train(self, subject, task, ctx, steps: int) -> dict:
        import copy
        import time

        import torch

        from baselines.distillation._lcm import Distillation, distil, x0_clip

        cfg = self.config
        t0 = time.perf_counter()
        teacher = subject.model
        denoise = subject.extra["denoise"]
        guided = subject.extra.get("guidance_scale") is not None
        if guided:
            x0, cond, extra = self.teacher_latents(subject, task, ctx)
            student_denoise = task.sampling_extra(task.pipeline(ctx), teacher, ctx, guidance_scale=1.0)["denoise"]
        else:
            data = require(task, TrainingSplit).training_split()
            x0, cond, extra = data.x.to(ctx.device, ctx.torch_dtype), data.y.to(ctx.device), ""
            student_denoise = denoise

        def as_model(model, x, c):  # the teacher keeps the profile's dtype; the student trains in float32
            dtype = next(model.parameters()).dtype
            return x.to(dtype), (c.to(dtype) if c.is_floating_point() else c)

        def teacher_eps(x, t, c):
            xm, cm = as_model(teacher, x, c)
            return denoise(teacher, xm, t, cm, 0).float()

        def student_eps(model, x, t, c):
            xm, cm = as_model(model, x, c)
            return student_denoise(model, xm, t, cm, 0).float()

        scheduler = subject.extra["scheduler"]
        setup = Distillation(teacher_eps, student_eps, x0, cond, scheduler.alphas_cumprod.to(ctx.device),
                             x0_clip(scheduler), per_row_t=not guided)
        student = copy.deepcopy(teacher).to(ctx.device).float()
        for p in student.parameters():
            p.requires_grad_(True)
        if ctx.dtype != "float32":
            setup.x0 = setup.x0.float()
        with ctx.progress.step(f"Consistency distillation of the {task.spec.name} reference (k={cfg.skip})",
                               total=steps) as advance:
            log = distil(student, setup, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, skip=cfg.skip,
                         ema_decay=cfg.ema_decay, loss=cfg.loss, huber_c=cfg.huber_c, seed=ctx.seed,
                         weighting=cfg.weighting, progress=advance)
        with torch.no_grad():
            student = student.to(ctx.torch_dtype)
        return {"model": student, "seconds": time.perf_counter() - t0, "steps": steps,
                "loss_first": log["loss_first"], "loss_last": log["loss_last"], "extra": extra}

    def teacher_latents(self, subject, task, ctx):
        """Data-free training set for the full tasks: (x0 latents, conditioning, cost note) from the reference's
        own guided sampler, `teacher_samples` of them, at the profile's batch size."""
        import dataclasses

        import torch

        from tasks._kit.diffusion import sample

        n = ctx.budget.pick(self.config.teacher_samples, min(self.config.teacher_samples, 4))
        conds = require(task, Pipeline).training_conditions(subject, n, ctx)
        latent = dataclasses.replace(subject, extra={**subject.extra, "decode": None})
        xs = []
        with ctx.progress.step(f"Sampling {n} teacher latents for distillation", total=n) as advance:
            for i in range(0, n, ctx.batch_size):
                idx = list(range(TRAIN_CONDITION_OFFSET + i, TRAIN_CONDITION_OFFSET + min(i + ctx.batch_size, n)))
                xs.append(sample(latent, task.noise(subject, idx, ctx.seed, ctx), conds[i:i + len(idx)]))
                advance(len(idx))
        return torch.cat(xs), conds, f"; data-free: {n} x0 latents from the reference's own sampler"
