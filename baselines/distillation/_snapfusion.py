"""The machinery of `snapfusion` (Li et al. 2023, arXiv:2306.00980): blocks removed for one forward and put back
(the stochastic skipping of robust training and the evolution's trial removals), the robust-training loop, the
per-block latency table measured on this machine, and the greedy architecture evolution.

Not a method (the leading underscore keeps the registry's discovery out). Module scope is torch-free.

Block removal itself is `baselines.pruning.block_drop`'s (`removable`, `resolve`, `drop_blocks`, `build_student`):
a block skipped here for one step is exactly the block that the slim student later lacks, by the same code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from baselines.pruning import block_drop as bd

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def removed(model, names: list[str]) -> Iterator[None]:
    """`model` with the named blocks removed (`block_drop.drop_blocks`, in place) inside the block, and exactly as
    it was afterwards: the removed modules are put back, so their parameters (and an optimiser holding them)
    are untouched. `names` are removed from the full model at once (a DiT's `block{i}` are positions in it)."""
    if not names:
        yield
        return
    if bd._is_dit(model):
        saved = [("transformer_blocks", model.transformer_blocks)]
    else:
        saved = [("mid_block", model.mid_block)] if "mid" in names else []
        for name in names:
            if name == "mid":
                continue
            stage, i = name.split(".")
            block = model.down_blocks[int(stage[4:])] if stage.startswith("down") else model.up_blocks[int(stage[2:])]
            saved.append((block.resnets, int(i), block.resnets[int(i)]))
            if getattr(block, "attentions", None) is not None:
                saved.append((block.attentions, int(i), block.attentions[int(i)]))
    bd.drop_blocks(model, names)
    try:
        yield
    finally:
        for item in saved:
            if len(item) == 2:
                setattr(model, item[0], item[1])
            else:
                item[0][item[1]] = item[2]


def skip_set(candidates: list[str], p: float, gen, keep_one: bool) -> list[str]:
    """Each candidate independently with probability `p` (robust training's stochastic forward). With
    `keep_one` (a DiT, whose blocks may all be candidates) a draw that would remove every block is drawn again."""
    import torch

    while True:
        draw = torch.rand(len(candidates), generator=gen) < p
        names = [n for n, d in zip(candidates, draw.tolist()) if d]
        if not (keep_one and names and len(names) == len(candidates)):
            return names


def robust_train(student, teacher, denoise: Callable, data_x, data_y, alphas_cumprod, candidates: list[str],
                 keep_one: bool, *, p: float, steps: int, batch_size: int, lr: float, lambda_out: float, gen,
                 advance: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """Robust training (SnapFusion section 3.2): `steps` Adam steps of `student` (in place), each with a fresh
    set S of candidate blocks skipped (each with probability p), on

        L = || eps - eps_S(z_t, t, y) ||^2 + lambda_out || eps_T(z_t, t, y) - eps_S(z_t, t, y) ||^2

    with z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, x from the data, t uniform over the training timesteps, and
    eps_S the student with S removed; eps_T is the full reference (frozen). Learning rate linear to 0. Returns
    seconds, steps, the losses of the first and last tenth, and how many blocks a step skipped on average."""
    import time

    import torch
    import torch.nn.functional as F

    from baselines.distillation._lcm import expand

    teacher.eval()
    student.train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
    n, dev, T = data_x.shape[0], data_x.device, alphas_cumprod.shape[0]
    abar = alphas_cumprod.to(dev, data_x.dtype)
    losses, skipped, t0 = [], 0, time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(dev)
        x0, y = data_x[idx], data_y[idx]
        eps = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
        t = torch.randint(0, T, (batch_size,), generator=gen).to(dev)
        a = expand(abar[t], x0)
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        skip = skip_set(candidates, p, gen, keep_one)
        with torch.no_grad():
            eps_t = denoise(teacher, z, t, y, 0)
        with removed(student, skip):
            eps_s = denoise(student, z, t, y, 0)
        loss = F.mse_loss(eps_s, eps) + lambda_out * F.mse_loss(eps_s, eps_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        skipped += len(skip)
        advance(1)
    student.eval().requires_grad_(False)
    k = max(1, len(losses) // 10)
    return {"seconds": time.perf_counter() - t0, "steps": steps,
            "loss_first": sum(losses[:k]) / k if losses else 0.0, "loss_last": sum(losses[-k:]) / k if losses else 0.0,
            "mean_skipped": skipped / max(steps, 1)}


@dataclass(frozen=True)
class BlockLatency:
    """One row of the latency table: what removing the block alone from the full network saves, as a fraction of
    the full network's per-call time (measured here) and of its MACs (counted)."""

    measured: float  # 1 - t_without / t_full: median of paired ratios
    low: float  # its bootstrap 95% interval
    high: float
    macs: float  # 1 - MACs_without / MACs_full
    pairs: int

    @property
    def resolved(self) -> bool:
        """The measurement tells the saving apart from nothing: its interval lies above 0."""
        return self.low > 0

    @property
    def used(self) -> float:
        """The saving the evolution uses: the measured one when resolved, else the MAC fraction (deterministic,
        and what a compute-bound call approaches)."""
        return self.measured if self.resolved else self.macs


def latency_table(model, call: Callable[["torch.nn.Module"], object], candidates: list[str],
                  repeats: int) -> dict[str, BlockLatency]:
    """Each candidate's `BlockLatency`: the full `model` and the model without the block, called through `call`,
    timed as `repeats` interleaved pairs after one warm-up each (`bench.timing.paired_timing`, the harness's own
    ABBA pairing), in this process (`repeats` 0: not timed, pairs 0); MACs by `bench.measure.count_macs`."""
    import torch

    from bench.measure import count_macs
    from bench.timing import TimingRules, paired_timing

    rules = TimingRules(warmup=1, min_time_s=0.0, min_repeats=max(repeats, 1), max_repeats=max(repeats, 1),
                        precision=1.0)
    table = {}
    with torch.inference_mode():
        full_macs = count_macs(lambda: call(model))
        for name in candidates:
            slim = bd.build_student(model, [name]).eval()
            macs = 1 - count_macs(lambda: call(slim)) / full_macs
            if not repeats:
                table[name] = BlockLatency(0.0, 0.0, 0.0, macs, 0)
                continue
            t = paired_timing(lambda: call(model), lambda: call(slim), rules)
            table[name] = BlockLatency(1 - 1 / t.speedup, 1 - 1 / t.interval[0], 1 - 1 / t.interval[1], macs, t.n)
    return table


@dataclass(frozen=True)
class Removal:
    """One step of the evolution: the block removed, its quality cost at that point (on top of the blocks removed
    before it), the latency saving used, the score cost / saving that chose it, and the predicted latency ratio
    after it."""

    name: str
    quality_cost: float
    latency_saving: float
    score: float
    predicted_ratio: float


def evolve(candidates: list[str], latency: dict[str, float], macs: dict[str, float],
           quality_cost: Callable[[list[str], str], float], target: float,
           allowed: Callable[[list[str]], bool] = lambda names: True) -> list[Removal]:
    """The architecture evolution (SnapFusion Algorithm 1, its removal actions): while the predicted latency
    ratio 1 - sum of the removed blocks' savings is above `target`, evaluate every remaining candidate b by

        score(b) = quality_cost(removed, b) / latency[b]      (quality lost per unit of latency saved)

    and remove the lowest (ties: the larger MAC saving, then the candidates' order). `quality_cost(removed, b)`
    is measured again at every step, on the network with the earlier removals, as the paper re-evaluates its
    actions after each change; a negative cost (removing b helps) scores lowest. `latency[b]` must be > 0.
    `allowed(names)` may forbid a set (a DiT keeps a block). Stops when the target is met or nothing is left."""
    chosen: list[Removal] = []
    names: list[str] = []
    ratio = 1.0
    while ratio > target:
        options = [b for b in candidates if b not in names and allowed(names + [b])]
        if not options:
            break
        costs = {b: float(quality_cost(list(names), b)) for b in options}
        best = min(options, key=lambda b: (costs[b] / latency[b], -macs.get(b, 0.0), candidates.index(b)))
        names.append(best)
        ratio -= latency[best]
        chosen.append(Removal(best, costs[best], latency[best], costs[best] / latency[best], ratio))
    return chosen


def build(subject, task, ctx, cfg, candidates: list[str], data) -> tuple[dict, dict]:
    """The three stages from the subject's reference (see `snapfusion`'s docstring): (tensors, meta) for the
    cache, the tensors being the step-distilled student ("student.*") and the slim network before step
    distillation ("slim.*"), the meta the removed blocks, what every stage measured (`stats`, floats) and cost."""
    import copy
    import time

    import torch

    from baselines.distillation import _progressive as P
    from bench.measure import count_macs
    from tasks._kit.classification import seed_everything

    t_start = time.perf_counter()
    seed_everything(ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    reference, denoise, dev = subject.model, subject.extra["denoise"], ctx.device
    scheduler = subject.extra["scheduler"]
    x, y = data.x.to(dev), data.y.to(dev)
    teacher = copy.deepcopy(reference).float().eval().requires_grad_(False)
    robust = copy.deepcopy(reference).float()
    dit = bd._is_dit(reference)
    stats: dict[str, float] = {}

    # 1. robust training
    steps = ctx.budget.steps(cfg.robust_steps) if candidates else 0
    with ctx.progress.step(f"snapfusion robust training ({', '.join(candidates) or 'no'} candidate blocks, "
                           f"p={cfg.skip_probability})", total=steps) as advance:
        robust_rec = robust_train(robust, teacher, denoise, x, y, scheduler.alphas_cumprod, candidates,
                                  dit and len(candidates) == len(reference.transformer_blocks),
                                  p=cfg.skip_probability, steps=steps, batch_size=cfg.batch_size, lr=cfg.robust_lr,
                                  lambda_out=cfg.lambda_out, gen=gen, advance=advance)
    stats.update({f"robust_{k}": float(v) for k, v in robust_rec.items()})

    # 2. architecture evolution
    t_evo = time.perf_counter()
    n_cal = ctx.budget.pick(cfg.calibration_size, 4)
    xb = torch.randn(ctx.batch_size, *x.shape[1:], generator=torch.Generator().manual_seed(ctx.seed)).to(dev)
    yb = (torch.arange(ctx.batch_size) % (int(y.max()) + 1)).to(dev)
    tb = torch.tensor(int(scheduler.config.num_train_timesteps) // 2, device=dev)

    def call(model):
        return denoise(model, xb, tb, yb, 0)

    chosen, history, mse_of = [], {}, {}
    if candidates and cfg.latency_target < 1:
        repeats = ctx.budget.pick(cfg.latency_repeats, 3) if cfg.latency == "measured" else 0
        with ctx.progress.step(f"snapfusion latency table ({len(candidates)} blocks, {repeats} timed pairs each)"):
            table = latency_table(robust, call, candidates, repeats)
        latency = {b: (r.used if cfg.latency == "measured" else r.macs) for b, r in table.items()}
        ref_samples = task.sample_calibration(ddim(subject, teacher, cfg.teacher_steps), n_cal, ctx)
        robust_subject = ddim(subject, robust, cfg.teacher_steps)

        def mse(names: list[str]) -> float:
            k = tuple(sorted(names))
            if k not in mse_of:
                with removed(robust, list(names)):
                    out = task.sample_calibration(robust_subject, n_cal, ctx)
                mse_of[k] = float(((out.float() - ref_samples.float()) ** 2).mean())
            return mse_of[k]

        def quality_cost(names: list[str], b: str) -> float:
            cost = mse(names + [b]) - mse(names)
            history.setdefault(b, []).append(cost)
            return cost

        with ctx.progress.step(f"snapfusion evolution to latency ratio {cfg.latency_target}"):
            chosen = evolve(candidates, latency, {b: r.macs for b, r in table.items()}, quality_cost,
                            cfg.latency_target,
                            (lambda names: len(names) < len(robust.transformer_blocks)) if dit else (lambda n: True))
        stats["calibration_mse_full"] = mse([])
        order = {r.name: i for i, r in enumerate(chosen, start=1)}
        for b, r in table.items():
            stats[f"block_{b}_macs_saving"] = r.macs
            if r.pairs:
                stats.update({f"block_{b}_latency_measured": r.measured, f"block_{b}_latency_low": r.low,
                              f"block_{b}_latency_high": r.high, f"block_{b}_latency_used_macs": float(not r.resolved)})
            stats[f"block_{b}_latency_used"] = latency[b]
            stats[f"block_{b}_quality_cost_first"] = history[b][0]
            stats[f"block_{b}_removed_order"] = float(order.get(b, 0))
        for r in chosen:
            stats[f"block_{r.name}_quality_cost"] = r.quality_cost
    names = [r.name for r in chosen]
    slim = bd.build_student(robust, names).eval().requires_grad_(False)
    predicted = chosen[-1].predicted_ratio if chosen else 1.0
    measured = None
    if names:
        with torch.inference_mode():
            stats["mac_ratio"] = count_macs(lambda: call(slim)) / count_macs(lambda: call(teacher))
        if cfg.latency == "measured":
            from bench.timing import TimingRules, paired_timing

            repeats = ctx.budget.pick(cfg.latency_repeats, 3)
            with torch.inference_mode():
                t = paired_timing(lambda: call(teacher), lambda: call(slim),
                                  TimingRules(warmup=1, min_time_s=0.0, min_repeats=repeats, max_repeats=repeats,
                                              precision=1.0))
            measured = 1 / t.speedup
            stats["latency_ratio_measured"] = measured
    ref_params = sum(p.numel() for p in reference.parameters())
    stats.update(removed_blocks=float(len(names)), latency_ratio_predicted=predicted,
                 latency_target=cfg.latency_target, target_met=float(predicted <= cfg.latency_target),
                 parameter_fraction_removed=1 - sum(p.numel() for p in slim.parameters()) / ref_params,
                 evolution_seconds=time.perf_counter() - t_evo)

    # 3. step distillation from the reference
    clip = P.x0_clip(scheduler.config)
    steps = ctx.budget.steps(cfg.distill_steps)
    round_teacher, student, rounds = teacher, copy.deepcopy(slim).requires_grad_(True), []
    for k, (n_teacher, n_student) in enumerate(cfg.rounds(), start=1):
        before, rec = copy.deepcopy(student), {"seconds": 0.0, "steps": 0, "loss_first": 0.0, "loss_last": 0.0}
        if steps:
            tplan = P.ddim_plan(scheduler.config, n_teacher, str(dev))
            splan = P.ddim_plan(scheduler.config, n_student, str(dev))
            desc = f"snapfusion step distillation {k}: {n_teacher} -> {n_student} DDIM steps"
            with ctx.progress.step(desc, total=steps) as advance:
                rec = P.distill_round(round_teacher, student, denoise, x, y, tplan, splan, clip, steps, cfg.batch_size,
                                      cfg.lr, cfg.weighting, gen, advance)
        target = task.sample_calibration(ddim(subject, round_teacher, n_teacher), n_cal, ctx)
        for name, model in (("mse_student", student), ("mse_naive", before)):
            out = task.sample_calibration(ddim(subject, model.eval(), n_student), n_cal, ctx)
            rec[name] = float(((out.float() - target.float()) ** 2).mean())
        rec.update(teacher_steps=n_teacher, student_steps=n_student)
        stats.update({f"round{k}_{n}": float(v) for n, v in rec.items()})
        rounds.append(rec)
        round_teacher, student = student, copy.deepcopy(student)
    student = round_teacher  # the last round's student (at least one round: validated)
    tensors = {f"{prefix}.{n}": v.detach().cpu().contiguous()
               for prefix, model in (("student", student), ("slim", slim)) for n, v in model.state_dict().items()}
    meta = {"removed": names, "predicted_ratio": predicted, "measured_ratio": measured, "robust": robust_rec,
            "rounds": rounds, "evolution_seconds": stats["evolution_seconds"],
            "seconds": time.perf_counter() - t_start, "stats": stats}
    return tensors, meta


def ddim(subject, model, steps: int):
    """`subject`'s sampling with `model` as the denoiser and diffusers' DDIM (eta 0) in `steps` steps, from the
    subject's scheduler config (its schedule and x0 clip)."""
    from diffusers import DDIMScheduler

    from baselines.decoding._samplers import with_scheduler
    from tasks.base import Subject

    return with_scheduler(Subject(model, subject.kind, subject.extra), DDIMScheduler, steps, "snapfusion",
                          eta=0.0).subject
