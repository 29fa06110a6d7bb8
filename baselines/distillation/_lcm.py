"""The pieces of latent consistency distillation (`lcm`) that are not the method's plumbing: the boundary
parameterisation, the DDIM solver step, the distillation loop with its EMA target, and an `LCMScheduler` whose
injected noise is a function of the batch's own initial noise.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.

What diffusers lacks: its `LCMScheduler` samples a consistency model, but the distillation exists only as
example scripts (examples/consistency_distillation/train_lcm_distill_*.py), not as a library function, so the
loop is written here (after Luo et al. 2023, Algorithm 1, and those scripts' conventions: the skipping-step grid
t_n = n k - 1, the target's timestep t_n - k floored at 0, sigma_data = 0.5, timestep scaling 10), with the
scalings checked against the scheduler's own `get_scalings_for_boundary_condition_discrete` by the tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

SIGMA_DATA = 0.5  # LCMScheduler's sigma_data (Song et al. 2023 use 0.5 for data in [-1, 1])
TIMESTEP_SCALING = 10.0  # LCMScheduler's default `timestep_scaling`: c_skip(t) uses (10 t)


def boundary_scalings(t: "torch.Tensor", sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(c_skip(t), c_out(t)) of the consistency function, as diffusers' `LCMScheduler` computes them:

        c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),    c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

    with s = `timestep_scaling` (Song et al. 2023, eq. 7 / Appendix C, on the discrete timestep t; Luo et al. 2023,
    eq. 5). At t = 0, c_skip = 1 and c_out = 0 exactly: f(x, 0) = x, the boundary condition."""
    st = t.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def expand(v: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    """A per-row (B,) or scalar tensor shaped to broadcast over `like` (B x C x H x W)."""
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype) if v.dim() else v.to(like.dtype)


def predicted_x0(x: "torch.Tensor", eps: "torch.Tensor", abar: "torch.Tensor") -> "torch.Tensor":
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the epsilon-parameterised estimate of the data."""
    a = expand(abar, x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency(x: "torch.Tensor", t: "torch.Tensor", eps: "torch.Tensor", alphas_cumprod: "torch.Tensor",
                clip: Callable | None = None) -> "torch.Tensor":
    """The consistency function f_theta(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t) (Luo et al. 2023, eq. 5),
    x0_theta from the network's epsilon. `clip` (the sampler's x0 clip) is applied to x0 first, as
    `LCMScheduler.step` does."""
    x0 = predicted_x0(x, eps, alphas_cumprod[t])
    if clip is not None:
        x0 = clip(x0)
    c_skip, c_out = boundary_scalings(t)
    return expand(c_skip, x) * x + expand(c_out, x) * x0


def ddim_solver_step(x_t: "torch.Tensor", eps: "torch.Tensor", abar_t: "torch.Tensor", abar_s: "torch.Tensor",
                     clip: Callable | None = None) -> "torch.Tensor":
    """One DDIM step (eta = 0) from t to s < t, the ODE solver Psi of LCD (Luo et al. 2023, eq. 8 with DDIM):

        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps,    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)

    with the reference sampler's own x0 clip, so the solver follows the reference's trajectories."""
    x0 = predicted_x0(x_t, eps, abar_t)
    if clip is not None:
        x0 = clip(x0)
    a = expand(abar_s, x_t)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def solver_grid(num_train_timesteps: int, skip: int) -> "torch.Tensor":
    """The skipping-step grid t_n = n k - 1, n = 1 .. T / k: LCMScheduler's `lcm_origin_timesteps` with
    `original_inference_steps` = T / k, so training and sampling share one grid."""
    import torch

    return torch.arange(1, num_train_timesteps // skip + 1) * skip - 1


def x0_clip(scheduler) -> Callable | None:
    """The reference scheduler's x0 clip (its thresholding or clip_sample setting), or None."""
    cfg = scheduler.config
    if cfg.get("thresholding"):
        return scheduler._threshold_sample  # the same dynamic threshold the reference's sampler applies
    if cfg.get("clip_sample"):
        r = float(cfg.get("clip_sample_range", 1.0))
        return lambda x: x.clamp(-r, r)
    return None


@dataclass
class Distillation:
    """What one distillation run needs. `teacher_eps(x, t, cond)` is the reference's (guided) epsilon;
    `student_eps(model, x, t, cond)` the student's conditional epsilon; `t` is per row (B,) when
    `per_row_t`, else one 0-d timestep for the batch (denoisers with classifier-free guidance batch the two
    branches and take a scalar t). x0 and cond are the training data (first dimension: examples)."""

    teacher_eps: Callable
    student_eps: Callable
    x0: "torch.Tensor"
    cond: "torch.Tensor"
    alphas_cumprod: "torch.Tensor"
    clip: Callable | None
    per_row_t: bool


