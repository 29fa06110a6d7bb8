"""What adversarial diffusion distillation (`add`, Sauer et al. 2023, arXiv:2311.17042) and its latent variant
(`ladd`, Sauer et al. 2024, arXiv:2403.12015) share: the discriminator (trainable heads on a frozen feature network),
the hinge losses with the R1 penalty, the distillation loss, and the training loop.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.

What a library lacked: diffusers ships SDXL-Turbo's weights but not ADD's training (nor LADD's); neither paper's code
is public. So the loop is written here from the papers' equations:

    student (ADD eq. 1):  x_s = alpha_s x0 + sigma_s eps,  s in T_student (4 fixed timesteps),  x_theta = x^_theta(x_s, s)
    discriminator:        D_phi(x, y) = sum_k  mean_l  [ w_k^T h_kl + <e_k(y), h_kl> ],   h_k = lrelu(W_k F_k(x))
                          F_k: the k-th feature map of a FROZEN network (ADD: DINOv2; LADD: the teacher at noised
                          inputs); W_k, w_k, e_k trainable; the class enters by projection (ADD's text/image
                          conditioning, in the form of Miyato & Koyama 2018)
    L_D  (ADD eq. 3):     E[ relu(1 - D(x0)) ] + E[ relu(1 + D(x_theta)) ] + gamma/2 E[ ||grad_x D(x0)||^2 ]   (R1)
    L_adv^G (eq. 2):      - E[ D(x_theta) ]
    L_distill (eq. 4):    E_t[ c(t) d(x_theta, sg(x_psi(x^_theta,t, t))) ],  x^_theta,t = alpha_t sg(x_theta) + sigma_t eps'
    L (eq. 5):            L_adv^G + lambda L_distill        (ADD: lambda = 2.5; `adv_weight`, `distill_weight` here)

alpha = sqrt(abar), sigma = sqrt(1 - abar) (DDPM's schedule). x^_theta and x_psi are the epsilon-networks' x0
estimates, clipped to the data range where the task's sampler clips (the student is sampled by that sampler, so
it is trained for the x0 it will use). d is the squared L2 distance (pixel mean); c(t) = alpha_t ("exponential",
the first weighting the ADD paper names: noisier targets count less) or 1 ("uniform").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


def student_grid(scheduler, n: int = 4) -> "torch.Tensor":
    """The student's fixed timesteps: the subject scheduler's own n-step grid (trailing on the digits tasks:
    999, 749, 499, 249), so a 1-, 2- or 4-step sampler from that config lands on them."""
    import torch
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(scheduler.config)
    s.set_timesteps(n)
    return s.timesteps.to(torch.int64).clone()


def as_channels(f: "torch.Tensor") -> "torch.Tensor":
    """A feature tensor as N x C x L: a vector (N x C) has L = 1, a map (N x C x H x W) L = H W."""
    return f.reshape(f.shape[0], f.shape[1], -1)


def make_heads(channels: list[int], n_classes: int, hidden: int = 32):
    """Trainable discriminator heads, one per feature map (1x1 convolutions and a class projection)."""
    import torch
    from torch import nn

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv1d(c, hidden, 1) for c in channels)
            self.outs = nn.ModuleList(nn.Conv1d(hidden, 1, 1) for _ in channels)
            self.embeds = nn.ModuleList(nn.Embedding(n_classes, hidden) for _ in channels)

        def forward(self, feats: list, y: "torch.Tensor") -> "torch.Tensor":
            """(N,) logits: the sum over feature maps of the per-position logit (with the class projection),
            averaged over positions."""
            total = 0
            for f, conv, out, emb in zip(feats, self.convs, self.outs, self.embeds):
                h = torch.nn.functional.leaky_relu(conv(as_channels(f.float())), 0.2)  # N x hidden x L
                proj = (emb(y).unsqueeze(-1) * h).sum(1)  # <e(y), h_l>: N x L
                total = total + (out(h).squeeze(1) + proj).mean(1)
            return total

    return Heads()


class Discriminator:
    """D(x, y) = heads(features(x, y), y): `features` a frozen callable (its own parameters get no updates),
    `heads` the trainable module. Built lazily: the channel counts come from one probe batch."""

    def __init__(self, features: Callable, probe_x: "torch.Tensor", probe_y: "torch.Tensor", n_classes: int,
                 hidden: int = 32, seed: int = 0):
        import torch

        self.features = features
        with torch.no_grad():
            chans = [int(f.shape[1]) for f in features(probe_x, probe_y)]
        torch.manual_seed(seed)
        self.heads = make_heads(chans, n_classes, hidden).to(probe_x.device)

    def __call__(self, x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        return self.heads(self.features(x, y), y)


def hinge_d(real: "torch.Tensor", fake: "torch.Tensor") -> "torch.Tensor":
    """The discriminator's hinge loss (ADD eq. 3 without R1): E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    import torch.nn.functional as F

    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g(fake: "torch.Tensor") -> "torch.Tensor":
    """The generator's adversarial loss (ADD eq. 2): -E[D(x_theta)]."""
    return -fake.mean()


