"""Shared pieces of the `digits-gen` tasks: the 16x16 digits, the two denoisers, DDPM training, the sampling loop.

Training is DDPM's epsilon objective (Ho et al., 2020, arXiv:2006.11239, eq. 14):

    L = E_{x0, y, t, eps} || eps - eps_theta( sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y ) ||^2

with diffusers' `DDPMScheduler.add_noise` making x_t (`train_ddpm`) and DDPM's linear noise schedule
(linear betas 1e-4 .. 0.02, 1,000 steps). Sampling runs any diffusers scheduler through one loop (`sample`).

The sampling interface (what methods wrap or replace; keep it stable) lives in `Subject.extra`:

    extra["scheduler"]            a diffusers scheduler instance; `sample` makes a fresh copy per batch with
                                  `type(s).from_config(s.config)`, so multistep solver state never leaks
    extra["num_inference_steps"]  int, passed to `set_timesteps`
    extra["guidance_scale"]       None: no classifier-free guidance (the references are purely conditional,
                                  one network evaluation per step, no unconditional branch)
    extra["denoise"]              denoise(model, x_t, t, labels, step_index) -> eps, a tensor shaped like x_t.
                                  x_t: B x 1 x 16 x 16 (after `scheduler.scale_model_input`); t: 0-d int64
                                  tensor, the scheduler's timestep; labels: B int64 classes 0-9; step_index: int,
                                  0 .. num_inference_steps-1 (the index into `scheduler.timesteps`)
    extra["on_batch_start"]       optional; called with no arguments once at the start of every batch, before
                                  the first denoise call (caches reset their state here)
    extra["decode"]               optional; decode(x_0) -> images in about [-1, 1], applied to the loop's result
                                  (a latent-diffusion task's VAE decoder; absent: x_0 is the image)
    extra["sample"]               optional; sample(subject, noise, labels) -> images replaces the whole loop
    extra["backbone"]             "unet" or "dit"

The full tasks (`coco`, `imagenet-fid`, see `tasks._kit.latent_diffusion`) use the same keys in a latent space:
x_t is B x 4 x h x w, `labels` is the conditioning (ImageNet class ids, or the text encoder's prompt
embeddings, B x 77 x D), `guidance_scale` is set and `denoise` does classifier-free guidance itself, with the
conditional and unconditional rows batched into one network call (as diffusers' pipelines do; a cache keeps
every row's features apart), and `decode` is the VAE.

The loop is deterministic given (noise, labels): every scheduler used here is deterministic (DDIM with eta=0,
DPM-Solver++, UniPC) and no random numbers are drawn inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks._kit.classification import SMOKE_STEPS, Split, seed_everything

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Subject

SIZE = 16  # the 8x8 digits are upsampled (bilinear) to SIZE x SIZE
NUM_CLASSES = 10
TRAIN_TIMESTEPS = 1000
# the noise schedule of training and of every sampler built from the reference's scheduler config. Linear betas
# (DDPM's 1e-4 .. 0.02). Every sampler clips its x0 estimate to the data range [-1, 1], as DDPM's own pixel-space
# sampler does ("clipped denoised", Ho et al. 2020): at t = 999 alpha-bar is 4e-5, so x0 = (x_t - sqrt(1 - abar)
# eps) / sqrt(abar) multiplies the epsilon error by ~160, and unclipped, ~10% of the UNet's DDIM-50 samples ended
# as saturated noise (measured: 95% class accuracy either way, but the clipped grid has no noise images).
# `thresholding` with `sample_max_value` 1 is that clip (the dynamic threshold s = clamp(quantile, 1, 1) = 1), and
# unlike DDIM's `clip_sample` it is a setting DPM-Solver++ and UniPC share, so every sampler clips alike.
SCHEDULE = dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", clip_sample=False, thresholding=True,
                sample_max_value=1.0, prediction_type="epsilon",
                timestep_spacing="trailing")  # trailing: the first step is t = 999
REFERENCE_STEPS = 50  # the reference sampler: DDIM, 50 steps, eta = 0

# ~0.93 M parameters; ~31 ms per 16-image step on one loaded core
UNET = dict(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 48, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16,
            num_class_embeds=NUM_CLASSES)
# ~0.83 M parameters: 4 blocks of width 96 over 64 tokens (patch 2 on 16x16); adaLN-zero class conditioning
DIT = dict(num_attention_heads=4, attention_head_dim=24, in_channels=1, num_layers=4, sample_size=SIZE, patch_size=2,
           num_embeds_ada_norm=NUM_CLASSES)


@dataclass(frozen=True)
class DiffusionRecipe:
    steps: int  # optimiser steps (batches), whatever the epoch boundaries
    batch_size: int
    lr: float  # Adam, linear warm-up then cosine to zero
    warmup: int = 50  # steps of linear warm-up (adaLN-zero and attention are unstable at a full rate from step 0)


def load_digits16() -> tuple[Split, Split]:
    """scikit-learn's digits in [-1, 1], bilinearly upsampled to 16x16; the `digits` task's split (stratified,
    seed 0, a quarter held out: 1,347 train / 450 test)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy((d.images.astype(np.float32) / 16.0 - 0.5) / 0.5).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    return Split(x[idx_tr].contiguous(), y[idx_tr]), Split(x[idx_te].contiguous(), y[idx_te])


