"""`ladd`: Latent Adversarial Diffusion Distillation (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with
Latent Adversarial Diffusion Distillation", arXiv:2403.12015): ADD (`add`) with the discriminator's features taken
from the teacher itself, at noised inputs, instead of an external feature network, and trained data-free on the
teacher's own samples.

What changes from ADD (the shared loop, losses and heads are `_adversarial`'s; equations there):

    x0 ~ teacher's sampler  (the task's CalibrationSampling: the reference's own DDIM-50 on noise no evaluation uses)
    D(x, y) = heads( F_teacher( alpha_t^ x + sigma_t^ eps^, t^, y ), y ),   t^ ~ pi(t)
    L_D = E[relu(1 - D(x0))] + E[relu(1 + D(x_theta))] (+ R1),   L = -E[D(x_theta)] (+ lambda L_distill)

F_teacher: the frozen teacher's intermediate activations (forward hooks: a UNet's down blocks and mid block, where
the pass stops; a DiT's transformer blocks), each with a trainable head; gradients reach x_theta through the
frozen teacher. pi(t): LADD samples the discriminator's noise level from a logit-normal on rectified-flow time u in
(0, 1), u = sigmoid(m + s z), and finds higher levels (m = 1, s = 1) favour global structure. Our teacher is a
DDPM, so u is mapped to the DDPM timestep of the same signal-to-noise ratio: SNR(u) = ((1 - u) / u)^2 =
abar_t / (1 - abar_t) (`disc_timesteps`).

The distillation loss is optional (`distill_weight`, default 0 as in the paper, which drops it). R1 is off by
default (`r1_gamma` 0): on teacher features it needs a double backward through the teacher, and LADD trains
without it [our reading of the paper: its discriminator loss is the plain hinge].

Sampling, the student's timesteps (the scheduler's 4-step grid) and the control (`teacher_ddim_same_steps`: the
reference in the same DDIM steps, undistilled) are `add`'s. The student's cost counts the teacher's sampling of its
training set; real data seen: none.

Measured on digits-gen (400 steps): at lr 1e-5 (student_grad eps) 4-step DDIM FID 364.0, class accuracy 67% (the
reference in 4 DDIM steps: 27.4, 99.2%): as with `add`, the student learnt to fool the discriminator's features.
The defaults (lr 1e-6, student_grad x0): 33.0 (98.8%) with DDIM, 65.5 ancestral (the reference: 97.5), 1 step
489.1 (the reference: 589.7): the adversarial student improves the re-noising samplers it is trained for, but
does not beat the reference's own 4 DDIM steps.

Left out of the paper: its scale (an 8B MMDiT, synthetic data from text prompts), the student's shifted timestep
schedule, and the text conditioning (classes enter the heads by projection, as in `add`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.api import CalibrationSampling, require
from bench.config import check_range
from bench.registry import register_method

ALGORITHM_VERSION = "ladd-1"  # part of the cache key: bump when the training changes


@dataclass(frozen=True)
class LADDConfig:
    num_inference_steps: int = 4  # sampling steps, 1 to 4; not in the student's cache key
    # "ancestral": ADD's re-noising of each x0 prediction; "ddim": the task's deterministic DDIM (sampling only).
    # The default student, 4 steps: FID 33.0 with DDIM, 65.5 ancestral (the reference undistilled: 27.4 / 97.5)
    sampler: Literal["ancestral", "ddim"] = "ddim"
    steps: int = 400  # student updates (each after one discriminator update)
    batch_size: int = 32  # teacher samples per step
    # the student's Adam rate. 4-step DDIM FID (ancestral; 1 step): 1e-5 with student_grad eps 364.0 (389.1; 931.5),
    # 1e-6 with student_grad x0 33.0 (65.5; 489.1), against 27.4 (97.5; 589.7) for the reference undistilled
    lr: float = 1e-6
    disc_lr: float = 1e-4  # the discriminator heads' Adam rate (beta1 = 0)
    adv_weight: float = 1.0  # weight of L_adv^G (0 with distill_weight > 0: data-free distillation alone)
    distill_weight: float = 0.0  # lambda of ADD's L_distill: 0, LADD drops it
    r1_gamma: float = 0.0  # R1 on the teacher's samples: off (a double backward through the teacher)
    weighting: Literal["exponential", "uniform"] = "exponential"  # c(t) of L_distill when distill_weight > 0
    disc_hidden: int = 32  # width of each discriminator head
    # the student's gradient at its x0: "eps" rescales each row's by alpha_s / sigma_s (see _adversarial.train),
    # "x0" is the paper's plain back-propagation (its latent schedule has no t where x0 amplifies eps 160-fold)
    student_grad: Literal["eps", "x0"] = "x0"
    teacher_samples: int = 500  # the synthetic training set: samples of the reference's own sampler
    disc_t_mean: float = 1.0  # m of the discriminator's logit-normal noise level (LADD: 1, favouring high noise)
    disc_t_std: float = 1.0  # s of it

    def validate(self) -> None:
        from baselines.distillation._adversarial import check_common

        check_common(self)
        check_range("teacher_samples", self.teacher_samples, lo=1)
        check_range("disc_t_std", self.disc_t_std, lo=0, lo_open=True)


def disc_timesteps(alphas_cumprod, n: int, mean: float, std: float, gen):
    """n DDPM timesteps for the discriminator's noise: u = sigmoid(mean + std z) (LADD's logit-normal on rectified
    flow time), mapped to the timestep whose SNR abar / (1 - abar) is closest above ((1 - u) / u)^2."""
    import torch

    u = torch.sigmoid(mean + std * torch.randn(n, generator=gen)).clamp(1e-4, 1 - 1e-4).double()
    target = (1 - u) ** 2 / ((1 - u) ** 2 + u ** 2)  # abar of SNR ((1 - u) / u)^2
    abar = alphas_cumprod.detach().cpu().double()
    t = torch.searchsorted(-abar, -target)  # first t with abar_t <= target (abar decreases)
    return t.clamp(0, abar.shape[0] - 1).to(torch.int64)


class _Stop(Exception):
    """Raised by the deepest hook: the teacher's remaining layers are not needed."""