def huber(a: "torch.Tensor", b: "torch.Tensor", c: float) -> "torch.Tensor":
    """Pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c per element, averaged (the LCM scripts' `huber`)."""
    return (((a.float() - b.float()) ** 2 + c * c).sqrt() - c).mean()


def distil(student, setup: Distillation, *, steps: int, batch_size: int, lr: float, skip: int, ema_decay: float,
           loss: str, huber_c: float, seed: int, weighting: str = "uniform", progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1; Song et al. 2023, Algorithm 2) of
    `student` (trained in place, initialised from the teacher by the caller). Each step:

        n ~ U{1 .. N},  t = t_n,  s = max(t_n - k, 0),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        x_s = DDIM(x_t, eps_teacher(x_t, t), t -> s)                          (the solver, k steps of 1000)
        L = lambda(t) d( f_theta(x_t, t), f_theta-(x_s, s) )                  (theta-: the EMA target, no grad)
        theta- <- mu theta- + (1 - mu) theta                                  (mu = `ema_decay`)

    d is the pseudo-Huber distance (c = `huber_c`) or the squared L2 distance; lambda(t) = 1 (`weighting`
    "uniform", the paper's) or sqrt(abar_t / (1 - abar_t)) inside d ("snr": the difference of two x0 estimates
    measured in units of the epsilon that made them). Where the reference sampler clips x0 (`setup.clip`), f of
    student and target clip it too, as `LCMScheduler.step` does at sampling. At s = 0 the target is x_s itself
    (c_skip(0) = 1, c_out(0) = 0): the boundary condition anchors the chain. Returns the losses (and their
    first and last 50-step means) for the caller's record."""
    import copy

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    target = copy.deepcopy(student).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    grid = solver_grid(int(setup.alphas_cumprod.shape[0]), skip)
    abar = setup.alphas_cumprod.to(device)
    n_data = setup.x0.shape[0]
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randint(0, n_data, (batch_size,), generator=gen)
        x0, cond = setup.x0[idx].to(device), setup.cond[idx].to(device)
        n = torch.randint(0, grid.shape[0], (batch_size,) if setup.per_row_t else (), generator=gen)
        t = grid[n].to(device)
        s = (t - skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=x0.dtype)
        a_t = expand(abar[t], x0)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        pred = consistency(x_t, t, setup.student_eps(student, x_t, t, cond), abar, setup.clip)
        with torch.no_grad():
            x_s = ddim_solver_step(x_t, setup.teacher_eps(x_t, t, cond), abar[t], abar[s], setup.clip)
            tgt = consistency(x_s, s, setup.student_eps(target, x_s, s, cond), abar, setup.clip)
        if weighting == "snr":  # lambda(t) = sqrt(abar_t / (1 - abar_t)): the distance in epsilon units
            w = expand((abar[t] / (1 - abar[t])).sqrt(), pred)
            pred, tgt = pred * w, tgt * w
        value = huber(pred, tgt, huber_c) if loss == "huber" else F.mse_loss(pred.float(), tgt.float())
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), student.parameters()):
                p_t.lerp_(p, 1 - ema_decay)
        losses.append(float(value.detach()))
        if progress is not None:
            progress(1)
    student.eval()
    head, tail = losses[:50], losses[-50:]
    return {"loss_first": sum(head) / max(len(head), 1), "loss_last": sum(tail) / max(len(tail), 1),
            "losses": losses}


def row_seeds(sample: "torch.Tensor") -> list[int]:
    """One 63-bit seed per row: the sha256 of the row's bytes (as float32)."""
    import hashlib

    rows = sample.detach().float().cpu().contiguous().numpy()
    return [int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:8], "little") >> 1 for r in rows]


@functools.cache
def seeded_lcm_scheduler():
    """`LCMScheduler` whose noise between steps comes from per-row generators seeded by each row's sample at the
    first step (the initial noise), so the task's loop stays a function of (noise, labels): the same image from
    the same noise in any batch, different noise for different images, and no use of the global RNG.

    (`LCMScheduler.step` draws z ~ N(0, I) with `randn_tensor(generator=...)`; the task's loop passes none, which
    would draw from torch's global generator.)"""
    import torch
    from diffusers import LCMScheduler

    class SeededLCMScheduler(LCMScheduler):
        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            if generator is None:
                if self.step_index is None or getattr(self, "_row_generators", None) is None:
                    self._row_generators = [torch.Generator().manual_seed(s) for s in row_seeds(sample)]
                generator = self._row_generators
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    SeededLCMScheduler.__qualname__ = SeededLCMScheduler.__name__
    return SeededLCMScheduler
