"""`teacache`: Timestep Embedding Aware Cache (Liu et al., 2024, "Timestep Embedding Tells: It's Time to Cache for
Video Diffusion Model", arXiv:2411.19108).

TeaCache decides *when* to reuse from how much the first block's timestep-modulated input changed, which costs
almost nothing to compute, and reuses the residual of the whole block stack when it changed little. With F_t the
modulated input of the first block at the step of timestep t (for a DiT, LN(h) (1 + scale_t) + shift_t from block
0's adaLN-Zero; `_dit.dit_blocks` opens the forward at that point), the relative L1 change since the previous step
is (paper, eq. 4)

    L1_rel(F, t) = ||F_t - F_{t+1}||_1 / ||F_{t+1}||_1                 (means over the batch's whole tensor)

It is rescaled by a polynomial f fitted to the model (section 4.3: the modulated input's change is a biased
estimate of the output's change, and a fitted polynomial removes the bias), and accumulated over the steps since
the last full computation; the stack runs again once the sum passes the threshold delta (eq. 5):

    acc <- acc + f(L1_rel(F, t))
    acc <  delta  ->  h_L(t) = h_0(t) + (h_L - h_0)(t_full)             reuse the cached residual of the blocks
    acc >= delta  ->  compute every block; cache (h_L - h_0)(t); acc <- 0

h_0 is the patch embedding (computed every step, as are F_t and the output layer with its own adaLN); the first
and the last step are always computed, as in the authors' code. Caches and accumulators are per branch
(conditional / unconditional call) and reset per batch (`_common.cached_subject`); `nfe_full` / `nfe_partial`
report the dynamic schedule. We clamp f at 0 (a fitted polynomial can dip below zero near 0; a negative change
would let the accumulator fall, which the paper's definition as a distance does not allow).

The polynomial: the authors fit it offline per model (released coefficients for FLUX, HunyuanVideo, Open-Sora,
Latte, Mochi, Wan, ...; none for our references). Here it is fitted when the method is applied: the task samples
`calibration_samples` inputs of its own (capability `CalibrationSampling`: noise no evaluation or timed batch
uses) with every step computed, the pairs (L1_rel of F, L1_rel of the denoiser's output) of consecutive steps are
recorded, and numpy's least-squares `polyfit` of `degree` gives f (the authors' scripts fit degree 4 the same
way). `rescale=none` uses f(x) = x (the paper's ablation without rescaling). The calibration's seconds are the
method's cost.

diffusers has no TeaCache hook (its `FirstBlockCache`, the `first-block-cache` method, is TeaCache's successor
idea that decides from the first block's *output* residual); this is written by hand on the opened-up DiT
forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.api import CalibrationSampling, require
from bench.config import ConfigError, check_range
from bench.registry import register_method

RESCALE = ("fit", "none")


@dataclass(frozen=True)
class TeaCacheConfig:
    # delta: the accumulated rescaled change below which the cached residual is reused. The paper's settings on
    # Open-Sora are 0.1 ("slow") and 0.2 ("fast"); measured here on digits-gen-dit
    threshold: float = 0.1
    rescale: str = "fit"  # "fit": f fitted on the subject's own calibration trajectories; "none": f(x) = x
    degree: int = 4  # degree of the fitted polynomial (the authors' released coefficients are of degree 4)
    calibration_samples: int = 20  # samples the task draws for the fit (each gives one pair per step and branch)

    def validate(self) -> None:
        check_range("threshold", self.threshold, lo=0)
        if self.rescale not in RESCALE:
            raise ConfigError(f"rescale={self.rescale!r} is not one of {', '.join(RESCALE)}")
        check_range("degree", self.degree, lo=1, hi=6)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def rel_l1(now, before) -> float:
    """||now - before||_1 / ||before||_1 over the whole tensor (TeaCache's eq. 4)."""
    return float((now - before).abs().mean() / before.abs().mean())


class Accumulator:
    """The per-branch decision state of eq. 5: the previous modulated input and the accumulated change."""

    def __init__(self, threshold: float, rescale):
        self.threshold, self.rescale = threshold, rescale
        self.previous = None
        self.acc = 0.0

    def compute(self, modulated, step: int, last_step: int) -> bool:
        """True when the blocks must run at `step` (and then the accumulator restarts)."""
        before, self.previous = self.previous, modulated
        if step == 0 or step >= last_step or before is None:
            self.acc = 0.0
            return True
        self.acc += max(0.0, self.rescale(rel_l1(modulated, before)))
        if self.acc < self.threshold:
            return False
        self.acc = 0.0
        return True


def fit_rescale(pairs: list[tuple[float, float]], degree: int):
    """(f, coefficients): the least-squares polynomial of `degree` through (input change, output change) pairs."""
    import numpy as np

    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
    if len(pairs) <= degree:
        raise ValueError(f"teacache: {len(pairs)} calibration pairs cannot fit a polynomial of degree {degree}; "
                         f"raise calibration_samples or lower degree")
    coeffs = np.polyfit(x, y, degree)
    return (lambda v: float(np.polyval(coeffs, v))), [float(c) for c in coeffs]


def _modulated(model, h, t, y):
    """F_t: block 0's adaLN-Zero modulated input LN(h) (1 + scale) + shift."""
    return model.transformer_blocks[0].norm1(h, t, y, hidden_dtype=h.dtype)[0]


def calibration_pairs(subject, task, n: int, ctx) -> list[tuple[float, float]]:
    """(L1_rel of F, L1_rel of the output) for consecutive fully computed steps of `n` calibration samples."""
    from baselines.caching._common import Tracker, cached_subject
    from baselines.caching._dit import dit_blocks, dit_head, make_dit_call

    last: dict[int, tuple] = {}
    pairs: list[tuple[float, float]] = []
    tracker = Tracker(last.clear)

    def make_call(model, step, branch):
        def forward(x, t, y):
            h0 = model.pos_embed(x)
            mod = _modulated(model, h0, t, y)
            out = dit_head(model, dit_blocks(model, h0, t, y, lambda i, m, f, z: f(z)), t, y)
            if branch in last and step > 0:
                pairs.append((rel_l1(mod, last[branch][0]), rel_l1(out, last[branch][1])))
            last[branch] = (mod, out)
            return out

        return make_dit_call(model, forward)

    require(task, CalibrationSampling, "teacache fits its rescaling polynomial on the subject's own trajectories")
    task.sample_calibration(cached_subject(subject, tracker, make_call), n, ctx)
    return pairs


def teacache_subject(subject, threshold: float, rescale):
    """(cached subject, tracker): the DiT forward with TeaCache's residual reuse of the whole block stack."""
    from baselines.caching._common import Tracker, cached_subject
    from baselines.caching._dit import dit_blocks, dit_head, make_dit_call

    state: dict[int, tuple[Accumulator, dict]] = {}
    tracker = Tracker(state.clear)
    last_step = int(subject.extra.get("num_inference_steps") or 0) - 1

    def make_call(model, step, branch):
        acc, cache = state.setdefault(branch, (Accumulator(threshold, rescale), {}))

        def forward(x, t, y):
            h0 = model.pos_embed(x)
            if acc.compute(_modulated(model, h0, t, y), step, last_step if last_step > 0 else step):
                h = dit_blocks(model, h0, t, y, lambda i, m, f, z: f(z))
                cache["residual"] = h.float() - h0.float()  # float32: a bf16 difference would lose what h, h0 share
                tracker.count("nfe_full")
            else:
                h = (h0.float() + cache["residual"]).to(h0.dtype)
                tracker.count("nfe_partial")
            return dit_head(model, h, t, y)

        return make_dit_call(model, forward)

    return cached_subject(subject, tracker, make_call), tracker


@register_method("teacache", family="caching", paper="Liu et al., Timestep Embedding Tells: It's Time to Cache for "
                 "Video Diffusion Model", year=2024, url="https://arxiv.org/abs/2411.19108",
                 modalities=("image-generation",), requires=(CalibrationSampling,),
                 summary="DiT: reuse the block stack's residual while the accumulated, rescaled change of the "
                         "timestep-modulated input stays below a threshold")
class TeaCache(Method):
    Config = TeaCacheConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import require_backbone, require_diffusion_subject
        from baselines.caching._dit import check_dit_blocks

        require_diffusion_subject(subject, "teacache")
        require_backbone(subject.model, "dit", "teacache")
        check_dit_blocks(subject.model, "teacache")
        cfg = self.config
        fitted: dict[str, float] = {}
        t0 = time.perf_counter()
        if cfg.rescale == "fit":
            pairs = calibration_pairs(subject, task, cfg.calibration_samples, ctx)
            rescale, coeffs = fit_rescale(pairs, cfg.degree)
            fitted = {f"rescale_coefficient_{i}": c for i, c in enumerate(coeffs)}  # highest power first
            fitted["calibration_pairs"] = float(len(pairs))
            cost = Cost(seconds=time.perf_counter() - t0, samples_seen=cfg.calibration_samples,
                        description=f"training-free; the rescaling polynomial (degree {cfg.degree}) fitted on "
                                    f"{len(pairs)} step pairs of {cfg.calibration_samples} calibration samples")
        else:
            rescale = float
            cost = Cost(description="training-free; no rescaling (f(x) = x)")
        new, tracker = teacache_subject(subject, cfg.threshold, rescale)
        return Applied(new, cost, stats=lambda: {**tracker.stats(), **fitted})
