"""`diffusers-taylorseer`: diffusers' TaylorSeer hook as a library baseline (`diffusers.hooks.
apply_taylorseer_cache`; Liu et al., 2025, arXiv:2503.06923).

The same forecast as `taylorseer` (see its docstring): at full steps each hooked module's output F and its
divided differences are stored, in between F(t + k) ~= sum_{i=0..m} Delta^i F / i! * k^i. The hooks go on
every DiT block's attention and feed-forward (`transformer_blocks.<i>.attn1` / `.ff`, passed explicitly:
diffusers' default identifiers end in `attn` and match no DiT module, silently). diffusers' schedule: full
steps 0 .. warmup-1, then warmup+1, warmup+1+N, ... (step `warmup` itself is already forecast); its factors
are kept in float32 here (diffusers' default bfloat16 loses the small differences of a tiny model).
Per-branch state through the cache context, reset per batch, hooks must fire (`_hooks.py`). DiT only.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method

IDENTIFIERS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


@dataclass(frozen=True)
class DiffusersTaylorSeerConfig:
    interval: int = 4  # N: diffusers' cache_interval, steps between full computations
    order: int = 2  # m: diffusers' max_order
    warmup: int = 1  # diffusers' disable_cache_before_step (>= 1: step 0 must be computed)

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        check_range("order", self.order, lo=0, hi=4)
        check_range("warmup", self.warmup, lo=1)


def install_taylorseer(model, interval: int, order: int, warmup: int) -> list[str]:
    import torch
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    apply_taylorseer_cache(model, TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
        taylor_factors_dtype=torch.float32, cache_identifiers=IDENTIFIERS))
    return ["taylorseer_cache"]


def diffusers_full_step(step: int, interval: int, warmup: int) -> bool:
    """diffusers' TaylorSeerCacheHook schedule (for comparing with `taylorseer`)."""
    return step < warmup or (step - warmup - 1) % interval == 0


@register_method("diffusers-taylorseer", family="caching", paper="Liu et al., From Reusing to Forecasting: "
                 "Accelerating Diffusion Models with TaylorSeers (diffusers' hook)", year=2025,
                 url="https://arxiv.org/abs/2503.06923", modalities=("image-generation",),
                 summary="diffusers' apply_taylorseer_cache on every DiT block's attention and MLP")
class DiffusersTaylorSeer(Method):
    Config = DiffusersTaylorSeerConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import require_backbone
        from baselines.caching._hooks import hooked_subject

        require_backbone(subject.model, "dit", "diffusers-taylorseer")
        cfg = self.config
        new, stats, _ = hooked_subject(
            subject, "diffusers-taylorseer",
            lambda model, clock: install_taylorseer(model, cfg.interval, cfg.order, cfg.warmup))
        return Applied(new, Cost(description="training-free"), stats=stats)
