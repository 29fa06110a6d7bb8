"""The arithmetic of `freeflow` (Tong, Ma, Xie & Jaakkola 2025, "Flow Map Distillation Without Data",
arXiv:2511.19428): the DDPM schedule read as a flow-matching time, the epsilon-to-velocity conversion, the
flow-map student built on the reference denoiser, its few-step sampler, and the predictor-corrector loop.

Not a method (the leading underscore keeps the registry's discovery out). Module scope is torch-free.

What a library lacked: diffusers ships a flow-map Euler scheduler for flow-matching models, but nothing that
reads an epsilon-prediction DDPM model as a velocity field, no flow-map student with a second time input, and no
FreeFlow training (the authors' repository holds model definitions and sampling code for SiT teachers on latent
ImageNet); everything here is written from the paper's equations as derived in `baselines.distillation.freeflow`.

Conventions. T = 1,000 training timesteps, t in {0 .. T-1} with alpha-bar abar_t; CLEAN = -1 names abar = 1 (the
data itself, where DDIM's last step lands). alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and

    tau_t = sigma_t / (alpha_t + sigma_t),     y = x / (alpha_t + sigma_t)                      (re-timing)

turn x_t = alpha_t x0 + sigma_t eps into the flow-matching interpolant y_tau = (1 - tau) x0 + tau eps
(tau_CLEAN = 0; tau_999 = 0.9937 on the tasks' linear schedule). All maps below act on y.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

CLEAN = -1  # the timestep index of the data itself (abar = 1, tau = 0)
S_SCALE = 1000.0  # the second time input enters the network as 1000 tau_s (the scale of its own timesteps)


# ---- the schedule in flow-matching coordinates ----------------------------------------------------------------
@dataclass(frozen=True)
class FlowTime:
    """The DDPM schedule read as flow-matching time. `abar`: float64 (T,) alpha-bars; indices t in {-1 .. T-1},
    -1 being the clean data (abar = 1)."""

    abar: "torch.Tensor"

    @property
    def last(self) -> int:
        return int(self.abar.shape[0]) - 1

    def _abar(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch

        ext = torch.cat([torch.ones(1, dtype=torch.float64, device=self.abar.device), self.abar.double()])
        return ext[t.long().to(self.abar.device) + 1]

    def alpha_sigma(self, t: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        a = self._abar(t)
        return a.sqrt(), (1 - a).clamp(min=0).sqrt()

    def tau(self, t: "torch.Tensor") -> "torch.Tensor":
        """tau_t = sigma_t / (alpha_t + sigma_t), float64: 0 at CLEAN, increasing in t."""
        a, s = self.alpha_sigma(t)
        return s / (a + s)

    def scale(self, t: "torch.Tensor") -> "torch.Tensor":
        """alpha_t + sigma_t: x_t = scale * y."""
        a, s = self.alpha_sigma(t)
        return a + s


def flow_time(alphas_cumprod) -> FlowTime:
    import torch

    return FlowTime(torch.as_tensor(alphas_cumprod).detach().to(torch.float64).cpu())


def col(v: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    """A per-row (B,) tensor shaped to broadcast over `like`, in its dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# ---- epsilon -> probability-flow velocity ---------------------------------------------------------------------
def velocity(y: "torch.Tensor", eps: "torch.Tensor", tau: "torch.Tensor", clip: float | None = None) -> "torch.Tensor":
    """The probability-flow velocity dy/dtau of an epsilon-model at (y, tau):

        x0^ = (y - tau eps^) / (1 - tau),     u(y, tau) = eps^ - x0^ = (eps^ - y) / (1 - tau)

    (`clip`: x0^ clipped to [-clip, clip] first, the task sampler's x0 clip; None: the exact ODE)."""
    tc = col(tau, y)
    x0 = (y - tc * eps) / (1 - tc)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return eps - x0


def jump(y: "torch.Tensor", v: "torch.Tensor", tau_from: "torch.Tensor", tau_to: "torch.Tensor") -> "torch.Tensor":
    """y + (tau_to - tau_from) v: the flow map's form. At tau_to = tau_from it returns y exactly."""
    return y + col(tau_to - tau_from, y) * v


def ddim_step_vp(x: "torch.Tensor", eps: "torch.Tensor", abar_t: "torch.Tensor", abar_s: "torch.Tensor") -> "torch.Tensor":
    """DDIM (eta 0, no clip) from t to s in the model's own coordinates: sqrt(abar_s) x0^ + sqrt(1 - abar_s) eps^.
    Used by the tests to check that `jump` with the teacher's velocity is this step, re-timed."""
    a, b = col(abar_t, x), col(abar_s, x)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return b.sqrt() * x0 + (1 - b).sqrt() * eps


