"""`progressive`: progressive distillation of a diffusion sampler (Salimans & Ho, 2022, "Progressive Distillation
for Fast Sampling of Diffusion Models", arXiv:2202.00512; ICLR 2022).

A student, initialised from the teacher, learns to take in one DDIM step what the teacher takes in two
(Algorithm 2): for x from the data, t one of the student's N timesteps and z_t = alpha_t x + sigma_t eps,

    z_t', z_t''  = two teacher DDIM steps from z_t                                     (t > t' > t'')
    x~           = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    L            = w(lambda_t) || x~ - x^_theta(z_t) ||^2     (max(SNR, 1), "truncated SNR", in the paper)

then the student becomes the teacher and N halves, round after round, from `teacher_steps` down to
`target_steps`. The arithmetic is in `baselines.distillation._progressive`, hand-written because diffusers has no
progressive distillation and its `DDIMScheduler.step` takes one timestep per batch (training draws one per
example); it reproduces that step exactly, so the student is trained for the very sampler it is timed with
(diffusers' `DDIMScheduler` at `target_steps`, through `Subject.extra`).

Parameterisation and loss. The paper's students predict x or v, since an epsilon-prediction can not give x at
SNR 0. The digits-gen references predict epsilon, and at t = 999 alpha-bar is 4e-5 (not 0): the x0 implied by
epsilon, (z_t - sigma_t eps) / alpha_t, multiplies an epsilon error by 160. The student keeps the teacher's
epsilon output (a new output parameterisation would have to be learnt again from the start, which the reference
took 15 minutes to learn), so the loss is a choice (`weighting`):
- "sampler" (default): the student's own DDIM step from z_t, with x0 clipped to [-1, 1] as the task's sampler
  clips it, must land on the teacher's two-step z_t'': L = || DDIM_student(z_t) - z_t'' ||^2. Where nothing
  clips this is the paper's x-space loss with weight (alpha_t'' - (sigma_t''/sigma_t) alpha_t)^2, which is 1 at
  the last step (like max(SNR, 1) there) and ~0.003 at t = 999 of a 4-step student, where the paper's weight
  is 1;
- "truncated-snr": the paper's max(SNR, 1) || x~ - x^ ||^2, x~ clipped to the data range (the nearest x0 a
  clipped step can use). Unstable with an epsilon student: at t = 999 the teacher-as-student's loss is ~30
  (its unclipped x0 reaches +-30) against < 0.11 at every other step of an 8-to-4 round, and its gradients
  drag the shared weights (measured on one 8-to-4 round, 60 steps at batch 16, lr 1e-4, 20 proxy images:
  sample MSE to the 8-step teacher 0.039, against 0.0051 for the undistilled teacher in 4 steps; "sampler"
  0.0022; "snr" 0.0058; "truncated-snr" at lr 1e-5 0.019);
- "snr": SNR || x~ - x^ ||^2 = || eps~ - eps ||^2, the teacher's own objective.
x~ and z_t'' are computed in float64 (x~'s denominator is ~0.003 at t = 999 in a 64-to-32 round).

Cost and quality per round (stats `round<k>_*`): training steps and seconds, the mean loss over the first and
last tenth of the round, and a cheap quality proxy on a fixed batch of `PROXY_SIZE` noises: the MSE (pixels in
[-1, 1]) of the student's N-step samples to the round's teacher's 2N-step samples from the same noise, beside
the same MSE of the teacher itself sampled in N steps (what halving the steps costs without distillation).
The result also carries a control: the reference sampled by the same DDIM at `target_steps`, undistilled.
Students are cached under `BENCH_CACHE`, keyed by the teacher's weights, the schedule, the data, the config,
the seed, the budget and the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, ControlResult, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import TrainingSplit, require
from bench.registry import register_method

ALGORITHM_VERSION = "1"  # part of the cache key: bump when the training changes
PROXY_SIZE = 50  # noises of the per-round quality proxy
PROXY_SEED = 20_000  # its noise: seed + PROXY_SEED, apart from the evaluation's and the workload's
SMOKE_ROUND_STEPS = 2  # optimiser steps per round under `--budget smoke`


@dataclass(frozen=True)
class ProgressiveConfig:
    # N0, the teacher's DDIM steps in the first round: 32 is close to the 50-step reference (DDIM-20 already
    # matches its quality here) and a power of two over the target, so every round halves exactly
    teacher_steps: int = 32
    target_steps: int = 4  # the student's DDIM steps after the last round (the paper goes down to 1-8)
    # Adam steps per round: 300 at batch 32 is ~1.3 min on 2 loaded CPU cores, ~4 min for three rounds (the paper
    # trains 50k steps per round on CIFAR-10; the student starts as the teacher, so a short round already helps)
    steps_per_round: int = 300
    batch_size: int = 32  # examples per step (the reference was trained at 128)
    # Adam, linearly annealed to 0 within each round as in the paper; a fine-tuning rate (3e-4 did worse than
    # 1e-4 on the 8-to-4 round: sample MSE 0.0038 against 0.0022)
    lr: float = 1e-4
    # the loss (see _progressive.student_loss): "sampler" matches the student's clipped DDIM step to the teacher's
    # two steps in z-space; the paper's x-space "truncated-snr" diverges with an epsilon student (module docstring)
    weighting: Literal["sampler", "truncated-snr", "snr"] = "sampler"

    def validate(self) -> None:
        check_range("target_steps", self.target_steps, lo=1)
        check_range("teacher_steps", self.teacher_steps, lo=2, hi=1000)
        rounds, n = 0, self.teacher_steps
        while n > self.target_steps and n % 2 == 0:
            n, rounds = n // 2, rounds + 1
        if n != self.target_steps or rounds == 0:
            raise ConfigError(f"teacher_steps={self.teacher_steps} must be target_steps={self.target_steps} times "
                              f"a power of two (2, 4, 8, ...): each round halves the steps; valid teacher_steps "
                              f"for this target: {', '.join(str(self.target_steps * 2 ** k) for k in range(1, 6))}")
        check_range("steps_per_round", self.steps_per_round, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        if self.weighting not in ("sampler", "truncated-snr", "snr"):
            raise ConfigError(f"weighting={self.weighting!r} is not one of 'sampler', 'truncated-snr', 'snr'")

    def rounds(self) -> list[tuple[int, int]]:
        """(teacher steps, student steps) of each round."""
        out, n = [], self.teacher_steps
        while n > self.target_steps:
            out.append((n, n // 2))
            n //= 2
        return out


def state_digest(model) -> str:
    """The teacher's identity: `bench.cache.weights_digest` (before 2026-12 a hash of its own format, so a
    progressive student cached by an earlier version is trained again, once, deterministically)."""
    from bench import cache

    return cache.weights_digest(model)


def student_key(subject, task, cfg: ProgressiveConfig, ctx) -> str:
    """The cache key of the student: everything its training depends on. The scheduler config enters without
    diffusers' private `_*` entries: its `_use_default_values` is a list made from a set, whose order changes from
    process to process with Python's string hashing."""
    import dataclasses

    from bench import cache

    sched = {k: v for k, v in subject.extra["scheduler"].config.items() if not k.startswith("_")}
    return cache.key(ALGORITHM_VERSION, task.spec.name, state_digest(subject.model), sched,
                     dataclasses.asdict(cfg), task.data_fingerprint(),
                     ctx.seed, ctx.budget, ctx.device)


