"""`freeflow`: flow-map distillation without data (Tong, Ma, Xie & Jaakkola 2025, "Flow Map Distillation Without
Data", arXiv:2511.19428). A flow-map student f_theta(x_t, t, s), which carries a point at time t to time s along
the teacher's probability-flow ODE, is trained from prior samples and the teacher alone, and sampled in 1, 2 or 4
jumps; no training image is ever read (the record's `cost.samples_seen` is 0 real images).

1. The epsilon teacher as a velocity field (derived; `_freeflow.velocity`, tested). The references predict
   epsilon on DDPM's linear schedule: x_t = alpha_t x0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t =
   sqrt(1 - abar_t). Re-timing to the flow-matching interpolant,

       tau_t = sigma_t / (alpha_t + sigma_t),    y = x_t / (alpha_t + sigma_t)  =>  y = (1 - tau) x0 + tau eps,

   exactly (divide x_t by alpha_t + sigma_t). The probability-flow velocity is the conditional mean of d y /
   d tau = eps - x0 given y,

       u(y, tau) = eps^ - x0^ = (eps^ - y) / (1 - tau),      x0^ = (y - tau eps^) / (1 - tau),

   with eps^ the network's output at x_t = (alpha_t + sigma_t) y and the timestep t of that tau (1 - tau > 0:
   tau_999 = 0.9937). The probability-flow ODE depends on the schedule only through the signal-to-noise ratio,
   which tau carries, so this is the ODE DDIM integrates: in DDIM's variables xbar = x / alpha, lambda = sigma /
   alpha (d xbar / d lambda = eps^, Song et al. 2021's eq. 14), xbar = y / (1 - tau) and lambda = tau / (1 - tau),
   and d y / d tau = -xbar + (1 - tau) eps^ d lambda / d tau = (eps^ - y) / (1 - tau). One step of it with eps^
   held fixed,

       y_s = y_t + (tau_s - tau_t) u(y_t, tau_t) = ((1 - tau_s) y_t + (tau_s - tau_t) eps^) / (1 - tau_t),

   is DDIM's step re-timed (sqrt(abar_s) x0^ + sqrt(1 - abar_s) eps^, divided by alpha_s + sigma_s), so DDIM is
   Euler in (y, tau) and converges to this ODE in the small-step limit. The tests check both on Gaussian data
   N(mu, s^2), whose exact epsilon, sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2), and exact ODE solution (the
   standardised value (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is constant along a path) are known. The task's
   sampler clips x0^ to [-1, 1]; `clip` (default on) clips x0^ inside u the same way (which bounds the velocity
   at tau near 1, where x0^ multiplies epsilon errors by 1 / (1 - tau) = 158), and `clip=false` is the exact ODE.

2. The student (`_freeflow.flow_map_student`, `flow_map`). The paper's parameterisation,

       f_theta(y, t, s) = y + (tau_s - tau_t) v_theta(y, t, s),    v_theta = eps_theta - x0_theta = u of eps_theta,

   makes f(y, t, t) = y exact (the tests check it bit for bit, with a trained s-branch too). eps_theta is the
   reference's own network (initialised from it) with the target time s added through the timestep-embedding
   sum: every diffusers `TimestepEmbedding` (the UNet's `time_embedding`; each DiT block's) returns emb(t) +
   branch(sin(1000 tau_s)), the branch a copy of the t-MLP whose output layer starts at zero. The architecture
   is the reference's plus those branches (20.6 k parameters on the digits UNet), and at initialisation the
   student is the teacher exactly, so f_theta(y, t, s) is then one DDIM step of the reference from t to s (by
   the identity in 1): the student starts as DDIM-n and learns to jump where n small steps would have gone. A
   "blended time" alone (one timestep fed to an unchanged network) could not tell a jump to s from one to s'.

3. Predictor (the paper's generating-velocity objective). Along the student's own path from a prior sample,
   the flow map's derivative in s must be the teacher's velocity at the point it reached:
   d/ds f_theta(y, t, s) = u(f_theta(y, t, s), tau_s). On the predictor's grid (every `skip` timesteps, which
   holds the sampling starts 999, 749, 499, 249, then CLEAN = the data) its finite-difference form is

       L_P = w || f_theta(y_t, t, s) - sg[ f+ + (tau_s - tau_s+) u(f+, tau_s+) ] ||^2,    f+ = f_theta(y_t, t, s+),

   s+ the grid point above s (f+ = y_t when s+ = t): the student's own point one grid step earlier, moved by the
   teacher's instantaneous velocity there (that Euler move is one teacher DDIM step, by 1). Its gradient is
   w (tau_s - tau_s+)^2 (d_s f - u) . d f / d theta in the small-step limit: the paper's velocity residual;
   `weighting` "velocity" sets w = 1 / (tau_s - tau_s+)^2 (the residual itself), "position" w = 1 (the error
   where the sample is), "eps-row" (default) w = ((1 - tau_t) / (tau_t - tau_s))^2 and "eps" w = 1 / (d f /
   d eps_theta)^2 per pixel: the error in units of the network's own output. f moves by (tau_s - tau_t) /
   (1 - tau_t) per unit of eps_theta where x0^ is not clipped (158 (tau_t - tau_s) at t = 999 against
   2 (tau_t - tau_s) at t = 249) and by (tau_s - tau_t) where it is; "eps-row" takes every pixel as unclipped.
   Measured in position, the jumps from t = 999 dominate the shared weights (every FID got worse than the
   untrained student's). "eps-row" leaves the one-jump map (t = 999 -> data, mostly clipped pixels) almost no
   weight: its 2- and 4-step students are the best measured (FID 13.1, 9.11) and its 1-step one is not (360);
   "eps" trains the one-jump map (202) at the others' cost (48.9, 18.2). t is one of the sampling
   starts, s any grid point below it; the start y_t is the student's own path point y_t = f_theta(y_T, T, t)
   from y_T = x_T / (alpha_T + sigma_T), x_T ~ N(0, I) (labels uniform over the model's classes): prior only.

4. Corrector (the paper's distribution matching of noising velocities). The predictor follows the teacher
   from points the student itself reached, so its errors compound; the corrector pulls the distribution of the
   student's generated images back to the teacher's. For x^ = f_theta(y_t, t, CLEAN) (a share `end_fraction`
   of every batch ends at CLEAN), noised to r ~ U{20 .. 980}, x_r = alpha_r x^ + sigma_r eps, the velocity of
   the noised student distribution is tracked by an auxiliary model (the reference's architecture, initialised
   from it, trained by the epsilon objective on sg[x^]: flow matching in epsilon units), and the teacher's
   velocity is the reference's. Their difference is the gradient of KL(q_r || p_r) with respect to x^ (score
   and velocity are affine in each other at fixed r: the score of the noised law is -(y + (1 - r) u) / r in flow
   coordinates), used as variational score distillation / DMD use it: g = (x0_fake(x_r) - x0_teacher(x_r)) /
   mean |x^ - x0_teacher(x_r)|, L_C = 1/2 || x^ - sg[x^ - g] ||^2 (dL_C / dx^ = g), weight `corrector`.

5. Sampling. n jumps from the task's initial noise x_T at diffusers' DDIM timesteps for n (trailing: 999; 999,
   499; 999, 749, 499, 249) to CLEAN, through `Subject.extra["sample"]` (the task's loop is a scheduler loop with
   one timestep per call; a flow map needs (t, s)). One trained student serves every n in `train_for`, so
   `num_inference_steps` is a sampling setting outside the cache key; n must be in `train_for`.

Control (`distilled_with_data`): the same student, same objectives, steps, batch and seed, but its start states
drawn from the data-noising distribution, y_t = (1 - tau_t) x0 + tau_t eps with the task's training digits and
their labels (as LCM and progressive draw theirs), instead of the student's own path. Everything else is equal,
so the FID difference is the measured value of the paper's claim that prior-only states lose nothing (its
"teacher-data mismatch"). Its training time is the control's `cost_seconds`; its real images seen are in
`method_stats` (`control_real_samples_seen`).

Cost: the record's cost is the method's own training (seconds, steps, 0 real samples seen; the prior samples
drawn are in the description and `method_stats`). The `training` block is not used: it describes a method whose
product is a smaller training set (its `samples_seen` must be >= 1), which this is not.

Left out of the paper, and why: its JVP form of d_s f (torch.func.jvp through a diffusers UNet with the
s-branch is possible but costs a second pass at every point; the finite difference on a 20-point grid is the
paper's own cheaper variant in spirit and needs no derivative of the network), time sampled continuously (the
student is trained on the grid its samplers use: the 2-core budget cannot cover the continuum), classifier-free
guidance in the teacher (the digits references have none) and the EMA of the student. Students are cached under
everything that shapes their weights, with their training cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, ControlResult, Cost, Method
from bench.api import TrainingSplit, require
from bench.config import ConfigError, check_range
from bench.registry import register_method

ALGORITHM_VERSION = "1"  # part of the cache key: bump when the training changes
SMOKE_TRAIN_STEPS = 2  # optimiser steps under `--budget smoke`
SOURCES = {"prior": "data-free: start states on the student's own path from x_T ~ N(0, I)",
           "data": "with data: start states noised from the task's training images"}


@dataclass(frozen=True)
class FreeFlowConfig:
    # flow-map jumps at sampling (the paper reports 1 and more); a sampling setting, not in the cache key
    num_inference_steps: int = 1
    # the step counts the one student is trained for: their DDIM starts (999; 999, 499; 999, 749, 499, 249)
    # are the predictor's start times
    train_for: tuple[int, ...] = (1, 2, 4)
    skip: int = 50  # the predictor's grid: every skip-th timestep from 999 (a 20-point grid), plus the starts
    steps: int = 250  # Adam steps (each: 2 student and 1 teacher pass at batch_size, plus the corrector's rows)
    batch_size: int = 32
    lr: float = 1e-4  # Adam on the reference's weights in the student
    branch_lr: float = 1e-3  # Adam on the s-branches (start at zero; 100 steps, "eps-row": 2/4-step FID 13.2/9.5
    # at 1e-4/1e-3 against 17.9/11.9 at 1e-5/1e-4)
    # w of the predictor (module docstring, 3). Measured (250 steps, 1/2/4-step FID): "eps-row" 360/13.1/9.11,
    # "eps" (per pixel) 202/48.9/18.2, untrained 264/105/24.6; "position" made every FID worse within 100 steps
    # (4 steps 69-1250 at the rates tried). "eps-row" is the default for its 2- and 4-step students
    weighting: Literal["eps", "eps-row", "position", "velocity"] = "eps-row"
    # weight of the distribution-matching corrector (0: the predictor alone). At 1 (end_fraction 0.25, 250 steps,
    # "eps-row") it ruined the student: 1/2/4-step FID 427/199/372; its DMD direction is normalised to ~1 per
    # pixel while the predictor's epsilon-unit loss is ~5e-4, so weights near 1e-3 are where to look (untested)
    corrector: float = 0.0
    # share of each batch whose target is forced to the data itself (the corrector's samples; with corrector 0
    # the uniform draw alone, as measured)
    end_fraction: float = 0.0
    fake_lr: float = 1e-4  # Adam on the corrector's auxiliary model of the student's noising velocity
    clip: bool = True  # clip x0^ to the data range inside every velocity, as the task's sampler clips
    control: bool = True  # also distil with data (the record's control); false: the method alone

    def validate(self) -> None:
        check_range("num_inference_steps", self.num_inference_steps, lo=1, hi=1000)
        if not self.train_for:
            raise ConfigError("train_for must name at least one step count (for example 1,2,4)")
        for n in self.train_for:
            check_range("train_for", n, lo=1, hi=1000)
        if self.num_inference_steps not in self.train_for:
            raise ConfigError(f"num_inference_steps={self.num_inference_steps} is not among the step counts the "
                              f"student is trained for (train_for={','.join(map(str, self.train_for))}): add it "
                              f"to train_for or sample at one of those")
        check_range("skip", self.skip, lo=1, hi=999)
        check_range("steps", self.steps, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("branch_lr", self.branch_lr, lo=0, lo_open=True)
        check_range("fake_lr", self.fake_lr, lo=0, lo_open=True)
        check_range("corrector", self.corrector, lo=0)
        check_range("end_fraction", self.end_fraction, lo=0, hi=1)
        if self.corrector > 0 and self.end_fraction == 0:
            raise ConfigError(f"corrector={self.corrector} needs generated images: end_fraction must be > 0 (the "
                              f"share of each batch that jumps to the data), or set corrector=0")
        if self.weighting not in ("eps", "eps-row", "position", "velocity"):
            raise ConfigError(f"weighting={self.weighting!r} is not one of 'eps', 'eps-row', 'position', "
                              f"'velocity'")


def num_classes(model) -> int:
    """The class labels a class-conditional diffusers denoiser takes, from its config (the prior's labels are
    drawn uniformly over them: nothing of the data is read)."""
    cfg = getattr(model, "config", {})
    for key in ("num_class_embeds", "num_embeds_ada_norm"):
        value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        if value:
            return int(value)
    raise ValueError(f"freeflow draws prior labels uniformly over the denoiser's classes; "
                     f"{type(model).__name__} declares none (num_class_embeds / num_embeds_ada_norm)")


@register_method("freeflow", family="distillation",
                 paper="Tong, Ma, Xie & Jaakkola, Flow Map Distillation Without Data", year=2025,
                 url="https://arxiv.org/abs/2511.19428", modalities=("image-generation",),
                 requires=(TrainingSplit,),
                 summary="data-free flow-map student (predictor on its own path from prior samples, "
                         "distribution-matching corrector), 1-4 jumps; control: the same distilled with data")
class FreeFlow(Method):
    Config = FreeFlowConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.decoding._samplers import check_diffusion_subject

        cfg = self.config
        check_diffusion_subject(subject, "freeflow")
        if subject.extra.get("guidance_scale") is not None:
            raise ConfigError(f"freeflow distils a purely conditional epsilon teacher (the digits-gen tasks); task "
                              f"{task.spec.name!r} samples with classifier-free guidance, which is not supported")
        pred = subject.extra["scheduler"].config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"freeflow converts an epsilon-prediction teacher to a velocity; this scheduler's "
                             f"prediction_type is {pred!r} (valid: 'epsilon')")
        student, meta = self.distilled(subject, task, ctx, "prior")
        applied = self.sampled(student, subject, task, ctx)
        applied.cost = Cost(meta["seconds"], meta["steps"], 0,
                            f"{meta['steps']} Adam steps of FreeFlow distillation (predictor"
                            f"{' + corrector' if cfg.corrector > 0 else ''}, batch {cfg.batch_size}) from "
                            f"{meta['prior_samples']} prior samples x_T ~ N(0, I); 0 real training images seen")
        stats = {"real_samples_seen": 0.0, "prior_samples": float(meta["prior_samples"]),
                 **{f"loss_{k}": float(v) for k, v in meta["log"].items() if v == v}}
        if cfg.control:
            control, cmeta = self.distilled(subject, task, ctx, "data")
            ev = task.evaluate(self.sampled(control, subject, task, ctx).subject, ctx)
            applied.controls = [ControlResult(
                "distilled_with_data", f"the same flow-map student, objectives, steps and seed, its start states "
                f"noised from the task's training images ({cmeta['real_samples']} real images seen) instead of "
                f"drawn on its own path from the prior; sampled in {cfg.num_inference_steps} jump(s)",
                ev.value, ev.per_example, cmeta["seconds"])]
            stats.update(control_real_samples_seen=float(cmeta["real_samples"]),
                         control_train_seconds=float(cmeta["seconds"]))
        sampler_stats = applied.stats

        def all_stats() -> dict[str, float]:
            return {**sampler_stats(), **stats}

        applied.stats = all_stats
        return applied

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sampled(self, student, subject, task, ctx) -> Applied:
        """The subject that samples `student` in `num_inference_steps` jumps (stats: nfe per batch)."""
        from baselines.distillation import _freeflow as F
        from tasks.base import Subject

        cfg = self.config
        ft = F.flow_time(subject.extra["scheduler"].alphas_cumprod)
        starts = F.sampling_timesteps(subject.extra["scheduler"].config, cfg.num_inference_steps)
        clip = 1.0 if cfg.clip else None
        counts = {"calls": 0, "batches": 0}

        def sample(sub, noise, labels):
            counts["batches"] += 1
            counts["calls"] += len(starts)
            return F.sample(sub.model, noise, labels, ft, starts, clip)

        extra = dict(subject.extra, sample=sample, num_inference_steps=cfg.num_inference_steps)
        model = student.to(device=ctx.device, dtype=ctx.torch_dtype).eval()

        def stats() -> dict[str, float]:
            return {"nfe": counts["calls"] / max(counts["batches"], 1),
                    "num_inference_steps": float(cfg.num_inference_steps)}

        return Applied(Subject(model, subject.kind, extra), stats=stats)

    # ---- training -----------------------------------------------------------------------------------------------
    def distilled(self, subject, task, ctx, source: str):
        """(student, meta) for `source` "prior" (the method) or "data" (the control): trained, or loaded from the
        bench cache with what its training measured."""
        import dataclasses

        from baselines.distillation import _freeflow as F
        from bench import cache

        cfg = self.config
        steps = ctx.budget.pick(cfg.steps, SMOKE_TRAIN_STEPS)
        train_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("num_inference_steps", "control")}
        sched = {k: v for k, v in subject.extra["scheduler"].config.items() if not k.startswith("_")}
        k = cache.key(ALGORITHM_VERSION, task.spec.name, task.spec.version, cache.weights_digest(subject.model),
                      sched, train_cfg, source, task.data_fingerprint() if source == "data" else "no data", steps,
                      ctx.seed, ctx.budget, ctx.device)
        path = cache.method_dir("freeflow", task) / f"student-{source}-{k}.safetensors"

        def build() -> tuple[dict, dict]:
            model, meta = self.train(subject, task, ctx, source, steps)
            return {n: v.detach().cpu().contiguous() for n, v in model.state_dict().items()}, meta

        state, meta, _, _ = cache.cached_bundle(path, build)
        student = F.flow_map_student(subject.model, subject.extra["denoise"])
        student.load_state_dict(state)
        ctx.progress.log(f"freeflow ({source}): {meta['steps']} steps in {meta['seconds']:.0f} s, predictor loss "
                         f"{meta['log']['predictor_first']:.5f} -> {meta['log']['predictor_last']:.5f}")
        return student, meta

    def train(self, subject, task, ctx, source: str, steps: int):
        import copy
        import time

        import torch

        from baselines.distillation import _freeflow as F

        cfg = self.config
        t0 = time.perf_counter()
        teacher, denoise = subject.model, subject.extra["denoise"]
        sched = subject.extra["scheduler"]
        ft = F.flow_time(sched.alphas_cumprod)
        starts = sorted({t for n in cfg.train_for for t in F.sampling_timesteps(sched.config, n)}, reverse=True)
        teacher_dtype = next(teacher.parameters()).dtype

        def teacher_eps(x, t, labels):
            with torch.no_grad():
                return denoise(teacher, x.to(teacher_dtype), t, labels, 0).float()

        data_x = data_y = None
        if source == "data":
            data = require(task, TrainingSplit, "freeflow's control distils with the task's training images") \
                .training_split()
            data_x, data_y = data.x.to(ctx.device).float(), data.y.to(ctx.device)
        shape = tuple(data_x.shape[1:]) if data_x is not None else self.image_shape(teacher)
        setup = F.Setup(teacher_eps, ft, 1.0 if cfg.clip else None, starts, F.path_grid(starts, cfg.skip, ft.last),
                        source, num_classes(teacher), shape, denoise, data_x, data_y)
        student = F.flow_map_student(teacher, denoise).to(ctx.device).float()
        for p in student.parameters():
            p.requires_grad_(True)
        fake = None
        if cfg.corrector > 0:
            fake = copy.deepcopy(teacher).to(ctx.device).float()
            for p in fake.parameters():
                p.requires_grad_(True)
        with ctx.progress.step(f"FreeFlow distillation ({SOURCES[source]})", total=steps) as advance:
            log = F.distil(student, setup, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, branch_lr=cfg.branch_lr,
                           weighting=cfg.weighting, corrector=cfg.corrector, end_fraction=cfg.end_fraction,
                           fake=fake, fake_lr=cfg.fake_lr, seed=ctx.seed, progress=advance)
        seconds = time.perf_counter() - t0
        n = steps * cfg.batch_size
        return student, {"seconds": seconds, "steps": steps, "log": log,
                         "prior_samples": n if source == "prior" else 0, "real_samples": n if source == "data" else 0}

    @staticmethod
    def image_shape(model) -> tuple[int, ...]:
        """(channels, height, width) of the denoiser's samples, from its config."""
        cfg = model.config
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), *map(int, size))