# ---- the student: the reference denoiser with a second time input ---------------------------------------------
def _s_conditioned_class():
    import copy

    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    class SConditioned(torch.nn.Module):
        """A diffusers `TimestepEmbedding` (the MLP that turns the sinusoid of t into the vector every block is
        conditioned on) plus a branch of the same shape for the second time: emb(t) + branch(sin(1000 tau_s)).
        The branch starts as a copy of the t-MLP with its output layer zeroed, so the student starts as the
        reference exactly. `s_input` is set by `FlowMapStudent.eps` around each call (None: no branch)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.branch = copy.deepcopy(inner)
            with torch.no_grad():
                self.branch.linear_2.weight.zero_()
                self.branch.linear_2.bias.zero_()
            self.s_input = None

        def forward(self, sample, condition=None):
            out = self.inner(sample) if condition is None else self.inner(sample, condition)
            if self.s_input is None:
                return out
            s = self.s_input.to(out.device).float().reshape(-1)
            e = get_timestep_embedding(s, self.branch.linear_1.in_features, flip_sin_to_cos=True,
                                       downscale_freq_shift=0)
            return out + self.branch(e.to(out.dtype))

    return SConditioned


def flow_map_student(denoiser, denoise: Callable):
    """`FlowMapStudent`: a copy of `denoiser` whose every `TimestepEmbedding` also embeds the target time s."""
    import copy

    import torch
    from diffusers.models.embeddings import TimestepEmbedding

    SConditioned = _s_conditioned_class()

    class FlowMapStudent(torch.nn.Module):
        """eps_theta(x_t, t, y | s): the reference's epsilon network conditioned on a second time through the sum
        of its timestep embeddings. Read by `flow_map` as a flow map f_theta(y, t, s)."""

        def __init__(self):
            super().__init__()
            self.denoiser = copy.deepcopy(denoiser)
            targets = [(n, m) for n, m in self.denoiser.named_modules() if isinstance(m, TimestepEmbedding)]
            if not targets:
                raise ValueError(f"freeflow conditions the student on its target time through the denoiser's "
                                 f"timestep embedding; {type(denoiser).__name__} has no diffusers "
                                 f"TimestepEmbedding module")
            for name, module in targets:
                parent_name, _, leaf = name.rpartition(".")
                parent = self.denoiser.get_submodule(parent_name) if parent_name else self.denoiser
                setattr(parent, leaf, SConditioned(module))
            self._denoise = denoise

        def eps(self, x, t, labels, tau_s):
            branches = [m for m in self.modules() if isinstance(m, SConditioned)]
            for m in branches:
                m.s_input = S_SCALE * tau_s
            try:
                return self._denoise(self.denoiser, x, t, labels, 0)
            finally:
                for m in branches:
                    m.s_input = None

        def forward(self, x, t, labels, tau_s):
            return self.eps(x, t, labels, tau_s)

    return FlowMapStudent()


def rows(t, n: int, device) -> "torch.Tensor":
    """A (n,) int64 tensor of timesteps from an int or a tensor."""
    import torch

    t = torch.as_tensor(t, dtype=torch.int64, device=device)
    return t.expand(n).contiguous() if t.dim() == 0 else t


def flow_map(student, y, t, s, labels, ft: FlowTime, clip: float | None = None, with_gain: bool = False):
    """f_theta(y, t, s) = y + (tau_s - tau_t) v_theta(y, t, s),  v_theta = u(y, tau_t) of the student's epsilon
    eps_theta(x_t = (alpha_t + sigma_t) y, t | s): identity at s = t by construction, and at initialisation
    (the s-branch zero) one DDIM step of the reference from t to s. t, s: ints or (B,) timesteps (s = CLEAN for
    the data). `with_gain`: also return d f / d eps_theta per pixel (no gradient)."""
    import torch

    n = y.shape[0]
    t, s = rows(t, n, y.device), rows(s, n, y.device)
    tau_t, tau_s = ft.tau(t), ft.tau(s)
    dtype = next(student.parameters()).dtype
    eps = student.eps((col(ft.scale(t), y) * y).to(dtype), t, labels, tau_s.to(y.device, dtype)).to(y.dtype)
    f = jump(y, velocity(y, eps, tau_t, clip), tau_t, tau_s)
    if not with_gain:
        return f
    # d f / d eps_theta per pixel: (tau_s - tau_t) (1 + tau_t / (1 - tau_t)) where x0^ is inside the clip, else
    # (tau_s - tau_t) (a clipped x0^ does not move with eps)
    tc = col(tau_t, y)
    x0 = (y - tc * eps) / (1 - tc)
    inside = (x0.abs() < clip) if clip is not None else torch.ones_like(x0, dtype=torch.bool)
    gain = col(tau_s - tau_t, y) * (1 + inside.to(y.dtype) * tc / (1 - tc))
    return f, gain.detach()


def teacher_velocity(teacher_eps: Callable, y, t, labels, ft: FlowTime, clip: float | None = None):
    """u(y, tau_t) of the reference: its epsilon at x_t = (alpha_t + sigma_t) y, through `velocity`."""
    t = rows(t, y.shape[0], y.device)
    eps = teacher_eps(col(ft.scale(t), y) * y, t, labels)
    return velocity(y, eps.to(y.dtype), ft.tau(t), clip)


def sampling_timesteps(scheduler_config: Any, n: int) -> list[int]:
    """The start of each of n steps: diffusers' DDIM timesteps for the task's spacing (trailing: 999, 749, 499,
    249 at n = 4), so an untrained student sampled here is the reference's DDIM-n without its clip."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(scheduler_config)
    s.set_timesteps(n)
    return [int(t) for t in s.timesteps]


