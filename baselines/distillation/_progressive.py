"""The arithmetic of `progressive` (Salimans & Ho, 2022, arXiv:2202.00512): diffusers' DDIM sampler batched over
per-example timesteps, the teacher's two-step target, the student's loss and one distillation round.

Not a method (the leading underscore keeps the registry's discovery out). Module scope is torch-free.

Why hand-written: diffusers' `DDIMScheduler.step` takes one timestep for the whole batch, and training draws a
timestep per example, so the step is rewritten here on tensors of per-example alpha-bars. It reproduces
diffusers' arithmetic exactly (tested against `DDIMScheduler.step` over whole sampling loops), including two
details that matter for the target:
- the step from timestep t goes to the noise level of t - T // n (diffusers' rule), not to the next timestep in
  its `trailing` list (they differ by one at n = 16, 32, 64 on T = 1,000), or to alpha-bar 1 at the last step
  (`set_alpha_to_one`);
- with x0 clipping on (the tasks' SCHEDULE clips x0 to [-1, 1]), the step uses the clipped x0 but the model's
  unclipped epsilon: z' = sqrt(a') clip(x0) + sqrt(1 - a') eps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DDIMPlan:
    """What diffusers' DDIMScheduler (eta = 0) does in n steps: step k evaluates the model at `timesteps[k]`,
    whose alpha-bar is `abar[k]`, and moves the sample to alpha-bar `abar_prev[k]` (float64 tensors)."""

    n: int
    timesteps: "torch.Tensor"  # int64, n
    abar: "torch.Tensor"
    abar_prev: "torch.Tensor"


def ddim_plan(scheduler_config: Any, n: int, device: str = "cpu") -> DDIMPlan:
    import torch
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(scheduler_config)
    s.set_timesteps(n)
    ts = s.timesteps.to(torch.int64)
    ac = s.alphas_cumprod.to(torch.float64)
    prev = ts - s.config.num_train_timesteps // n  # DDIMScheduler.step's destination
    final = torch.as_tensor(float(s.final_alpha_cumprod), dtype=torch.float64)
    abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    return DDIMPlan(n, ts.to(device), ac[ts].to(device), abar_prev.to(device))


def x0_clip(scheduler_config: Any) -> float | None:
    """The bound DDIM clips its x0 estimate to (None: no clipping), as the subject's scheduler config says.

    Dynamic thresholding with `sample_max_value` 1 is a plain clip to [-1, 1] (the threshold s = clamp(quantile,
    1, 1) = 1); with a larger maximum it depends on each image's quantile, which this module does not reproduce."""
    c = scheduler_config
    if c.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"progressive distils epsilon-prediction teachers; this scheduler's prediction_type is "
                         f"{c.get('prediction_type')!r} (valid: 'epsilon')")
    if c.get("thresholding", False):
        if float(c.get("sample_max_value", 1.0)) != 1.0:
            raise ValueError(f"progressive reproduces DDIM's x0 clip (clip_sample, or thresholding with "
                             f"sample_max_value 1), not dynamic thresholding with sample_max_value "
                             f"{c.get('sample_max_value')}")
        return 1.0
    if c.get("clip_sample", False):
        return float(c.get("clip_sample_range", 1.0))
    return None


