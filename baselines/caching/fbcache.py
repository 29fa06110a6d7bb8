"""`first-block-cache`: diffusers' First Block Cache hook as a library baseline (`diffusers.hooks.
apply_first_block_cache`; ParaAttention's dynamic caching, after TeaCache: Liu et al., 2024, "Timestep Embedding
Tells: It's Time to Cache for Video Diffusion Model", arXiv:2411.19108).

Every step runs the first transformer block; the rest of the blocks are skipped, and their cached residual
added instead, when the first block's residual r_1 = B_1(h) - h changed little since the last full step:

    skip  iff  mean|r_1(t) - r_1(t_full)| / mean|r_1(t_full)|  <  threshold
    output = B_1(h) + (h_L - h_1)(t_full)                              (the tail blocks' cached residual)

A dynamic schedule: how many steps are skipped depends on the model and the threshold; `nfe_full` /
`nfe_partial` report it (computed / reused calls of the last block). Backbone: DiT only (diffusers looks for a
`transformer_blocks` list; a UNet has none). The hooks go on a copy of the model, run inside a cache context
per branch, are reset per batch, and must fire (`_hooks.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    threshold: float = 0.05  # relative change of the first block's residual below which the rest is skipped (diffusers' default)

    def validate(self) -> None:
        check_range("threshold", self.threshold, lo=0)


@register_method("first-block-cache", family="caching", paper="diffusers First Block Cache (ParaAttention; after "
                 "TeaCache, Liu et al., Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model)",
                 year=2024, url="https://arxiv.org/abs/2411.19108", modalities=("image-generation",),
                 summary="diffusers' apply_first_block_cache on the DiT: skip all blocks after the first when its "
                         "residual barely changed")
class FirstBlockCache(Method):
    Config = FirstBlockCacheConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import require_backbone
        from baselines.caching._hooks import hooked_subject

        require_backbone(subject.model, "dit", "first-block-cache")
        if len(subject.model.transformer_blocks) < 2:
            raise ValueError("first-block-cache needs at least 2 transformer blocks (a head and a tail)")
        threshold = self.config.threshold

        def install(model, clock):
            from diffusers.hooks import FirstBlockCacheConfig as Cfg, apply_first_block_cache

            apply_first_block_cache(model, Cfg(threshold=threshold))
            return ["fbc_leader_block_hook", "fbc_block_hook"]

        # witness -1: the tail block, which runs only on full steps
        new, stats, _ = hooked_subject(subject, "first-block-cache", install, witness=-1)
        return Applied(new, Cost(description="training-free"), stats=stats)