def sample(student, noise, labels, ft: FlowTime, timesteps: list[int], clip: float | None = None):
    """x0 from the initial noise x_T (the task's loop starts at x_T = noise) in len(timesteps) flow-map jumps,
    t_k -> t_{k+1}, the last to CLEAN. At tau = 0, y is x0."""
    import torch

    with torch.inference_mode():
        y = noise.double() / ft.scale(torch.tensor(timesteps[0])).item()
        y = y.to(noise.dtype)
        ends = list(timesteps[1:]) + [CLEAN]
        for t, s in zip(timesteps, ends):
            y = flow_map(student, y, t, s, labels, ft, clip)
    return y


# ---- training ---------------------------------------------------------------------------------------------------
def path_grid(starts: list[int], skip: int, last: int) -> list[int]:
    """The predictor's grid, descending: the sampling starts and every `skip`-th timestep down from `last`
    (999, 949, ..., 49 at skip 50), then CLEAN."""
    pts = set(starts) | set(range(last, -1, -skip))
    return sorted(pts, reverse=True) + [CLEAN]


@dataclass
class Setup:
    """What one distillation needs. `teacher_eps(x, t, labels)` is the reference's epsilon (t per row);
    `source` is "prior" (FreeFlow: start states on the student's own path from x_T ~ N(0, I), labels uniform)
    or "data" (the control: start states noised from `data_x`, labels `data_y`, as data-based distillation
    draws them). `num_classes`: the labels of the prior source; `shape`: one image's shape."""

    teacher_eps: Callable
    ft: FlowTime
    clip: float | None
    starts: list[int]
    grid: list[int]
    source: str
    num_classes: int
    shape: tuple
    denoise: Callable | None = None  # the task's denoise(model, x, t, labels, step): the auxiliary model's call
    data_x: Any = None
    data_y: Any = None