def sample_with(model, subject, steps: int, noise, labels):
    """Images from `model` in the subject's own sampling loop with its DDIM at `steps` steps."""
    from tasks.base import Subject
    from tasks._kit.diffusion import sample

    return sample(Subject(model, subject.kind, dict(subject.extra, num_inference_steps=steps)), noise, labels)


def distill(subject, data_x, data_y, cfg: ProgressiveConfig, seed: int, smoke: bool, progress=None):
    """All rounds from the subject's model; returns (student, per-round records). Deterministic given seed."""
    import copy

    import torch

    from baselines.distillation import _progressive as P
    from tasks._kit.classification import seed_everything

    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    sched_cfg = subject.extra["scheduler"].config
    clip = P.x0_clip(sched_cfg)
    denoise = subject.extra["denoise"]
    dev = data_x.device
    pgen = torch.Generator().manual_seed(seed + PROXY_SEED)
    n_proxy = 4 if smoke else PROXY_SIZE
    noise = torch.randn(n_proxy, *data_x.shape[1:], generator=pgen).to(dev)
    labels = (torch.arange(n_proxy) % (int(data_y.max()) + 1)).to(dev)
    steps = min(cfg.steps_per_round, SMOKE_ROUND_STEPS) if smoke else cfg.steps_per_round
    teacher = copy.deepcopy(subject.model).float().eval()
    records = []
    for k, (n_teacher, n_student) in enumerate(cfg.rounds(), start=1):
        tplan, splan = P.ddim_plan(sched_cfg, n_teacher, str(dev)), P.ddim_plan(sched_cfg, n_student, str(dev))
        assert torch.equal(tplan.timesteps[::2], splan.timesteps), "the student's timesteps nest in the teacher's"
        student = copy.deepcopy(teacher)
        desc = f"progressive round {k}: {n_teacher} -> {n_student} DDIM steps"
        if progress is not None:
            with progress.step(desc, total=steps) as advance:
                rec = P.distill_round(teacher, student, denoise, data_x, data_y, tplan, splan, clip, steps,
                                      cfg.batch_size, cfg.lr, cfg.weighting, gen, advance)
        else:
            rec = P.distill_round(teacher, student, denoise, data_x, data_y, tplan, splan, clip, steps,
                                  cfg.batch_size, cfg.lr, cfg.weighting, gen)
        target = sample_with(teacher, subject, n_teacher, noise, labels)
        rec.update(teacher_steps=n_teacher, student_steps=n_student,
                   mse_student=float(((sample_with(student, subject, n_student, noise, labels) - target) ** 2)
                                     .mean()),
                   mse_naive=float(((sample_with(teacher, subject, n_student, noise, labels) - target) ** 2).mean()))
        if progress is not None:
            progress.log(f"{desc}: {rec['steps']} steps, {rec['seconds']:.0f} s, loss {rec['loss_first']:.4f} -> "
                         f"{rec['loss_last']:.4f}; sample MSE to the teacher's {n_teacher}-step samples: "
                         f"{rec['mse_student']:.4f} (teacher in {n_student} steps: {rec['mse_naive']:.4f})")
        records.append(rec)
        teacher = student
    return teacher, records