def feature_modules(model) -> list:
    """The teacher's blocks whose outputs the discriminator reads: a UNet's down blocks and mid block, a DiT's
    transformer blocks."""
    if getattr(model, "mid_block", None) is not None and hasattr(model, "down_blocks"):
        return [*model.down_blocks, model.mid_block]
    if hasattr(model, "transformer_blocks"):
        return list(model.transformer_blocks)
    raise ValueError(f"ladd reads the teacher's blocks: {type(model).__name__} has neither down_blocks + mid_block "
                     f"(a UNet) nor transformer_blocks (a DiT)")


def teacher_features(teacher, denoise, alphas_cumprod, mean: float, std: float, seed: int):
    """features(x, y): the teacher's block outputs (N x C x L) at x noised to t ~ pi(t), read from a frozen copy
    (no parameter gradients: the discriminator trains only its heads, the student only itself)."""
    import copy

    import torch

    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    modules = feature_modules(teacher)
    gen = torch.Generator().manual_seed(seed)
    dtype = next(teacher.parameters()).dtype

    def features(x, y):
        t = disc_timesteps(alphas_cumprod, x.shape[0], mean, std, gen).to(x.device)
        a = alphas_cumprod.to(x.device)[t].to(x.dtype).reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=gen).to(x)
        got: list = []

        def hook(mod, inp, out):
            f = out[0] if isinstance(out, tuple) else out
            got.append(f.transpose(1, 2) if f.dim() == 3 else f)  # DiT tokens N x L x C -> N x C x L
            if mod is modules[-1]:
                raise _Stop

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            denoise(teacher, x_t.to(dtype), t, y, 0)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return got

    return features


