"""`ddim`: denoising diffusion implicit models (Song, Meng & Ermon, 2020, arXiv:2010.02502), deterministic.

DDIM samples the same trained epsilon-model on a subsequence of the training timesteps. With eta = 0 (no
injected noise) each step is the paper's eq. 12 with sigma_t = 0:

    x_{t-1} = sqrt(a_{t-1}) * (x_t - sqrt(1 - a_t) eps_theta(x_t, t)) / sqrt(a_t) + sqrt(1 - a_{t-1}) eps_theta(x_t, t)

(a_t = alpha-bar_t). The step is diffusers' `DDIMScheduler.step` (eta = 0); `baselines.decoding._samplers`
swaps it into the task's sampling loop (`tasks._kit.diffusion.sample`) with the reference's own noise schedule.
Nothing is hand-written: the reference of the `digits-gen` tasks *is* DDIM at 50 steps, so this method at
`num_inference_steps=50` reproduces it exactly, and fewer steps trade quality for time.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class DDIMConfig:
    # 20: the paper's Table 1 shows DDIM holding most of its quality down to ~20 steps (FID degrades fast
    # below 10), so 20 is the usual few-step DDIM setting; 2.5x fewer evaluations than the 50-step reference
    num_inference_steps: int = 20

    def validate(self) -> None:
        check_range("num_inference_steps", self.num_inference_steps, lo=1, hi=1000)


@register_method("ddim", family="decoding", paper="Song, Meng & Ermon, Denoising Diffusion Implicit Models",
                 year=2020, url="https://arxiv.org/abs/2010.02502", modalities=("image-generation",),
                 summary="deterministic DDIM (eta = 0) on fewer steps, diffusers' DDIMScheduler")
class DDIM(Method):
    Config = DDIMConfig

    def apply(self, subject, task, ctx) -> Applied:
        from diffusers import DDIMScheduler

        from baselines.decoding._samplers import with_scheduler

        return with_scheduler(subject, DDIMScheduler, self.config.num_inference_steps, "ddim", eta=0.0)
