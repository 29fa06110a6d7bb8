"""`dpm-solver`: DPM-Solver++ (Lu et al., 2022, arXiv:2211.01095), second-order multistep (2M).

A high-order solver of the diffusion ODE in the data-prediction form. With alpha_t, sigma_t the schedule,
lambda_t = log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i and
x0_theta = (x_t - sigma_t eps_theta) / alpha_t, one step of DPM-Solver++(2M) (the paper's Algorithm 2) is

    D_i     = (1 + 1 / (2 r_i)) x0_theta(x_{t_{i-1}}, t_{i-1}) - 1 / (2 r_i) x0_theta(x_{t_{i-2}}, t_{i-2})
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i

(first-order on the first step, and on the last with `lower_order_final`, diffusers' default for < 15 steps):
one network evaluation per step. The step is diffusers' `DPMSolverMultistepScheduler` with
`algorithm_type="dpmsolver++"`; `baselines.decoding._samplers` swaps it into the task's sampling loop with the
reference's noise schedule. Nothing is hand-written.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class DPMSolverConfig:
    num_inference_steps: int = 10  # 10: the paper's headline regime (good samples in 10-20 evaluations)
    solver_order: int = 2  # 2 = DPM-Solver++(2M), the paper's recommendation for conditional sampling

    def validate(self) -> None:
        check_range("num_inference_steps", self.num_inference_steps, lo=1, hi=1000)
        check_range("solver_order", self.solver_order, lo=1, hi=3)


@register_method("dpm-solver", family="decoding", paper="Lu et al., DPM-Solver++: Fast Solver for Guided "
                 "Sampling of Diffusion Probabilistic Models", year=2022, url="https://arxiv.org/abs/2211.01095",
                 modalities=("image-generation",),
                 summary="DPM-Solver++(2M) multistep ODE solver, diffusers' DPMSolverMultistepScheduler")
class DPMSolver(Method):
    Config = DPMSolverConfig

    def apply(self, subject, task, ctx) -> Applied:
        from diffusers import DPMSolverMultistepScheduler

        from baselines.decoding._samplers import with_scheduler

        return with_scheduler(subject, DPMSolverMultistepScheduler, self.config.num_inference_steps, "dpm-solver",
                              algorithm_type="dpmsolver++", solver_order=self.config.solver_order)
