"""`taylorseer`: forecasting DiT features with a Taylor expansion (Liu et al., 2025, "From Reusing to Forecasting:
Accelerating Diffusion Models with TaylorSeers", arXiv:2503.06923).

Every N steps all layers are computed in full; each block's attention and MLP outputs F are kept with their
finite differences over the full steps (divided by the gap between them). At the steps in between they are
forecast by a Taylor expansion of order m (paper, eq. 7-8):

    Delta^0 F = F(t),   Delta^{i+1} F = (Delta^i F(t) - Delta^i F(t + N)) / N        (backward differences)
    F(t - k) ~= sum_{i=0..m} Delta^i F(t) / i! * k^i                      (k steps after the last full step)

which is the paper's sum_i Delta^i F(t) / (i! N^i) (-k)^i written with the differences divided by N and k
counted in steps (the step index grows as t falls). Order 0 is plain reuse: exactly `fora` (tested). An
order is used once enough full steps exist (the first forecasts are of lower order). The features are the
ungated branch outputs; the adaLN modulation is computed every step (`_dit.py`). Caches per branch, reset per
batch.

diffusers ships `apply_taylorseer_cache` (the `diffusers-taylorseer` method), which does the same expansion
on whichever modules its identifiers name. It is kept as a library baseline; this hand-written one is what
the paper describes on the opened-up DiT forward, and `tests/baselines/caching/test_taylorseer.py` checks
that both agree on the same model, modules and schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class TaylorSeerConfig:
    interval: int = 4  # N: a full forward every N steps (paper's DiT settings use N = 3-6)
    order: int = 2  # m: order of the Taylor forecast; 0 = reuse (FORA), the paper mostly uses 1-2
    warmup: int = 1  # full steps at the start before the schedule; 1 = steps 0, N, 2N, ... (as FORA)

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        check_range("order", self.order, lo=0, hi=4)
        check_range("warmup", self.warmup, lo=1)


class TaylorFactors:
    """Delta^0..Delta^m of one feature, updated at full steps and expanded at the others.

    The factors are held in float32 whatever the model's dtype: a difference of two bf16 features keeps ~3
    significant digits of what they share, and dividing by the gap and raising to k^i / i! amplifies that
    rounding; the forecast is cast back to the feature's dtype."""

    def __init__(self, order: int):
        self.order = order
        self.factors: list = []
        self.step: int | None = None
        self.dtype = None

    def update(self, feature, step: int) -> None:
        self.dtype = feature.dtype
        new = [feature.float()]
        if self.step is not None:
            gap = step - self.step
            for j in range(min(self.order, len(self.factors))):
                new.append((new[j] - self.factors[j]) / gap)
        self.factors, self.step = new, step

    def predict(self, step: int):
        k = step - self.step
        out = self.factors[0]
        coeff = 1.0
        for i in range(1, len(self.factors)):
            coeff = coeff * k / i  # k^i / i!
            out = out + self.factors[i] * coeff
        return out.to(self.dtype)


def taylorseer_subject(subject, order: int, is_full: Callable[[int], bool]):
    """(cached subject, tracker): the DiT forward with TaylorSeer on every block's attention and MLP."""
    from baselines.caching._common import Tracker, cached_subject
    from baselines.caching._dit import dit_forward, make_dit_call

    caches: dict[int, dict] = {}
    tracker = Tracker(caches.clear)

    def make_call(model, step, branch):
        full = is_full(step)
        cache = caches.setdefault(branch, {})

        def branch_fn(layer, module, compute, inputs):
            if full:
                out = compute(inputs)
                cache.setdefault((layer, module), TaylorFactors(order)).update(out, step)
                return out
            return cache[layer, module].predict(step)

        def forward(x, t, y):
            if not full and not cache:
                raise RuntimeError("taylorseer: a forecast step came before any full step (the cache is empty)")
            tracker.count("nfe_full" if full else "nfe_partial")
            return dit_forward(model, x, t, y, branch_fn)

        return make_dit_call(model, forward)

    return cached_subject(subject, tracker, make_call), tracker


@register_method("taylorseer", family="caching", paper="Liu et al., From Reusing to Forecasting: Accelerating "
                 "Diffusion Models with TaylorSeers", year=2025, url="https://arxiv.org/abs/2503.06923",
                 modalities=("image-generation",),
                 summary="DiT: full pass every N steps, forecast block features in between by an order-m Taylor "
                         "expansion of their finite differences")
class TaylorSeer(Method):
    Config = TaylorSeerConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import full_step, require_backbone, require_diffusion_subject
        from baselines.caching._dit import check_dit_blocks

        require_diffusion_subject(subject, "taylorseer")
        require_backbone(subject.model, "dit", "taylorseer")
        check_dit_blocks(subject.model, "taylorseer")
        cfg = self.config
        new, tracker = taylorseer_subject(subject, cfg.order, lambda i: full_step(i, cfg.interval, cfg.warmup))
        return Applied(new, Cost(description="training-free"), stats=tracker.stats)
