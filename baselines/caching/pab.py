"""`pab`: diffusers' Pyramid Attention Broadcast hook as a library baseline (Zhao et al., 2024, "Real-Time Video
Generation with Pyramid Attention Broadcast", arXiv:2408.12588; `diffusers.hooks.
apply_pyramid_attention_broadcast`).

Attention outputs change little in the middle of sampling, so inside a timestep range each self-attention
layer is computed every N-th call and its output broadcast (reused) in between:

    Attn_l(t) := Attn_l(t_last)   if  lo < t < hi  and  (calls since reset) mod N != 0

(PAB's pyramid gives cross- and temporal attention longer ranges; an image DiT or UNet has self-attention
only, so one range N applies). The MLPs always run. Backbones: DiT (`transformer_blocks.*.attn1`) and UNet
(`*.attentions.*`, when the UNet has attention blocks). diffusers' PAB needs `current_timestep_callback`; it
reads the timestep of the call in progress (`_hooks.Clock`). Its state is one per attention layer, not per
cache context, so a task that calls the denoiser twice per step (guidance as two calls) is refused. Hooks on a
copy of the model, reset per batch, must fire (`_hooks.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.registry import register_method


@dataclass(frozen=True)
class PabConfig:
    interval: int = 2  # N: attention recomputed every N calls inside the range (diffusers' default 2)
    timestep_low: int = 100  # broadcast only for timesteps strictly between low and high (diffusers' (100, 800))
    timestep_high: int = 800  # ... keeps the noisiest and the final, detail-setting steps exact

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        if self.timestep_low >= self.timestep_high:
            raise ConfigError(f"timestep_low={self.timestep_low} must be below timestep_high={self.timestep_high}")


@register_method("pab", family="caching", paper="Zhao et al., Real-Time Video Generation with Pyramid Attention "
                 "Broadcast", year=2024, url="https://arxiv.org/abs/2408.12588", modalities=("image-generation",),
                 beyond_compute=("a broadcast step skips the whole attention block, whose softmax, normalisation "
                                 "and memory traffic the MAC count does not see: on digits-gen the skipped matmuls "
                                 "are ~1% of the MACs (MAC ratio 1.01) while the skipped block is ~6% of the time "
                                 "(1.07x measured)"),
                 summary="diffusers' apply_pyramid_attention_broadcast: reuse self-attention outputs for N-1 of "
                         "every N steps inside a timestep range")
class Pab(Method):
    Config = PabConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import is_dit, is_unet, require_backbone
        from baselines.caching._hooks import hooked_subject

        model = subject.model
        if not is_unet(model):
            require_backbone(model, "dit", "pab")
        identifiers = ("transformer_blocks",) if is_dit(model) else ("attentions",)
        cfg = self.config

        def install(model, clock):
            from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

            apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=cfg.interval,
                spatial_attention_timestep_skip_range=(cfg.timestep_low, cfg.timestep_high),
                spatial_attention_block_identifiers=identifiers,
                current_timestep_callback=lambda: clock.timestep))
            return ["pyramid_attention_broadcast"]

        new, stats, _ = hooked_subject(subject, "pab", install, one_call_per_step=True)
        return Applied(new, Cost(description="training-free"), stats=stats)
