"""`block-drop`: remove blocks of a diffusion denoiser, then recover by distillation from the reference (Kim et al.,
2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", arXiv:2305.15798).

Removal. BK-SDM takes residual+attention (R-A) pairs out of SD's UNet: one pair per down and up stage
(BK-SDM-Base) and the whole mid-block (BK-SDM-Small). The digits UNet (`tasks._kit.diffusion.UNET`) has
layers_per_block = 1, so a down stage has a single pair, which changes the channel count and cannot go (except
down0, 32 -> 32). What can go, by name:
- `mid`: the mid-block (resnet, attention, resnet); the deepest down feature goes straight to the up path.
- `up{j}.{i}`, i >= 1: up stage j's i-th R-A pair, the "extra layer" a diffusers up stage has over its down stage
  (layers_per_block + 1 pairs). Its input has the stage's own width, so the next pair (or the next stage) still
  fits; the skip feature it consumed is discarded (its concatenation is cut off again), so the other pairs keep
  their skips. This is BK-SDM's removed up pair, whose skip partner is what a removed down pair would free.
- `down{k}.{i}`: a down pair whose resnet keeps the width (in = out channels); it becomes the identity and its
  skip output is its input.
- `block{i}` (a DiT): transformer block i leaves the residual stream. DiT's final layer reads the class/time
  embedding of the first remaining block (diffusers takes transformer_blocks[0]'s), so removing block0 changes it.
The preset `bk-sdm` removes, on a UNet, the mid-block and every up stage's last extra pair (BK-SDM-Small mapped
onto this UNet); on a DiT, block 2 of 4 (not in the paper, which has no DiT: a quarter, as layer-drop removes).
Removed modules are really gone (the student has fewer parameters and MACs, which the record's size and compute
show), and with nothing removed the student is the reference, computed by the same forward.

Recovery (BK-SDM, eq. 3-5): the student starts from the reference's remaining weights and trains on

    L = L_task + lambda_out * L_outKD + lambda_feat * L_featKD
    L_task   = E || eps - eps_S(z_t, t, y) ||^2                      (the DDPM objective, as the reference's)
    L_outKD  = E || eps_T(z_t, t, y) - eps_S(z_t, t, y) ||^2         (output-level: the teacher's prediction)
    L_featKD = E sum_l || f_T^l(z_t, t, y) - f_S^l(z_t, t, y) ||^2   (feature-level: each stage's output)

with l over the stage outputs both networks have (each down and up stage, and the mid-block when kept; for a
DiT, every kept block's output against the same block of the teacher), each term a mean over elements (MSE), and
lambda_out = lambda_feat = 1 as in the paper. The trained student is cached (bench.cache), keyed by the reference
weights, the removal and the recipe, with its training seconds beside it. The record's control is the same
student before recovery (removed blocks, no training). diffusers has no block-removal or distillation utility
for UNets; this is written here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import TrainingSplit, require
from bench.registry import register_method

PRESETS = ("bk-sdm", "none")


@dataclass(frozen=True)
class BlockDropConfig:
    drop: str = "bk-sdm"  # comma-separated block names (mid, up{j}.{i}, down{k}.{i}, block{i}), or a preset:
    # bk-sdm (UNet: mid + every up stage's last extra pair; DiT: block2) or none
    steps: int = 1000  # recovery steps (Adam); 0 = the pruned model untrained. ~4.5 min on this CPU (at 400
    # steps and lr 2e-4 the UNet student reached FID 201 from the untrained 1,613: too little)
    batch_size: int = 64  # training images per step
    lr: float = 1e-3  # Adam peak, linear warm-up then cosine to zero (the reference's own rate: removing the
    # mid-block moves the student far from the reference, so a fine-tuning rate recovers too slowly)
    lambda_out: float = 1.0  # weight of the output-level KD term (BK-SDM: 1)
    lambda_feat: float = 1.0  # weight of the feature-level KD term (BK-SDM: 1)

    def validate(self) -> None:
        if not self.drop.strip():
            raise ConfigError(f"drop is empty; give block names or a preset ({', '.join(PRESETS)})")
        check_range("steps", self.steps, lo=0)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("lambda_out", self.lambda_out, lo=0)
        check_range("lambda_feat", self.lambda_feat, lo=0)


def _is_dit(model) -> bool:
    return hasattr(model, "transformer_blocks")


def removable(model) -> list[str]:
    """The names of the blocks of `model` that `drop_blocks` can remove."""
    if _is_dit(model):
        return [f"block{i}" for i in range(len(model.transformer_blocks))]
    names = ["mid"] if model.mid_block is not None else []
    for k, block in enumerate(model.down_blocks):
        names += [f"down{k}.{i}" for i, r in enumerate(block.resnets)
                  if getattr(r, "in_channels", None) == getattr(r, "out_channels", -1)]
    for j, block in enumerate(model.up_blocks):
        names += [f"up{j}.{i}" for i in range(1, len(block.resnets))]
    return names


def resolve(model, drop: str) -> list[str]:
    """The block names a `drop` setting means for `model`, checked."""
    spec = drop.strip()
    if spec == "none":
        return []
    if spec == "bk-sdm":
        if _is_dit(model):
            return ["block2"] if len(model.transformer_blocks) > 2 else []
        names = ["mid"] if model.mid_block is not None else []
        return names + [f"up{j}.{len(b.resnets) - 1}" for j, b in enumerate(model.up_blocks) if len(b.resnets) > 1]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    valid = removable(model)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(f"block-drop: unknown or unremovable block(s) {bad} for this "
                          f"{type(model).__name__}; valid: {', '.join(valid)} (or a preset: {', '.join(PRESETS)})")
    if _is_dit(model) and len(set(names)) == len(valid):
        raise ConfigError(f"block-drop: drop={drop!r} would remove all {len(valid)} DiT blocks; keep at least one")
    return sorted(set(names), key=valid.index)


def _modules():
    import torch.nn as nn

    class Identity(nn.Module):
        """A removed down resnet: hidden_states pass through (temb ignored)."""

        def forward(self, hidden_states, temb=None, *args, **kwargs):
            return hidden_states

    class CutSkip(nn.Module):
        """A removed up resnet: the block concatenated a skip feature onto the input; cut it off again."""

        def __init__(self, channels: int):
            super().__init__()
            self.channels = channels

        def forward(self, hidden_states, temb=None, *args, **kwargs):
            return hidden_states[:, :self.channels]

    class PassAttention(nn.Module):
        """A removed attention: returns its input, as a tensor or, when the caller asks for a tuple, in one."""

        def forward(self, hidden_states, *args, return_dict=True, **kwargs):
            return hidden_states if return_dict else (hidden_states,)

    return Identity, CutSkip, PassAttention


def drop_blocks(model, names: list[str]) -> None:
    """Remove the named blocks from `model` in place (see the module docstring for what each name means)."""
    import torch.nn as nn

    identity, cut_skip, pass_attention = _modules()
    if _is_dit(model):
        gone = {int(n[len("block"):]) for n in names}
        model.transformer_blocks = nn.ModuleList(b for i, b in enumerate(model.transformer_blocks) if i not in gone)
        return
    for name in names:
        if name == "mid":
            model.mid_block = None
            continue
        stage, i = name.split(".")
        i = int(i)
        block = model.down_blocks[int(stage[4:])] if stage.startswith("down") else model.up_blocks[int(stage[2:])]
        width = block.resnets[i].out_channels if stage.startswith("down") else block.resnets[i - 1].out_channels
        block.resnets[i] = identity() if stage.startswith("down") else cut_skip(width)
        if getattr(block, "attentions", None) is not None:
            block.attentions[i] = pass_attention()


def stage_modules(model) -> dict[str, object]:
    """The modules whose outputs L_featKD compares, by name (a DiT block keeps its original index)."""
    if _is_dit(model):
        return {getattr(b, "_bd_name", f"block{i}"): b for i, b in enumerate(model.transformer_blocks)}
    out = {f"down{k}": b for k, b in enumerate(model.down_blocks)}
    if model.mid_block is not None:
        out["mid"] = model.mid_block
    out.update({f"up{j}": b for j, b in enumerate(model.up_blocks)})
    return out


def build_student(reference, names: list[str]):
    import copy

    student = copy.deepcopy(reference).float()
    if _is_dit(student):
        for i, b in enumerate(student.transformer_blocks):
            b._bd_name = f"block{i}"
    drop_blocks(student, names)
    return student


def _record(modules: dict, store: dict):
    handles = []
    for name, m in modules.items():
        def hook(_m, _args, out, name=name):
            store[name] = out[0] if isinstance(out, tuple) else out
        handles.append(m.register_forward_hook(hook))
    return handles


def distill(student, teacher, data, cfg: BlockDropConfig, ctx, description: str) -> tuple[float, int, dict]:
    """Train `student` in place on L = L_task + lambda_out L_outKD + lambda_feat L_featKD; (seconds, steps, losses)."""
    import math

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from tasks._kit.classification import seed_everything
    from tasks._kit.diffusion import SCHEDULE, TRAIN_TIMESTEPS

    total = ctx.budget.steps(cfg.steps)
    if total == 0:
        return 0.0, 0, {}
    seed_everything(ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    ddpm = DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k != "timestep_spacing"})
    teacher.eval()  # the reference itself: only run under no_grad, never changed
    student.to(ctx.device).train().requires_grad_(True)
    s_feats, t_feats = {}, {}
    s_stage, t_stage = stage_modules(student), stage_modules(teacher)
    shared = [n for n in s_stage if n in t_stage]
    handles = _record({n: s_stage[n] for n in shared}, s_feats) + _record({n: t_stage[n] for n in shared}, t_feats)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    warmup = min(50, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    x_all, y_all = data.x.to(ctx.device), data.y.to(ctx.device)
    n, t0, ema = x_all.shape[0], time.perf_counter(), {}
    try:
        with ctx.progress.step(description, total=total) as advance:
            for _ in range(total):
                idx = torch.randint(0, n, (cfg.batch_size,), generator=gen).to(ctx.device)
                x0, y = x_all[idx], y_all[idx]
                eps = torch.randn(x0.shape, generator=gen).to(ctx.device)
                t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen).to(ctx.device)
                z = ddpm.add_noise(x0, eps, t)
                with torch.no_grad():
                    eps_t = _call(teacher, z, t, y)
                eps_s = _call(student, z, t, y)
                task = F.mse_loss(eps_s, eps)
                out_kd = F.mse_loss(eps_s, eps_t)
                feat_kd = sum((F.mse_loss(s_feats[k], t_feats[k]) for k in shared), torch.zeros((), device=z.device))
                loss = task + cfg.lambda_out * out_kd + cfg.lambda_feat * feat_kd
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for k, v in (("task", task), ("out_kd", out_kd), ("feat_kd", feat_kd)):
                    v = float(v.detach())
                    ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v
                advance(1)
    finally:
        for h in handles:
            h.remove()
    student.eval()
    return time.perf_counter() - t0, total, ema


def _call(model, z, t, y):
    if _is_dit(model):
        return model(z, timestep=t, class_labels=y).sample
    return model(z, t, class_labels=y).sample


def weights_digest(model) -> str:
    """The reference's identity: `bench.cache.weights_digest` (before 2026-12 a hash of its own format, so a
    student cached by an earlier version is recovered again, once, deterministically)."""
    from bench import cache

    return cache.weights_digest(model)


@register_method("block-drop", family="pruning", paper="Kim et al., BK-SDM: A Lightweight, Fast, and Cheap "
                 "Version of Stable Diffusion", year=2023, url="https://arxiv.org/abs/2305.15798",
                 modalities=("image-generation",),
                 summary="remove UNet blocks (mid-block, up stages' extra pairs) or DiT blocks, then recover with "
                         "output- and feature-level distillation from the reference plus the task loss")
class BlockDrop(Method):
    Config = BlockDropConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import require_diffusion_subject
        from bench import cache

        require_diffusion_subject(subject, "block-drop")
        cfg = self.config
        reference = subject.model
        if not (_is_dit(reference) or hasattr(reference, "up_blocks")):
            raise ValueError(f"block-drop needs a diffusers UNet or DiT; got {type(reference).__name__}")
        names = resolve(reference, cfg.drop)
        student = build_student(reference, names)
        untrained = None
        seconds, steps, losses, built = 0.0, 0, {}, True
        if names and cfg.steps > 0:
            require(task, TrainingSplit, "block-drop recovers by training on the task's training split")
            untrained = build_student(reference, names)
            k = cache.key(task.spec.name, task.spec.version, weights_digest(reference), names, cfg, ctx.seed,
                          ctx.budget, ctx.device)
            path = cache.method_dir("block-drop", task) / f"student-{k}.safetensors"
            def build() -> tuple[dict, dict]:
                seconds, steps, losses = distill(student, reference, task.training_split(), cfg, ctx,
                                                 f"Recovering the student ({', '.join(names)} removed)")
                return student.state_dict(), {"seconds": seconds, "steps": steps, "losses": losses}

            state, meta, _, built = cache.cached_bundle(path, build)  # weights and their cost: one entry
            student.load_state_dict(state)
            seconds, steps, losses = meta.get("seconds", 0.0), meta.get("steps", 0), meta.get("losses", {})
        student = student.to(device=ctx.device if ctx else "cpu").eval()
        ref_params = sum(p.numel() for p in reference.parameters())
        params = sum(p.numel() for p in student.parameters())
        stats = {"removed_blocks": float(len(names)), "parameters_removed": float(ref_params - params),
                 "parameter_fraction_removed": (ref_params - params) / ref_params}
        stats.update({f"final_loss_{k}": float(v) for k, v in losses.items()})
        if ctx is not None:
            ctx.progress.log(f"block-drop: removed {names or 'nothing'}; {ref_params - params} of {ref_params} "
                             f"parameters; {steps} recovery steps, {seconds:.0f} s" + ("" if built else " (cached)"))
        controls = []
        if untrained is not None:
            ev = task.evaluate(task.prepare(untrained, ctx), ctx)
            controls.append(ControlResult("removed_without_recovery", "the same blocks removed from the reference, "
                                          "no recovery training", ev.value, ev.per_example, 0.0))
        desc = (f"{steps} Adam steps of batch {cfg.batch_size} on L_task + {cfg.lambda_out} L_outKD + "
                f"{cfg.lambda_feat} L_featKD (teacher forward each step) after removing {', '.join(names)}"
                if steps else f"no training; removed {', '.join(names) or 'nothing'}")
        new = task.prepare(student, ctx) if ctx is not None else type(subject)(student, subject.kind, subject.extra)
        return Applied(new, Cost(seconds, steps, steps * cfg.batch_size, desc), controls, stats=lambda: stats)