def r1_penalty(disc: Callable, x: "torch.Tensor", y: "torch.Tensor", gamma: float) -> "torch.Tensor":
    """R1 (Mescheder et al. 2018): gamma / 2 * E_x ||grad_x D(x, y)||^2 on real inputs, with the graph kept so the
    penalty trains the discriminator."""
    import torch

    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(disc(x, y).sum(), x, create_graph=True)
    return gamma / 2 * g.pow(2).flatten(1).sum(1).mean()


def _col(v: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_eps(x: "torch.Tensor", eps: "torch.Tensor", abar: "torch.Tensor", clip: float | None) -> "torch.Tensor":
    """x0 = (x_t - sigma_t eps) / alpha_t, clipped to [-clip, clip] when the sampler clips (per-row abar)."""
    a = _col(abar, x)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return x0 if clip is None else x0.clamp(-clip, clip)


def noised(x0: "torch.Tensor", abar: "torch.Tensor", noise: "torch.Tensor") -> "torch.Tensor":
    """The forward process q(x_t | x0): alpha_t x0 + sigma_t eps (per-row abar)."""
    a = _col(abar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def weight_c(abar: "torch.Tensor", weighting: str) -> "torch.Tensor":
    """c(t) of the distillation loss: alpha_t = sqrt(abar_t) ("exponential") or 1 ("uniform")."""
    import torch

    if weighting == "exponential":
        return abar.sqrt()
    if weighting == "uniform":
        return torch.ones_like(abar)
    raise ValueError(f"weighting={weighting!r} is not one of 'exponential', 'uniform'")


@dataclass
class Draw:
    """One step's random draws: data rows, student grid indices and noise, teacher timesteps and noise."""
    idx: "torch.Tensor"
    k: "torch.Tensor"
    noise_s: "torch.Tensor"
    t: "torch.Tensor"
    noise_t: "torch.Tensor"


def draw(gen, n_data: int, batch: int, n_grid: int, shape: tuple, t_max: int) -> Draw:
    """The step's draws, in a fixed order from `gen` (the tests redraw them to compute a step by hand)."""
    import torch

    idx = torch.randint(0, n_data, (batch,), generator=gen)
    k = torch.randint(0, n_grid, (batch,), generator=gen)
    noise_s = torch.randn((batch, *shape), generator=gen)
    t = torch.randint(1, t_max, (batch,), generator=gen)
    noise_t = torch.randn((batch, *shape), generator=gen)
    return Draw(idx, k, noise_s, t, noise_t)


@dataclass
class Setup:
    """What one adversarial distillation run needs. `student_eps(model, x, t, y)` and `teacher_eps(x, t, y)` are
    epsilon-networks with per-row t; `x0`, `y` the training images (real digits for ADD, the teacher's samples for
    LADD) and labels; `disc` the discriminator (None: no adversarial term)."""

    student_eps: Callable
    teacher_eps: Callable
    x0: "torch.Tensor"
    y: "torch.Tensor"
    alphas_cumprod: "torch.Tensor"
    clip: float | None
    grid: "torch.Tensor"
    disc: Discriminator | None


def distill_loss(setup: Setup, x_theta: "torch.Tensor", y: "torch.Tensor", t: "torch.Tensor",
                 noise_t: "torch.Tensor", weighting: str) -> "torch.Tensor":
    """ADD eq. 4: E[c(t) d(x_theta, sg(x_psi))], x_psi the teacher's x0 estimate at x_theta re-noised to t."""
    import torch

    abar = setup.alphas_cumprod[t]
    with torch.no_grad():
        x_t = noised(x_theta.detach(), abar, noise_t)
        target = x0_from_eps(x_t, setup.teacher_eps(x_t, t, y).float(), abar, setup.clip)
    d = ((x_theta - target) ** 2).flatten(1).mean(1)
    return (weight_c(abar, weighting).to(d.dtype) * d).mean()


def scale_grad(x: "torch.Tensor", w: "torch.Tensor") -> "torch.Tensor":
    """x in the forward pass, bit for bit; its gradient multiplied by w (per row) in the backward pass."""
    d = x.detach()
    return d + _col(w, x) * (x - d)


def train(student, setup: Setup, *, steps: int, batch_size: int, lr: float, disc_lr: float, adv_weight: float,
          distill_weight: float, r1_gamma: float, weighting: str, seed: int, student_grad: str = "x0",
          optimizer: str = "adam", progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """`steps` alternating updates (ADD, Algorithm of section 3.2): the discriminator's (L_D with R1, when
    `adv_weight` > 0), then the student's L = adv_weight L_adv^G + distill_weight L_distill. `student` is trained
    in place (float32). Student optimiser: Adam (`optimizer`="sgd" for the tests' hand-computed step);
    discriminator: Adam with beta1 = 0, as GAN heads usually are. Returns per-step losses and their summaries.

    `student_grad`: "x0" back-propagates the losses through x_theta = (x_s - sigma_s eps_theta) / alpha_s as the
    paper does; "eps" scales each row's gradient at x_theta by alpha_s / sigma_s (`scale_grad`; the forward
    values, what D and the teacher see, are unchanged), so the student's gradient is measured in units of the
    epsilon it outputs. With an epsilon-network on DDPM's schedule (alpha_999 / sigma_999 = 1 / 160) the plain
    x0 gradient of the t = 999 rows is 160 times their epsilon's and drowns the other timesteps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    device = setup.x0.device
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    adversarial = adv_weight > 0 and setup.disc is not None
    opt_d = torch.optim.Adam(setup.disc.heads.parameters(), lr=disc_lr, betas=(0.0, 0.99)) if adversarial else None
    abar_all = setup.alphas_cumprod.to(device)
    setup.alphas_cumprod = abar_all
    log: dict[str, list[float]] = {"loss_g": [], "loss_d": [], "adv": [], "distill": [], "r1": [], "d_real": [],
                                   "d_fake": []}
    student.train()
    for _ in range(steps):
        b = draw(gen, setup.x0.shape[0], batch_size, setup.grid.shape[0], tuple(setup.x0.shape[1:]),
                 abar_all.shape[0])
        x0, y = setup.x0[b.idx.to(device)], setup.y[b.idx.to(device)]
        s = setup.grid[b.k].to(device)
        x_s = noised(x0, abar_all[s], b.noise_s.to(device))
        x_theta = x0_from_eps(x_s, setup.student_eps(student, x_s, s, y).float(), abar_all[s], setup.clip)
        if student_grad == "eps":
            x_theta = scale_grad(x_theta, (abar_all[s] / (1 - abar_all[s])).sqrt())
        if adversarial:
            opt_d.zero_grad(set_to_none=True)
            real, fake = setup.disc(x0, y), setup.disc(x_theta.detach(), y)
            r1 = r1_penalty(setup.disc, x0, y, r1_gamma) if r1_gamma > 0 else torch.zeros(())
            loss_d = hinge_d(real, fake) + r1
            loss_d.backward()
            opt_d.step()
            for k, v in (("loss_d", loss_d), ("r1", r1), ("d_real", real.mean()), ("d_fake", fake.mean())):
                log[k].append(float(v.detach()))
        loss = torch.zeros((), device=device)
        if adversarial:
            for p in setup.disc.heads.parameters():
                p.requires_grad_(False)
            adv = hinge_g(setup.disc(x_theta, y))
            for p in setup.disc.heads.parameters():
                p.requires_grad_(True)
            loss = loss + adv_weight * adv
            log["adv"].append(float(adv.detach()))
        if distill_weight > 0:
            dl = distill_loss(setup, x_theta, y, b.t.to(device), b.noise_t.to(device), weighting)
            loss = loss + distill_weight * dl
            log["distill"].append(float(dl.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log["loss_g"].append(float(loss.detach()))
        if progress is not None:
            progress(1)
    student.eval()

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    out: dict[str, Any] = {"losses": log}
    for k, v in log.items():
        if v:
            out[f"{k}_first"], out[f"{k}_last"] = mean(v[:50]), mean(v[-50:])
    return out


SAMPLING_ONLY = ("num_inference_steps", "sampler")  # config fields that do not shape the student's weights


def cached_student(name: str, version: str, subject, task, ctx, cfg, extra_key: tuple, make_setup: Callable):
    """(student denoiser, meta) for method `name`: trained by `train` from the reference's weights, or loaded from
    `bench.cache` with what it cost. The key holds everything that shapes the weights (teacher, schedule, data,
    the config less its sampling-only fields, seed, budget, device, `extra_key`), not `num_inference_steps`: one
    student serves 1 to 4 steps. `make_setup(student)` -> (Setup, note, extra meta) builds the run's data and discriminator
    (its time counts in the training seconds)."""
    import copy
    import dataclasses
    import time

    import torch

    from bench import cache
    from bench.api import SMOKE_STEPS

    steps = ctx.budget.pick(cfg.steps, SMOKE_STEPS)
    train_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAMPLING_ONLY}
    sched = {k: v for k, v in subject.extra["scheduler"].config.items() if not k.startswith("_")}
    k = cache.key(version, task.spec.name, task.spec.version, cache.weights_digest(subject.model), sched, train_cfg,
                  steps, task.data_fingerprint(), ctx.seed, ctx.budget, ctx.device, ctx.dtype, *extra_key)
    path = cache.method_dir(name, task) / f"student-{k}.safetensors"

    def build() -> tuple[dict, dict]:
        t0 = time.perf_counter()
        torch.manual_seed(ctx.seed)
        student = copy.deepcopy(subject.model).to(ctx.device).float()
        for p in student.parameters():
            p.requires_grad_(True)
        setup, note, extra = make_setup(student)
        with ctx.progress.step(f"{name}: adversarial distillation of the {task.spec.name} reference",
                               total=steps) as advance:
            log = train(student, setup, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, disc_lr=cfg.disc_lr,
                        adv_weight=cfg.adv_weight, distill_weight=cfg.distill_weight, r1_gamma=cfg.r1_gamma,
                        weighting=cfg.weighting, seed=ctx.seed, student_grad=cfg.student_grad, progress=advance)
        log.pop("losses")
        meta = {"seconds": time.perf_counter() - t0, "steps": steps, "samples": steps * cfg.batch_size,
                "note": note, **extra, **{k: float(v) for k, v in log.items()}}
        return {n: v.detach().cpu().contiguous() for n, v in student.state_dict().items()}, meta

    state, meta, _, _ = cache.cached_bundle(path, build)
    model = copy.deepcopy(subject.model)
    model.load_state_dict(state)
    model = model.to(next(subject.model.parameters()).dtype).eval()
    shown = ", ".join(f"{k} {meta[k + '_first']:.3f} -> {meta[k + '_last']:.3f}" for k in ("adv", "distill", "d_real",
                      "d_fake") if k + "_first" in meta)
    ctx.progress.log(f"{name}: {meta['steps']} steps in {meta['seconds']:.0f} s; {shown} (first / last 50 steps)")
    return model, meta


def sampling(student_subject, sampler: str, steps: int, name: str, grid_size: int = 4):
    """The student's sampler (an `Applied` with its nfe stats): "ancestral" is ADD's own multi-step sampling (the
    x0 prediction re-noised with fresh noise to the next of the `grid_size` trained timesteps: LCMScheduler's step,
    seeded per image from its initial noise, whose boundary scalings are 1 - 4e-8 at t = 249); "ddim" the task's
    deterministic DDIM (eta 0) at `steps` trailing steps, which visits the same timesteps for 1, 2 and 4 steps."""
    from diffusers import DDIMScheduler

    from baselines.decoding._samplers import with_scheduler
    from baselines.distillation._lcm import seeded_lcm_scheduler

    if sampler == "ancestral":
        return with_scheduler(student_subject, seeded_lcm_scheduler(), steps, name, original_inference_steps=grid_size)
    return with_scheduler(student_subject, DDIMScheduler, steps, name, eta=0.0)


def teacher_control(subject, task, ctx, steps: int):
    """The control: the reference sampled by the task's DDIM in the same number of steps, undistilled: what the
    adversarial training bought over simply taking fewer steps."""
    from diffusers import DDIMScheduler

    from baselines.base import ControlResult
    from baselines.decoding._samplers import with_scheduler

    naive = with_scheduler(subject, DDIMScheduler, steps, "ddim", eta=0.0).subject
    ev = task.evaluate(naive, ctx)
    return ControlResult("teacher_ddim_same_steps", f"the reference sampled by DDIM in {steps} steps, undistilled",
                         ev.value, ev.per_example, 0.0)


def check_common(cfg) -> None:
    """Validation shared by add and ladd (messages name the valid range)."""
    from bench.config import ConfigError, check_range

    if not 1 <= cfg.num_inference_steps <= 4:
        raise ConfigError(f"num_inference_steps={cfg.num_inference_steps} is outside 1 to 4: the student is trained "
                          f"on a 4-step grid of timesteps")
    if cfg.sampler not in ("ancestral", "ddim"):
        raise ConfigError(f"sampler={cfg.sampler!r} is not one of 'ancestral', 'ddim'")
    if cfg.student_grad not in ("eps", "x0"):
        raise ConfigError(f"student_grad={cfg.student_grad!r} is not one of 'eps', 'x0'")
    if cfg.weighting not in ("exponential", "uniform"):
        raise ConfigError(f"weighting={cfg.weighting!r} is not one of 'exponential', 'uniform'")
    check_range("steps", cfg.steps, lo=1)
    check_range("batch_size", cfg.batch_size, lo=1)
    check_range("lr", cfg.lr, lo=0, lo_open=True)
    check_range("disc_lr", cfg.disc_lr, lo=0, lo_open=True)
    check_range("adv_weight", cfg.adv_weight, lo=0)
    check_range("distill_weight", cfg.distill_weight, lo=0)
    check_range("r1_gamma", cfg.r1_gamma, lo=0)
    check_range("disc_hidden", cfg.disc_hidden, lo=1)
    if cfg.adv_weight == 0 and cfg.distill_weight == 0:
        raise ConfigError("adv_weight and distill_weight are both 0: nothing to train; set either > 0")