def _col(v: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step(eps, z, abar, abar_prev, clip: float | None):
    """One deterministic DDIM step (Song et al. 2020, eq. 12 with sigma = 0), per example:

        x0 = (z - sqrt(1 - a) eps) / sqrt(a),   clipped to [-clip, clip] when clip is set
        z' = sqrt(a') x0 + sqrt(1 - a') eps

    `abar`, `abar_prev`: B alpha-bars. Returns (z', x0)."""
    a, ap = _col(abar, z), _col(abar_prev, z)
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return ap.sqrt() * x0 + (1 - ap).sqrt() * eps, x0


def two_step_target(teacher, denoise: Callable, z, labels, index, teacher_plan: DDIMPlan, student_plan: DDIMPlan,
                    clip: float | None):
    """The student's x-target x~ of Algorithm 2 (Salimans & Ho 2022): two teacher DDIM steps from z_t,

        z_t'  = DDIM_teacher(z_t,  t  -> t'),     z_t'' = DDIM_teacher(z_t', t' -> t'')

    then the x that one student DDIM step from z_t would have to predict to land on z_t'':

        x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

    (alpha = sqrt(abar), sigma = sqrt(1 - abar); t'' is the student's destination). With x0 clipping, x~ is
    clipped to the same range: the student's sampler clips its x0, so clip(x~) is the nearest x0 it can act on
    (elementwise, argmin over c in [-1, 1] of (c - x~)^2). `index`: B student step indices; computed in float64
    (at t = 999 the denominator is ~0.003 for a 64-to-32 round). Returns (x~, z_t'')."""
    import torch

    k = 2 * index
    zz = z.to(torch.float64)
    with torch.no_grad():
        for j in (k, k + 1):
            eps = denoise(teacher, zz.to(z.dtype), teacher_plan.timesteps[j], labels, 0).to(torch.float64)
            zz, _ = ddim_step(eps, zz, teacher_plan.abar[j], teacher_plan.abar_prev[j], clip)
        a, ap = _col(student_plan.abar[index], zz), _col(student_plan.abar_prev[index], zz)
        r = (1 - ap).sqrt() / (1 - a).sqrt()
        x = (zz - r * z.to(torch.float64)) / (ap.sqrt() - r * a.sqrt())
        if clip is not None:
            x = x.clamp(-clip, clip)
    return x.to(z.dtype), zz.to(z.dtype)


def student_loss(student, denoise: Callable, z, labels, index, student_plan: DDIMPlan, x_target, z_target,
                 weighting: str, clip: float | None):
    """The distillation loss of one student step from z_t, from its epsilon output eps_theta, batch mean of

        "sampler":       || DDIM_student(z_t) - z_t'' ||^2      the student's own sampler step (x0 clipped as the
                         sampler clips it, epsilon not), against the teacher's two-step z_t''. Where nothing
                         clips, z_student - z_t'' = (alpha_t'' - (sigma_t''/sigma_t) alpha_t)(x^_theta - x~): the
                         paper's x-space loss with weight (alpha_t'' - (sigma_t''/sigma_t) alpha_t)^2
        "truncated-snr": max(SNR_t, 1) || x~ - x^_theta ||^2,   x^_theta = (z_t - sigma_t eps_theta) / alpha_t
                         (the paper's section 4: max(||x - x^||^2, ||eps - eps^||^2))
        "snr":           SNR_t || x~ - x^_theta ||^2 = || eps~ - eps_theta ||^2, the teacher's own objective

    (pixel means per example)."""
    a = _col(student_plan.abar[index], z)
    eps = denoise(student, z, student_plan.timesteps[index], labels, 0)
    if weighting == "sampler":
        z_student, _ = ddim_step(eps, z, student_plan.abar[index], student_plan.abar_prev[index], clip)
        return ((z_student - z_target) ** 2).flatten(1).mean(1).mean()
    x_hat = (z - (1 - a).sqrt() * eps) / a.sqrt()
    snr = (a / (1 - a)).flatten()
    w = snr.clamp(min=1.0) if weighting == "truncated-snr" else snr
    return (w * ((x_hat - x_target) ** 2).flatten(1).mean(1)).mean()


def distill_round(teacher, student, denoise: Callable, data_x, data_y, teacher_plan: DDIMPlan,
                  student_plan: DDIMPlan, clip: float | None, steps: int, batch_size: int, lr: float, weighting: str,
                  gen, advance: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """One round of Algorithm 2: `steps` Adam steps of `student` (in place) towards the frozen `teacher`'s
    two-step targets, on z_t = alpha_t x + sigma_t eps with x from the data and t uniform over the student's
    steps. Learning rate linearly annealed from `lr` to 0 over the round. Returns seconds and losses."""
    import time

    import torch

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
    n, dev = data_x.shape[0], data_x.device
    perm, pos, losses = torch.randperm(n, generator=gen), 0, []
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size].to(dev)
        pos += batch_size
        x0, y = data_x[idx], data_y[idx]
        index = torch.randint(0, student_plan.n, (x0.shape[0],), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
        a = _col(student_plan.abar[index], x0)
        z = a.sqrt() * x0 + (1 - a).sqrt() * noise
        x_target, z_target = two_step_target(teacher, denoise, z, y, index, teacher_plan, student_plan, clip)
        loss = student_loss(student, denoise, z, y, index, student_plan, x_target, z_target, weighting, clip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        advance(1)
    student.eval()
    k = max(1, len(losses) // 10)
    return {"seconds": time.perf_counter() - t0, "steps": steps,
            "loss_first": sum(losses[:k]) / k if losses else float("nan"),
            "loss_last": sum(losses[-k:]) / k if losses else float("nan")}
