"""`snapfusion`: a slim, step-distilled denoiser (Li et al. 2023, "SnapFusion: Text-to-Image Diffusion Model on
Mobile Devices within Two Seconds", arXiv:2306.00980; NeurIPS 2023), in three stages on the task's reference.

1. Robust training (the paper's section 3.2). The reference is fine-tuned with a stochastic forward: at each step
   every candidate block is skipped with probability p (the paper replaces a cross-attention or ResNet block by
   the identity), so that the network learns to work with any subset of its blocks and the evaluation that
   follows measures each block on a network that has learnt to do without it. The loss is the task's DDPM
   objective plus output distillation from the (full, frozen) reference:

       L_robust = || eps - eps_S(z_t, t, y) ||^2 + lambda_out || eps_T(z_t, t, y) - eps_S(z_t, t, y) ||^2

   with S the skipped set drawn afresh per step (`_snapfusion.robust_train`).
2. Architecture evolution (section 3.3, Algorithm 1's removal actions). For each candidate block b the quality
   cost dQ(b) and the latency saving dL(b) are measured, and blocks are removed greedily by the lowest value
   score dQ / dL until the latency target is met (`_snapfusion.evolve`):
   - dQ(R, b): the mean squared difference (pixels in [-1, 1]) of the network's samples with R + {b} removed to
     the reference's samples, minus the same with R removed; samples of `calibration_size` fixed noises (the
     task's `CalibrationSampling`, apart from the evaluation's and the workload's noise), both sampled by DDIM in
     `teacher_steps` steps, the sampler stage 3 distils from. Measured again after every removal (the paper
     re-evaluates its actions after each change). The paper scores dCLIP on 2k COCO prompts; digits-gen has no
     text, and the distance to the reference's own samples is what the student is then trained to close.
   - dL(b): 1 - t_without_b / t_full, the per-call time of the full network and of the network without b alone,
     measured in this process on this machine as interleaved pairs (the harness's `paired_timing`) at the
     profile's timing batch, median of `latency_repeats` pair ratios: the paper's latency lookup table, made
     on the target hardware. The savings are taken as additive (the predicted ratio after removing R is
     1 - sum dL), as the paper's lookup table takes them. On a loaded machine a block's measurement can be
     noise: when its 95% interval reaches 0, the evolution uses the block's MAC saving instead
     (1 - MACs_without_b / MACs_full); `latency="macs"` uses MACs for every block (deterministic). Ties in
     dQ / dL go to the block with the larger MAC saving. Every measurement, and which one was used, is in
     `method_stats` (`block_<name>_*`), beside the final slim network's paired latency ratio to the reference.
   The candidates and the removal are `baselines.pruning.block_drop`'s (`removable`, `resolve`, `drop_blocks`):
   on the digits UNet the mid-block, the width-keeping down pair down0.0 and each up stage's extra pair; on the
   DiT, its transformer blocks (at least one stays). The paper also has "add" actions that restore a block when
   quality falls too far; starting from the full reference and stopping at the target, nothing here is added back.
3. Step distillation (section 4) of the slim network to `target_steps` DDIM steps (8, the paper's), with the
   full reference as the teacher (the paper, too, distils its efficient UNet from the original SD-v1.5 rather
   than from the efficient UNet itself). Each round is progressive distillation's (Salimans & Ho 2022, Algorithm 2):
   the student's one DDIM step from z_t must land where two teacher DDIM steps land,

       L = || DDIM_student(z_t; t -> t'') - DDIM_teacher(DDIM_teacher(z_t; t -> t'); t' -> t'') ||^2

   computed by `baselines.distillation._progressive` (its per-example DDIM step, equal to diffusers', and its
   loss `weighting`, "sampler" by default: see `progressive`'s docstring for why an epsilon-predicting student
   is trained in z-space). The default is one round, 16 -> 8 steps, from the reference (the paper's student
   takes 8 steps); `teacher_steps` = 32 or 64 adds rounds, each later round's teacher
   the previous round's student, as progressive distillation does.

   The paper's CFG-aware loss (applying classifier-free guidance to teacher and student before the loss, with a
   random guidance scale, mixed with the plain loss with probability p) is out of scope here: the digits-gen
   references are purely conditional (no unconditional branch, `guidance_scale` None), and the guided tasks
   (coco, imagenet-fid) offer no training split, which stages 1 and 3 train on. `cfg_probability` > 0 is
   refused with that reason. The paper's efficient image decoder has no counterpart (digits-gen samples pixels).

Record: the student sampled by DDIM in `target_steps` steps. Controls, both at the same steps: the slim network
after stages 1-2 without step distillation (`slim_ddim_same_steps`: what step distillation bought), and the
reference itself undistilled (`teacher_ddim_same_steps`, progressive's control: what the slim, distilled network
gives against the full one sampled alike). `block-drop` (removal + BK-SDM's recovery, no step reduction) and
`progressive` (step distillation of the full network) each do one half alone. The student, the slim network
before stage 3 and what every stage measured and cost are one cache entry (`bench.cache.cached_bundle`), keyed by
the reference, its scheduler, the data, the config, the seed, the budget and the device: a cached student keeps
the evolution its first run measured (latency is measured on the machine that built it). The cost covers all
three stages (the evolution's sampling and timing included); the samples seen are real training images.
With no block removed and no training steps, the student is the reference, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, ControlResult, Cost, Method
from bench.api import CalibrationSampling, TrainingSplit, require
from bench.config import ConfigError, check_range
from bench.registry import register_method

ALGORITHM_VERSION = "1"  # part of the cache key: bump when the training or the evolution changes
WEIGHTINGS = ("sampler", "truncated-snr", "snr")
LATENCY_SOURCES = ("measured", "macs")


@dataclass(frozen=True)
class SnapFusionConfig:
    # the evolution removes blocks until the slim network's predicted per-call time is at most this fraction of
    # the reference's; 1 removes nothing. 0.7 on the digits UNet needs ~3 of its 5 removable blocks (their MAC
    # savings: mid 5%, down0.0 9%, up0.1 3.5%, up1.1 9%, up2.1 15%); block-drop's bk-sdm preset measured 0.68
    latency_target: float = 0.7
    # the blocks robust training skips and the evolution may remove: "all" (block_drop.removable), "none", or
    # comma-separated names (UNet: mid, down0.0, up0.1, up1.1, up2.1; DiT: block0 .. block3)
    candidates: str = "all"
    # robust training: each candidate skipped with this probability per step (0.25: with 5 candidates a step
    # skips 1.25 blocks on average and trains the full network in a quarter of the steps)
    skip_probability: float = 0.25
    # robust-training Adam steps (0: the evolution measures the reference itself). 300 took 205 s on 2 cores
    # shared with other jobs (load ~6); the step rates of block-drop's and progressive's records put it near 45 s
    # quiet, inside the method's ~5-minute budget with the evolution, 400 distillation steps and the evaluations
    robust_steps: int = 300
    robust_lr: float = 1e-4  # Adam, linearly annealed to 0 (a fine-tuning rate; the reference trained at 1e-3)
    lambda_out: float = 1.0  # weight of robust training's output distillation from the reference (BK-SDM's 1)
    # the latency the evolution divides by: "measured" (this machine, per block; MACs where the measurement's
    # interval reaches 0) or "macs" (deterministic)
    latency: Literal["measured", "macs"] = "measured"
    latency_repeats: int = 9  # interleaved timing pairs per block (median of their ratios)
    calibration_size: int = 50  # fixed noises whose samples give each block's quality cost
    target_steps: int = 8  # the student's DDIM steps (the paper's 8)
    teacher_steps: int = 16  # the first round's teacher steps: target_steps times a power of two (16: one round)
    # step-distillation Adam steps per round. 400 on digits-gen (UNet, 4 blocks removed): FID 15.9 at 8 steps
    # against 352.9 for the same slim network undistilled and 13.9 for the reference at 8 steps; 291 s loaded
    distill_steps: int = 400
    batch_size: int = 32  # training images per step (both trainings)
    lr: float = 1e-4  # step distillation's Adam, linearly annealed to 0 per round (progressive's rate)
    weighting: Literal["sampler", "truncated-snr", "snr"] = "sampler"  # the round's loss (see progressive)
    # the paper's CFG-aware distillation: the probability of the guided loss. Refused (must stay 0): no task this
    # method runs on has classifier-free guidance (module docstring)
    cfg_probability: float = 0.0

    def validate(self) -> None:
        from baselines.distillation.progressive import ProgressiveConfig

        check_range("latency_target", self.latency_target, lo=0, hi=1, lo_open=True)
        if not self.candidates.strip():
            raise ConfigError("candidates is empty; give 'all', 'none' or comma-separated block names")
        check_range("skip_probability", self.skip_probability, lo=0, hi=1, hi_open=True)
        check_range("robust_steps", self.robust_steps, lo=0)
        check_range("robust_lr", self.robust_lr, lo=0, lo_open=True)
        check_range("lambda_out", self.lambda_out, lo=0)
        if self.latency not in LATENCY_SOURCES:
            raise ConfigError(f"latency={self.latency!r} is not one of {', '.join(LATENCY_SOURCES)}")
        check_range("latency_repeats", self.latency_repeats, lo=3)
        check_range("calibration_size", self.calibration_size, lo=1)
        check_range("distill_steps", self.distill_steps, lo=0)
        ProgressiveConfig(teacher_steps=self.teacher_steps, target_steps=self.target_steps, batch_size=self.batch_size,
                          lr=self.lr).validate()  # target_steps >= 1, teacher_steps = target x 2^k, batch, lr
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting={self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        check_range("cfg_probability", self.cfg_probability, lo=0, hi=1)

    def rounds(self) -> list[tuple[int, int]]:
        from baselines.distillation.progressive import ProgressiveConfig

        return ProgressiveConfig(teacher_steps=self.teacher_steps, target_steps=self.target_steps).rounds()


def candidates_of(model, spec: str) -> list[str]:
    """The candidate blocks a `candidates` setting names for `model`, checked by `block_drop.resolve` (whose error
    lists the valid names)."""
    from baselines.pruning import block_drop as bd

    spec = spec.strip()
    if spec == "all":
        return bd.removable(model)
    if spec == "bk-sdm":
        raise ConfigError("candidates='bk-sdm' is block-drop's preset, not a candidate set; give 'all', 'none' or "
                          f"names from: {', '.join(bd.removable(model))}")
    if bd._is_dit(model) and spec != "none" and {n.strip() for n in spec.split(",")} >= set(bd.removable(model)):
        return bd.removable(model)  # every DiT block may be a candidate: the evolution keeps one
    return bd.resolve(model, spec)


@register_method("snapfusion", family="distillation",
                 paper="Li et al., SnapFusion: Text-to-Image Diffusion Model on Mobile Devices within Two Seconds",
                 year=2023, url="https://arxiv.org/abs/2306.00980", modalities=("image-generation",),
                 requires=(TrainingSplit, CalibrationSampling),
                 summary="robust training with stochastic block skipping, blocks removed by measured quality per "
                         "latency on this machine, then step distillation of the slim network to 8 DDIM steps")
class SnapFusion(Method):
    Config = SnapFusionConfig

    def apply(self, subject, task, ctx) -> Applied:
        from diffusers import DDIMScheduler

        from baselines.decoding._samplers import check_diffusion_subject, with_scheduler
        from baselines.distillation.progressive import student_key
        from baselines.pruning import block_drop as bd
        from bench import cache

        cfg = self.config
        check_diffusion_subject(subject, "snapfusion")
        if cfg.cfg_probability > 0:
            guided = subject.extra.get("guidance_scale") is not None
            raise ConfigError(f"cfg_probability={cfg.cfg_probability}: SnapFusion's CFG-aware distillation is not "
                              f"implemented; task {task.spec.name!r}'s reference is "
                              + ("guided but offers no training split" if guided else
                                 "purely conditional (no unconditional branch to guide with)")
                              + "; valid: cfg_probability=0")
        reference = subject.model
        if not (bd._is_dit(reference) or hasattr(reference, "up_blocks")):
            raise ValueError(f"snapfusion removes blocks of a diffusers UNet or DiT; got {type(reference).__name__}")
        candidates = candidates_of(reference, cfg.candidates)
        data = require(task, TrainingSplit, "snapfusion trains on the task's training images").training_split()
        require(task, CalibrationSampling, "snapfusion's evolution samples the task's calibration noise")
        key = cache.key("snapfusion", ALGORITHM_VERSION, student_key(subject, task, cfg, ctx))
        path = cache.method_dir("snapfusion", task) / f"student-{key}.safetensors"

        def build() -> tuple[dict, dict]:
            from baselines.distillation import _snapfusion

            return _snapfusion.build(subject, task, ctx, cfg, candidates, data)

        state, meta, _, built = cache.cached_bundle(path, build)
        names = meta["removed"]
        dtype = next(reference.parameters()).dtype

        def load(prefix: str):
            model = bd.build_student(reference, names)
            model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            return model.to(dtype).eval()

        student, slim = load("student."), load("slim.")
        measured = meta["measured_ratio"]
        ctx.progress.log(f"snapfusion: removed {', '.join(names) or 'nothing'} (predicted latency ratio "
                         f"{meta['predicted_ratio']:.3f}" + (f", measured {measured:.3f}" if measured else "")
                         + f"); {meta['seconds']:.0f} s in all" + ("" if built else " (cached)"))
        applied = with_scheduler(task.prepare(student, ctx), DDIMScheduler, cfg.target_steps, "snapfusion", eta=0.0)
        rounds, robust = meta["rounds"], meta["robust"]
        steps = int(robust["steps"]) + sum(int(r["steps"]) for r in rounds)
        applied.cost = Cost(meta["seconds"], steps, steps * cfg.batch_size,
                            f"robust training: {robust['steps']} Adam steps of batch {cfg.batch_size} (each "
                            f"candidate block skipped with p={cfg.skip_probability}; task loss + {cfg.lambda_out} "
                            f"output KD); evolution: removed {', '.join(names) or 'nothing'} of "
                            f"{', '.join(candidates) or 'no candidates'} by sample MSE per {cfg.latency} latency "
                            f"({meta['evolution_seconds']:.0f} s); step distillation: "
                            + ("; ".join(f"{r['teacher_steps']} -> {r['student_steps']} DDIM steps, {r['steps']} "
                                         f"Adam steps" for r in rounds) or "none")
                            + " from the reference (two teacher evaluations per example)")
        controls = []
        for name, model, what in (("slim_ddim_same_steps", slim, "the slim network after robust training and the "
                                   "evolution, without step distillation"),
                                  ("teacher_ddim_same_steps", reference, "the reference, undistilled")):
            arm = with_scheduler(task.prepare(model, ctx) if model is slim else subject, DDIMScheduler,
                                 cfg.target_steps, "ddim", eta=0.0).subject
            ev = task.evaluate(arm, ctx)
            controls.append(ControlResult(name, f"{what}, sampled by the same DDIM in {cfg.target_steps} steps",
                                          ev.value, ev.per_example, 0.0))
        applied.controls = controls
        sampler_stats = applied.stats

        def stats() -> dict[str, float]:
            out = dict(sampler_stats())
            out.update({k: float(v) for k, v in meta["stats"].items()})
            return out

        applied.stats = stats
        return applied
