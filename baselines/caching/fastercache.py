"""`fastercache`: diffusers' FasterCache hook as a library baseline (Lv et al., 2024, "FasterCache: Training-Free
Video Diffusion Model Acceleration with High Quality", arXiv:2410.19355; `diffusers.hooks.apply_faster_cache`).

Inside its range, each self-attention layer is computed every N-th call; in between its output is
extrapolated from the last two computed ones (paper, eq. 6, dynamic feature reuse):

    Attn_l(t) ~= Attn_l(t_1) + w * (Attn_l(t_1) - Attn_l(t_2))

FasterCache's other half, CFG-Cache (approximating the unconditional branch from the conditional one by its
low/high-frequency difference), needs a guided model called with [uncond; cond] batches; this task's model has
no guidance, so the hook runs with `is_guidance_distilled=True` and only the attention reuse applies.

diffusers' hook fails when its range includes the first step (no cached output yet), so the range is given in
steps, from `start_step` >= 1 to the end, and turned into timesteps from the task's scheduler. The hook
attaches only to attention modules named `transformer_blocks.*attn*`: DiT only. Its state is one per layer, so
a task calling the denoiser twice per step is refused. Hooks on a copy, reset per batch, must fire (`_hooks.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.registry import register_method


@dataclass(frozen=True)
class FasterCacheConfig:
    interval: int = 2  # N: attention computed every N calls inside the range (paper and diffusers: 2)
    weight: float = 0.5  # w of the extrapolation (diffusers' default when no schedule is given)
    start_step: int = 1  # first step (0-based) where attention may be reused; must be >= 1 (the hook needs a cache)

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        check_range("weight", self.weight, lo=0)
        if self.start_step < 1:
            raise ConfigError(f"start_step={self.start_step}: diffusers' FasterCache fails when its range includes "
                              f"the first step (nothing is cached yet); use start_step >= 1")


def step_range_to_timesteps(subject, start_step: int) -> tuple[float, float]:
    """(low, high) timesteps so that low < t < high holds exactly for the steps start_step .. end."""
    import copy

    sched = copy.deepcopy(subject.extra["scheduler"])
    n = int(subject.extra["num_inference_steps"])
    sched.set_timesteps(n)
    ts = [float(t) for t in sched.timesteps]
    if start_step >= len(ts):
        raise ConfigError(f"start_step={start_step} is past the last of the task's {len(ts)} steps")
    return min(ts) - 1.0, ts[start_step - 1]


@register_method("fastercache", family="caching", paper="Lv et al., FasterCache: Training-Free Video Diffusion "
                 "Model Acceleration with High Quality", year=2024, url="https://arxiv.org/abs/2410.19355",
                 modalities=("image-generation",),
                 summary="diffusers' apply_faster_cache on the DiT: extrapolate attention outputs from the last "
                         "two computed ones for N-1 of every N steps")
class FasterCache(Method):
    Config = FasterCacheConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import require_backbone
        from baselines.caching._hooks import hooked_subject

        require_backbone(subject.model, "dit", "fastercache")
        cfg = self.config
        low, high = step_range_to_timesteps(subject, cfg.start_step)

        def install(model, clock):
            from diffusers.hooks import FasterCacheConfig as Cfg, apply_faster_cache

            apply_faster_cache(model, Cfg(
                spatial_attention_block_skip_range=cfg.interval,
                spatial_attention_timestep_skip_range=(low, high),
                spatial_attention_block_identifiers=(r"transformer_blocks\.\d+\.attn1",),
                attention_weight_callback=lambda _: cfg.weight,
                current_timestep_callback=lambda: clock.timestep,
                tensor_format="BCHW", is_guidance_distilled=True))
            return ["faster_cache_block"]  # the block hooks do the caching; the denoiser hook only counts

        new, stats, _ = hooked_subject(subject, "fastercache", install, one_call_per_step=True)
        return Applied(new, Cost(description="training-free"), stats=stats)