def build_unet():
    from diffusers import UNet2DModel

    seed_everything(0)
    return UNet2DModel(**UNET)


def build_dit():
    from diffusers import DiTTransformer2DModel

    seed_everything(0)
    return DiTTransformer2DModel(**DIT)


def denoise_unet(model, x, t, labels, step_index: int):
    """eps_theta(x_t, t, y) of a class-conditional `UNet2DModel`."""
    return model(x, t.expand(x.shape[0]), class_labels=labels).sample


def denoise_dit(model, x, t, labels, step_index: int):
    """eps_theta(x_t, t, y) of a `DiTTransformer2DModel` (its output has in_channels channels: no learned sigma)."""
    return model(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample


DENOISERS = {"unet": denoise_unet, "dit": denoise_dit}


def reference_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE)


def sampling_extra(backbone: str) -> dict[str, Any]:
    """The reference's `Subject.extra`: DDIM, 50 steps, no guidance."""
    return {"scheduler": reference_scheduler(), "num_inference_steps": REFERENCE_STEPS, "guidance_scale": None,
            "denoise": DENOISERS[backbone], "backbone": backbone}


def sample(subject: "Subject", noise: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """Images (B x 1 x 16 x 16, in about [-1, 1]) from initial `noise` and class `labels`: the one sampling loop."""
    import torch

    extra = subject.extra
    if extra.get("sample") is not None:
        return extra["sample"](subject, noise, labels)
    proto = extra["scheduler"]
    scheduler = type(proto).from_config(proto.config)  # fresh state (multistep solvers keep past outputs)
    scheduler.set_timesteps(int(extra["num_inference_steps"]), device=noise.device)
    if extra.get("on_batch_start") is not None:
        extra["on_batch_start"]()
    denoise = extra["denoise"]
    x = noise * scheduler.init_noise_sigma
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            eps = denoise(subject.model, scheduler.scale_model_input(x, t), t, labels, i)
            x = scheduler.step(eps, t, x).prev_sample
        if extra.get("decode") is not None:
            x = extra["decode"](x)
    return x


def eval_inputs(n: int, seed: int, device: str = "cpu", dtype=None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Fixed initial noise (n x 1 x 16 x 16, from a generator seeded by `seed`) and balanced labels (i mod 10)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, SIZE, SIZE, generator=gen)
    labels = torch.arange(n) % NUM_CLASSES
    return noise.to(device=device, dtype=dtype or torch.float32), labels.to(device)


def generate(subject: "Subject", noise: "torch.Tensor", labels: "torch.Tensor", batch_size: int) -> "torch.Tensor":
    import torch

    return torch.cat([sample(subject, noise[i:i + batch_size], labels[i:i + batch_size])
                      for i in range(0, noise.shape[0], batch_size)])


def to_uint8(images: "torch.Tensor") -> "torch.Tensor":
    """[-1, 1] floats -> uint8 [0, 255] (what a PNG stores and what the FID features see)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(dtype=__import__("torch").uint8).cpu()


def train_ddpm(model, data: Split, recipe: DiffusionRecipe, ctx: "RunContext", description: str):
    """Train `model` in place on the epsilon objective, deterministically (seed 0); returns (seconds, final loss)."""
    import math
    import time

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    ddpm = DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k != "timestep_spacing"})
    model.to(ctx.device).train()
    x_all, y_all = data.x.to(ctx.device), data.y.to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    total = ctx.budget.pick(recipe.steps, SMOKE_STEPS)

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(total - recipe.warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    n, t0, ema_loss = x_all.shape[0], time.perf_counter(), None
    with ctx.progress.step(description, total=total) as advance:
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(total):
            if pos + recipe.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + recipe.batch_size].to(ctx.device)
            pos += recipe.batch_size
            x0, y = x_all[idx], y_all[idx]
            eps = torch.randn(x0.shape, generator=gen).to(ctx.device)
            t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen).to(ctx.device)
            pred = model(ddpm.add_noise(x0, eps, t), t, class_labels=y).sample
            loss = F.mse_loss(pred, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
            advance(1)
    model.eval()
    return time.perf_counter() - t0, ema_loss


def save_grid(images: "torch.Tensor", path, nrow: int = 10, scale: int = 4) -> None:
    """A PNG grid of uint8 images (N x 1 x 16 x 16), each enlarged `scale` times (nearest): the README's figure."""
    import torch
    import torch.nn.functional as F
    from torchvision.utils import save_image

    big = F.interpolate(images.float() / 255, scale_factor=scale, mode="nearest")
    save_image(big, str(path), nrow=nrow, padding=2, pad_value=1.0)
