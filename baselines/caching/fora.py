"""`fora`: Fast-Forward Caching for diffusion transformers (Selvaraju et al., 2024, "FORA: Fast-Forward Caching
in Diffusion Transformer Acceleration", arXiv:2407.01425).

Static caching of every DiT block's attention and MLP outputs. With refresh interval N, at a full step t
(step index i with i mod N = 0) all layers are computed and their outputs stored; at the N-1 steps after
it they are reused:

    Attn_l(t - k) := Attn_l(t),   MLP_l(t - k) := MLP_l(t),   k = 1 .. N-1          (FORA, section 3)

The cached values are the ungated branch outputs; each block's adaLN modulation (shift, scale, gate) is still
computed from the current timestep, so a reused step costs the patch embedding, the per-block modulation and
the output layer (see `baselines/caching/_dit.py`). N = 1 is the uncached model. Caches are per branch
(conditional / unconditional call) and reset per batch (`_common.cached_subject`).

diffusers has no FORA hook; its `apply_pyramid_attention_broadcast` reuses attention only (that is the `pab`
method), so this is written by hand on the opened-up DiT forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class ForaConfig:
    interval: int = 3  # N: a full forward every N steps, cached attention/MLP outputs reused in between (paper: 3)

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)


@register_method("fora", family="caching", paper="Selvaraju et al., FORA: Fast-Forward Caching in Diffusion "
                 "Transformer Acceleration", year=2024, url="https://arxiv.org/abs/2407.01425",
                 modalities=("image-generation",),
                 summary="DiT: recompute every block's attention and MLP every N steps, reuse them in between")
class Fora(Method):
    Config = ForaConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import Tracker, cached_subject, full_step, require_backbone, \
            require_diffusion_subject
        from baselines.caching._dit import check_dit_blocks, dit_forward, make_dit_call

        require_diffusion_subject(subject, "fora")
        require_backbone(subject.model, "dit", "fora")
        check_dit_blocks(subject.model, "fora")
        n = self.config.interval
        caches: dict[int, dict] = {}
        tracker = Tracker(caches.clear)

        def make_call(model, step, branch):
            full = full_step(step, n)
            cache = caches.setdefault(branch, {})

            def reuse(layer, module, compute, inputs):
                if full:
                    cache[layer, module] = compute(inputs)
                return cache[layer, module]

            def forward(x, t, y):
                if not full and not cache:
                    raise RuntimeError("fora: a reuse step came before any full step (the cache is empty)")
                tracker.count("nfe_full" if full else "nfe_partial")
                return dit_forward(model, x, t, y, reuse)

            return make_dit_call(model, forward)

        return Applied(cached_subject(subject, tracker, make_call), Cost(description="training-free"),
                       stats=tracker.stats)