@register_method("progressive", family="distillation",
                 paper="Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models", year=2022,
                 url="https://arxiv.org/abs/2202.00512", modalities=("image-generation",),
                 requires=(TrainingSplit,),
                 summary="student learns two teacher DDIM steps in one, in rounds halving the steps (32 -> 4)")
class ProgressiveDistillation(Method):
    Config = ProgressiveConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        from diffusers import DDIMScheduler

        from baselines.decoding._samplers import check_diffusion_subject, with_scheduler
        from bench import cache
        from tasks.base import Subject

        cfg = self.config
        check_diffusion_subject(subject, "progressive")
        data = require(task, TrainingSplit, "progressive trains on the task's training images").training_split()
        key = student_key(subject, task, cfg, ctx)
        path = cache.method_dir("progressive", task) / f"student-{key}.safetensors"
        def build() -> tuple[dict, dict]:
            student, rounds = distill(subject, data.x.to(ctx.device), data.y.to(ctx.device), cfg, ctx.seed,
                                      ctx.budget.smoke, ctx.progress)
            return student.state_dict(), {"rounds": rounds}

        # the rounds' costs and proxies are one cache entry with the weights, so a cached student reports what it
        # cost, and a damaged half rebuilds both
        state, meta, _, _ = cache.cached_bundle(path, build)
        rounds = meta["rounds"]
        student = copy.deepcopy(subject.model)
        student.load_state_dict(state)
        student = student.to(next(subject.model.parameters()).dtype).eval()
        applied = with_scheduler(Subject(student, subject.kind, subject.extra), DDIMScheduler, cfg.target_steps,
                                 "progressive", eta=0.0)
        steps = sum(int(r["steps"]) for r in rounds)
        seconds = sum(float(r["seconds"]) for r in rounds)
        applied.cost = Cost(seconds, steps, steps * cfg.batch_size,
                            f"{len(rounds)} rounds of progressive distillation "
                            f"({' -> '.join(str(r['teacher_steps']) for r in rounds)} -> {cfg.target_steps} DDIM "
                            f"steps), each {rounds[0]['steps']} Adam steps with two teacher evaluations per example")
        naive = with_scheduler(subject, DDIMScheduler, cfg.target_steps, "ddim", eta=0.0).subject
        ev = task.evaluate(naive, ctx)
        applied.controls = [ControlResult(
            "teacher_ddim_same_steps", f"the reference sampled by the same DDIM in {cfg.target_steps} steps, "
            f"undistilled", ev.value, ev.per_example, 0.0)]
        sampler_stats = applied.stats

        def stats() -> dict[str, float]:
            out = dict(sampler_stats())
            for i, r in enumerate(rounds, start=1):
                for name in ("teacher_steps", "student_steps", "steps", "seconds", "loss_first", "loss_last",
                             "mse_student", "mse_naive"):
                    out[f"round{i}_{name}"] = float(r[name])
            return out

        applied.stats = stats
        return applied