@register_method("ladd", family="distillation", paper="Sauer et al., Fast High-Resolution Image Synthesis with "
                 "Latent Adversarial Diffusion Distillation", year=2024, url="https://arxiv.org/abs/2403.12015",
                 modalities=("image-generation",), requires=(CalibrationSampling,),
                 summary="ADD with the discriminator on the frozen teacher's own block features at noised inputs, "
                         "trained data-free on the teacher's samples; 1-4 steps")
class LatentAdversarialDiffusionDistillation(Method):
    Config = LADDConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.decoding._samplers import check_diffusion_subject
        from baselines.distillation import _adversarial as A
        from tasks.base import Subject

        cfg = self.config
        check_diffusion_subject(subject, "ladd")
        require(task, CalibrationSampling, "ladd trains on the reference's own samples")
        feature_modules(subject.model)  # refuse an unknown backbone before any sampling

        model, meta = A.cached_student("ladd", ALGORITHM_VERSION, subject, task, ctx, cfg, (),
                                       lambda student: self.setup(subject, task, ctx))
        applied = A.sampling(Subject(model, subject.kind, subject.extra), cfg.sampler, cfg.num_inference_steps, "ladd")
        applied.cost = Cost(meta["seconds"], meta["steps"], meta["samples"],
                            f"{meta['note']}, then {meta['steps']} LADD steps at batch {cfg.batch_size} (each: one "
                            f"discriminator update on teacher features, one student update through the frozen "
                            f"teacher); data-free: real data seen 0")
        applied.controls = [A.teacher_control(subject, task, ctx, cfg.num_inference_steps)]
        sampler_stats = applied.stats

        def stats() -> dict[str, float]:
            out = dict(sampler_stats())
            out.update({k: float(v) for k, v in meta.items() if k.endswith(("_first", "_last"))})
            out["teacher_samples"] = float(meta["teacher_samples"])
            out["teacher_sampling_seconds"] = float(meta["teacher_sampling_seconds"])
            return out

        applied.stats = stats
        return applied

    def setup(self, subject, task, ctx):
        """(`_adversarial.Setup`, note): the teacher's samples as the training set, the discriminator on the
        teacher's features."""
        import time

        import torch

        from baselines.distillation import _adversarial as A
        from baselines.distillation._progressive import x0_clip
        from tasks.base import Subject

        cfg = self.config
        sched, denoise, teacher = subject.extra["scheduler"], subject.extra["denoise"], subject.model
        n = ctx.budget.pick(cfg.teacher_samples, min(cfg.teacher_samples, 8))
        labels: list = []

        def recording(model, x, t, y, i):  # the calibration's labels, read as the sampler passes them
            if i == 0:
                labels.append(y.detach().clone())
            return denoise(model, x, t, y, i)

        t0 = time.perf_counter()
        with ctx.progress.step(f"ladd: sampling {n} training images from the reference"):
            x0 = require(task, CalibrationSampling).sample_calibration(
                Subject(teacher, subject.kind, {**subject.extra, "denoise": recording}), n, ctx)
        x0, y = x0.clone().float().to(ctx.device), torch.cat(labels).clone().to(ctx.device)
        seconds = time.perf_counter() - t0
        dtype = next(teacher.parameters()).dtype
        abar = sched.alphas_cumprod.float()

        def teacher_eps(x, t, c):
            return denoise(teacher, x.to(dtype), t, c, 0).float()

        def student_eps(model, x, t, c):
            return denoise(model, x, t, c, 0)

        feats = teacher_features(teacher, denoise, abar, cfg.disc_t_mean, cfg.disc_t_std, ctx.seed + 1)
        disc = A.Discriminator(feats, x0[:2], y[:2], int(y.max()) + 1, cfg.disc_hidden, ctx.seed)
        setup = A.Setup(student_eps, teacher_eps, x0, y, abar, x0_clip(sched.config), A.student_grid(sched), disc)
        return setup, f"{n} images sampled from the reference ({seconds:.0f} s)", \
            {"teacher_samples": n, "teacher_sampling_seconds": seconds}