def draw_segments(setup: Setup, n: int, gen) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(t, s+, s) per row: a start t uniform over the sampling starts, a target s uniform over the grid points
    below it (CLEAN included), and s+ the grid point just above s (s+ = t for the first segment)."""
    import torch

    grid = torch.tensor(setup.grid)
    pos = {g: i for i, g in enumerate(setup.grid)}
    start_pos = torch.tensor([pos[t] for t in setup.starts])
    i_t = start_pos[torch.randint(0, len(setup.starts), (n,), generator=gen)]
    span = len(setup.grid) - 1 - i_t  # points strictly below t
    j = i_t + 1 + (torch.rand(n, generator=gen) * span).long().clamp(max=span - 1)
    return grid[i_t], grid[j - 1], grid[j]


def start_states(student, setup: Setup, n: int, t, gen, device):
    """(y_t, labels): where each row starts. "prior": z ~ N(0, I) = x_T, y_T = z / (alpha_T + sigma_T), then for
    t < T the student's own jump y_t = f_theta(y_T, T, t) (no gradient): no data. "data": y_t = (1 - tau_t) x0 +
    tau_t eps for training images x0, as the data-noising distribution of data-based distillation."""
    import torch

    ft = setup.ft
    eps = torch.randn((n, *setup.shape), generator=gen).to(device)
    if setup.source == "data":
        idx = torch.randint(0, setup.data_x.shape[0], (n,), generator=gen)
        x0, labels = setup.data_x[idx].to(device).float(), setup.data_y[idx].to(device)
        tau = col(ft.tau(t), x0)
        return (1 - tau) * x0 + tau * eps, labels
    labels = torch.randint(0, setup.num_classes, (n,), generator=gen).to(device)
    y = eps / float(ft.scale(torch.tensor(ft.last)))
    inner = (t < ft.last).to(device)
    if inner.any():
        with torch.no_grad():
            y = y.clone()
            y[inner] = flow_map(student, y[inner], ft.last, t.to(device)[inner], labels[inner], ft, setup.clip)
    return y, labels


def predictor_target(student, setup: Setup, y, t, s_plus, s, labels):
    """The predictor's regression target for f_theta(y, t, s), no gradient: the student's own point one grid
    step before, f+ = f_theta(y, t, s+), moved on by the teacher's instantaneous velocity there,

        target = f+ + (tau_s - tau_s+) u(f+, tau_s+)

    (a finite-difference reading of d/ds f_theta(y, t, s) = u(f_theta(y, t, s), s); see the method's
    docstring). Rows with s+ = t start from y itself (f_theta(y, t, t) = y)."""
    import torch

    ft = setup.ft
    with torch.no_grad():
        f_plus = y.clone()
        moved = s_plus < t
        if moved.any():
            m = moved.to(y.device)
            f_plus[m] = flow_map(student, y[m], t.to(y.device)[m], s_plus.to(y.device)[m], labels[m], ft, setup.clip)
        u = teacher_velocity(setup.teacher_eps, f_plus, s_plus, labels, ft, setup.clip)
        return jump(f_plus, u, ft.tau(s_plus), ft.tau(s))


def distil(student, setup: Setup, *, steps: int, batch_size: int, lr: float, branch_lr: float, weighting: str,
           corrector: float,
           end_fraction: float, fake=None, fake_lr: float = 1e-4, r_range: tuple[int, int] = (20, 980), seed: int = 0,
           progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """FreeFlow's predictor-corrector training of `student` (in place). Each step, per row: a segment (t, s+, s)
    (`draw_segments`), a start state (`start_states`) and

        predictor  L_P = w || f_theta(y_t, t, s) - sg[f_theta(y_t, t, s+) + (tau_s - tau_s+) u(., tau_s+)] ||^2
        corrector  on the rows whose s is CLEAN (generated images x^ = f_theta(y_t, t, CLEAN)): r ~ U{r_range},
                   x_r = alpha_r x^ + sigma_r eps, the distribution-matching gradient of the noised student
                   marginal against the teacher's,  g = (x0_fake(x_r) - x0_teacher(x_r)) / mean|x^ - x0_teacher|,
                   L_C = 1/2 || x^ - sg[x^ - g] ||^2  (so dL_C/dx^ = g), then one flow-matching (epsilon) step of
                   `fake` on sg[x^]: the auxiliary model of the student's own noising velocity

    with w = 1 ("position"), 1 / (tau_s - tau_s+)^2 ("velocity": the residual of the generating velocity) or
    1 / (d f / d eps_theta)^2 per pixel ("eps": the error in units of the network's epsilon; d f / d eps is
    (tau_s - tau_t) / (1 - tau_t) where x0^ is not clipped, 158 (tau_s - tau_t) at t = 999, and (tau_s - tau_t)
    where it is; "eps-row" takes every pixel as unclipped). Measured in position, the first jumps' gradients
    dominate the shared network. loss = mean L_P + `corrector` L_C. Adam at `lr` on the reference's weights and
    `branch_lr` on the s-branches (which start at zero and alone make jumps to different s differ).
    `end_fraction` of the rows take s = CLEAN whatever the uniform draw (the
    corrector's samples). Returns losses for the record."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    ft = setup.ft
    student.train()
    branch = [p for n, p in student.named_parameters() if ".branch." in n]
    trunk = [p for n, p in student.named_parameters() if ".branch." not in n]
    opt = torch.optim.Adam([{"params": trunk, "lr": lr}, {"params": branch, "lr": branch_lr}])
    fake_opt = None
    if fake is not None and corrector > 0:
        fake.train()
        fake_opt = torch.optim.Adam(fake.parameters(), lr=fake_lr)
    grid = setup.grid
    before_clean = grid[-2]
    log: dict[str, list[float]] = {"predictor": [], "corrector": [], "fake": []}
    for _ in range(steps):
        t, s_plus, s = draw_segments(setup, batch_size, gen)
        if end_fraction > 0:  # forced ends: s = CLEAN, s+ = the last grid point (or t, if t is that point)
            end = torch.rand(batch_size, generator=gen) < end_fraction
            s = torch.where(end, torch.full_like(s, CLEAN), s)
            s_plus = torch.where(end, torch.minimum(torch.full_like(t, before_clean), t), s_plus)
        y, labels = start_states(student, setup, batch_size, t, gen, device)
        target = predictor_target(student, setup, y, t, s_plus, s, labels)
        pred, gain = flow_map(student, y, t.to(device), s.to(device), labels, ft, setup.clip, with_gain=True)
        err = (pred.float() - target.float()) ** 2
        if weighting == "eps":  # the error in units of the network's epsilon: / (d f / d eps)^2, per pixel
            err = err / gain.float().pow(2)
        elif weighting == "eps-row":  # the same with every pixel taken as unclipped (the row's largest gain)
            g = ((ft.tau(t) - ft.tau(s)) / (1 - ft.tau(t))).to(device).float()
            err = err / col(g, err).pow(2)
        per_row = err.flatten(1).mean(1)
        if weighting == "velocity":
            d = (ft.tau(s) - ft.tau(s_plus)).to(device).float()
            per_row = per_row / d.pow(2)
        loss = per_row.mean()
        log["predictor"].append(float(loss.detach()))
        clean = (s == CLEAN).to(device)
        if fake_opt is not None and clean.any():
            x_hat = pred[clean].float()
            n = x_hat.shape[0]
            r = torch.randint(r_range[0], r_range[1] + 1, (n,), generator=gen)
            noise = torch.randn(x_hat.shape, generator=gen).to(device)
            a, sg_ = ft.alpha_sigma(r)
            a, sg_ = col(a, x_hat), col(sg_, x_hat)
            lab = labels[clean]
            with torch.no_grad():
                x_r = a * x_hat + sg_ * noise
                x0_real = (x_r - sg_ * setup.teacher_eps(x_r, r.to(device), lab).float()) / a
                x0_fake = (x_r - sg_ * fake_eps(fake, setup, x_r, r.to(device), lab)) / a
            loss_c = corrector_loss(x_hat, dmd_direction(x_hat.detach(), x0_real, x0_fake))
            loss = loss + corrector * loss_c
            log["corrector"].append(float(loss_c.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if fake_opt is not None and clean.any():
            log["fake"].append(fake_step(fake, fake_opt, setup, pred[clean].detach().float(), labels[clean], gen))
        if progress is not None:
            progress(1)
    student.eval()
    if fake is not None:
        fake.eval()
    out: dict[str, Any] = {}
    for name, values in log.items():
        k = max(1, len(values) // 10)
        out[f"{name}_first"] = sum(values[:k]) / k if values else float("nan")
        out[f"{name}_last"] = sum(values[-k:]) / k if values else float("nan")
    return out


def dmd_direction(x_hat, x0_real, x0_fake):
    """g = (x0_fake - x0_teacher) / mean |x^ - x0_teacher| per image (DMD's normalisation): the gradient of
    KL(student || teacher) of the noised laws at x^, in units that do not depend on the noise level."""
    norm = (x_hat - x0_real).abs().flatten(1).mean(1).clamp(min=1e-6)
    return (x0_fake - x0_real) / col(norm, x_hat)


def corrector_loss(x_hat, g):
    """L_C = 1/2 || x^ - sg[x^ - g] ||^2, batch and pixel mean: its gradient at x^ is g / (pixels x rows)."""
    return 0.5 * ((x_hat - (x_hat - g).detach()) ** 2).flatten(1).mean(1).mean()


def fake_eps(fake, setup: Setup, x, t, labels):
    """The auxiliary model's epsilon (it has the reference's architecture and `denoise`)."""
    return setup.denoise(fake, x, t, labels, 0).float()


def fake_step(fake, opt, setup: Setup, x0, labels, gen) -> float:
    """One epsilon-objective step of the auxiliary model on the student's generated images (DDPM's loss, the
    flow-matching loss in epsilon units): it tracks the velocity of the noised student distribution."""
    import torch

    ft = setup.ft
    t = torch.randint(0, ft.last + 1, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    a, s = ft.alpha_sigma(t)
    x_t = col(a, x0) * x0 + col(s, x0) * noise
    loss = ((fake_eps(fake, setup, x_t, t.to(x0.device), labels) - noise) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
