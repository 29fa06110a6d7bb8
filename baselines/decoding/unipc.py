"""`unipc`: UniPC, a unified predictor-corrector solver (Zhao et al., 2023, arXiv:2302.04867).

UniPC pairs a multistep predictor (UniP) with a corrector (UniC) that reuses the model output computed at the
new point, so correction costs no extra evaluation. In the data-prediction form, with lambda, h_i and x0_theta as
in DPM-Solver++ and B(h) = exp(h) - 1 (the `bh2` variant), UniC-p updates the predicted x_{t_i} as

    x^c_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x^c_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) x0_theta(t_{i-1})
                - alpha_{t_i} B(h_i) sum_{m=1}^{p} a_m D_m / r_m

where D_m are differences of past data predictions (the last one the fresh prediction at t_i) and a_m solve
the paper's order conditions (eq. 9-10). The step is diffusers' `UniPCMultistepScheduler` (bh2, order 2,
corrector on every step but the last); `baselines.decoding._samplers` swaps it into the task's sampling loop
with the reference's noise schedule. Nothing is hand-written.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class UniPCConfig:
    num_inference_steps: int = 10  # 10: the paper's target regime (5-10 evaluations), same budget as dpm-solver
    solver_order: int = 2  # 2: diffusers' default and the paper's choice for guided/conditional sampling

    def validate(self) -> None:
        check_range("num_inference_steps", self.num_inference_steps, lo=1, hi=1000)
        check_range("solver_order", self.solver_order, lo=1, hi=3)


@register_method("unipc", family="decoding", paper="Zhao et al., UniPC: A Unified Predictor-Corrector Framework "
                 "for Fast Sampling of Diffusion Models", year=2023, url="https://arxiv.org/abs/2302.04867",
                 modalities=("image-generation",),
                 summary="UniPC predictor-corrector (bh2, order 2), diffusers' UniPCMultistepScheduler")
class UniPC(Method):
    Config = UniPCConfig

    def apply(self, subject, task, ctx) -> Applied:
        from diffusers import UniPCMultistepScheduler

        from baselines.decoding._samplers import with_scheduler

        return with_scheduler(subject, UniPCMultistepScheduler, self.config.num_inference_steps, "unipc",
                              solver_order=self.config.solver_order)
