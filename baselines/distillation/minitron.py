"""`minitron`: prune the reference to the student's size by activation importance, then distil it on the
reference's logits (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
arXiv:2407.14679; Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice: The Minitron Approach",
arXiv:2408.11796).

Importance (`_minitron.width_importance`, forward passes only, on `calibration_samples` training rows through
`baselines.pruning._calib.calibration_batches`). For every unit the paper takes an activation and reduces it
over the batch B and the sequence S (its section 2.2):

    heads     F_head(l, i)   = agg_{B,S} || Attn_i(X W_Q,i, X W_K,i, X W_V,i) ||_2      (the head's output,
                                                                                          o_proj's input)
    neurons   F_neuron(l, i) = agg_{B,S} | act(X W_gate,i^T) * (X W_up,i^T) |           (down_proj's input)
    channels  F_emb(i)       = sum_{norms} agg_{B,S} | RMSNorm(X)_i |                    (every norm of width h)
    layers    F_layer(l)     = L(model without block l) - L(model)       ("loss": the LM loss / perplexity rise
                               on the calibration rows), or 1 - E cos(x_l, x_l+1) ("bi", ShortGPT's block
                               influence, `layer_drop.block_influence`)

agg is `aggregation` = "<batch>-<sequence>": over the real tokens of one row, "l2" is sqrt(sum_t a_t^2) and
"mean" is sum_t |a_t| / T; over the rows, "mean" or "l2". The default, "mean-l2" (mean over the batch, L2
over the sequence), is our reading of the paper's best width aggregation; the others are settings.

The target size (`_minitron.fit_shape`). The task's `Student` (the draft's architecture) is the natural
target: `target_params` = 0 takes the untrained student's parameter count. Width first, as the paper finds
better: all blocks stay, and hidden size, heads and MLP width shrink by one common factor s, the largest whose
parameter count (formula in `_minitron.param_count`) is at most the target. Depth is a setting: `layers` = k
keeps the k most important blocks (then the width fills the rest of the budget, computed again on the
shortened model); explicit `hidden` / `heads` / `intermediate` fix an axis. Heads are whole: a block keeps its
top heads (with grouped key/value heads, every group keeps its top query heads). Every block keeps the same
counts, channels are ranked once for the whole model.

Slicing (`_minitron.slice_model`). The kept rows and columns of every matrix (embedding and LM-head columns,
norm weights, q/k/v rows and input columns, o_proj input columns and output rows, gate/up rows, down_proj
columns) go into a fresh model of the same class whose config has the smaller sizes (head_dim stays): a real
smaller Llama, with its parameters, MACs and time. With nothing removed it is the reference bit for bit.

Distillation. The pruned network is the student, trained by the LM kit's loop (`tasks._kit.lm.fit_lm`, AdamW,
warm-up then cosine) on the ground-truth rows with the paper's logit-only loss, the forward KL on the
teacher's next-token distributions (`kd_lm.kd_lm_loss`, T = 1):

    L = alpha * T^2 * mean_j KL(p_teacher(. | y_<j, x) || p_student(. | y_<j, x)) + (1 - alpha) * CE

alpha = 1 is the paper's choice (no label loss). `val_rows` training rows are held out of every training here,
for the validation loss at `checkpoints` points of each run (quality against tokens seen).

Controls. (1) `pruned_without_teacher`: the same pruned network, steps, batch, rate and seed on the labels
alone: what the teacher's logits add. (2) `student_same_tokens`: the task's draft (`init` = "draft"; a fresh
student with "scratch") fine-tuned on the labels for the same steps, i.e. the same tokens: what starting
from the pruned reference gives over the student the task already has.

Tokens against training from scratch. No task capability states what training the draft cost, so the run
measures it: a fresh student (`Student.build_student`) trained on the labels for `scratch_multiple` times the
method's steps at the draft's rate (`scratch_lr`), checkpointed at the method's spacing; the record gives the
tokens it needed to reach the method's final validation loss and our ratio (method tokens / those), or, when it
never does, the bound (method tokens / all its tokens, `scratch_matched` = 0).

Left out: the paper's iterative prune-distill rounds (one shot here, which it finds as good for width), its
architecture search over many candidates with a short distillation each (one candidate, the uniform shrink),
its intermediate-state losses (the paper prefers logit-only when the depth is kept), the teacher correction of
Sreenivas et al. (fine-tuning the teacher on the distillation data first: our reference is trained on it), and
merging pruned heads' residual into kept ones. The calibration set is 128 training rows (the paper: 1,024
samples of its pretraining data).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, ControlResult, Cost, Method
from baselines.distillation._lm import LMDistillConfig
from baselines.distillation._minitron import AGGREGATIONS, LAYER_METRICS
from bench.api import Draft, Student, Tokenizer, TrainingRows, pick, require
from bench.config import ConfigError, check_range
from bench.registry import register_method


@dataclass(frozen=True)
class MinitronConfig(LMDistillConfig):
    # the inherited recipe (steps, batch_size, lr, warmup_steps) trains the pruned student and both controls;
    # `init` is the start of the second control: the task's draft, or a fresh student
    # distillation steps (a teacher forward each): 59 s for arith's pruned 4-block student on 2 busy cores, where
    # it reached a validation loss of 0.53 (the draft starts at 0.07); the run's evaluations take longer while the
    # networks are poor (they answer up to the token limit)
    steps: int = 300
    lr: float = 2e-3  # the pruned network lost most of its function: a rate nearer the draft's own (3e-3)
    warmup_steps: int = 30  # a tenth of the steps
    target_params: int = 0  # parameters of the pruned network; 0: the task's Student (the draft's architecture)
    layers: int = 0  # blocks kept: 0 keeps them all (width pruning, the paper's preference); k drops the rest
    hidden: int = 0  # 0: auto (the common width factor); else the hidden size kept
    heads: int = 0  # 0: auto; else attention heads kept per block
    intermediate: int = 0  # 0: auto; else MLP neurons kept per block
    layer_metric: Literal["loss", "bi"] = "loss"  # block importance: LM-loss rise without it, or 1 - cos
    aggregation: Literal["mean-l2", "l2-mean", "mean-mean", "l2-l2"] = "mean-l2"  # (batch)-(sequence) reduction
    calibration_samples: int = 128  # training rows the importance is computed on (_calib's default)
    alpha: float = 1.0  # weight of the logit KL; 1 - alpha weights the label cross-entropy (paper: logits only)
    temperature: float = 1.0  # T of the KL (the paper's plain distributions)
    checkpoints: int = 5  # validation-loss checkpoints per training (plus the start)
    val_rows: int = 100  # training rows held out of every training here, for the validation loss
    scratch_multiple: int = 4  # a fresh student trains this many times the steps (0: skip the measurement)
    scratch_lr: float = 3e-3  # its rate: the draft's own

    def validate(self) -> None:
        super().validate()
        for name in ("target_params", "layers", "hidden", "heads", "intermediate", "scratch_multiple"):
            check_range(name, getattr(self, name), lo=0)
        if self.layer_metric not in LAYER_METRICS:
            raise ConfigError(f"layer_metric={self.layer_metric!r} is not one of {', '.join(LAYER_METRICS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
        check_range("calibration_samples", self.calibration_samples, lo=1)
        check_range("alpha", self.alpha, lo=0, hi=1)
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("checkpoints", self.checkpoints, lo=1)
        check_range("val_rows", self.val_rows, lo=1)
        check_range("scratch_lr", self.scratch_lr, lo=0, lo_open=True)


def student_params(task) -> int:
    """The parameter count of the task's student architecture (built on the meta device: no weights made)."""
    import torch

    with torch.device("meta"):
        model = require(task, Student, "minitron's default target size").build_student()
    return sum(p.numel() for p in model.parameters())


def prune(teacher, batches, cfg: MinitronConfig, target: int, log=lambda s: None):
    """(pruned model, its shape, stats): depth first when `cfg.layers` asks for it, then width, by importance."""
    from baselines.distillation import _minitron as M

    ref = M.shape_of(teacher)
    stats: dict[str, float] = {}
    model = teacher
    if cfg.layers and cfg.layers < ref.layers:
        scores = M.layer_importance(teacher, batches, cfg.layer_metric)
        kept = M.top(scores, cfg.layers)
        stats.update({f"layer_importance_{i}": float(v) for i, v in enumerate(scores)})
        log(f"minitron: block importance ({cfg.layer_metric}) " + ", ".join(f"{v:.4f}" for v in scores)
            + f"; keeping {kept}")
        full = M.Keep(kept, list(range(ref.hidden)), [list(range(ref.heads))] * len(kept),
                      [list(range(ref.kv_heads))] * len(kept), [list(range(ref.intermediate))] * len(kept))
        model = M.slice_model(teacher, full)
    elif cfg.layers > ref.layers:
        raise ConfigError(f"minitron: layers={cfg.layers} exceeds the reference's {ref.layers} blocks; valid: 0 "
                          f"(all) to {ref.layers}")
    now = M.shape_of(model)
    shape = M.fit_shape(now, target, 0, cfg.hidden, cfg.heads, cfg.intermediate)
    M.check_shape(ref, shape)
    imp = M.width_importance(model, batches, cfg.aggregation)
    pruned = M.slice_model(model, M.choose(now, shape, imp, list(range(now.layers))))
    got = sum(p.numel() for p in pruned.parameters())
    assert got == M.param_count(shape), (got, M.param_count(shape))
    stats.update(pruned_hidden=float(shape.hidden), pruned_heads=float(shape.heads),
                 pruned_kv_heads=float(shape.kv_heads), pruned_intermediate=float(shape.intermediate),
                 pruned_layers=float(shape.layers), pruned_parameters=float(got), target_parameters=float(target),
                 reference_parameters=float(M.param_count(ref)))
    return pruned, shape, stats


def fit_tracked(model, train, val, recipe_cfg: LMDistillConfig, ctx, task, description: str, every: int,
                loss=None):
    """Train `model` in place with the kit's loop; returns (TrainStats, curve): (steps, tokens, validation loss)
    at the start, every `every` steps and at the end."""
    from baselines.distillation.distillm import validation_loss
    from tasks._kit import lm

    pad = task.tokenizer.pad_token_id
    vl = lambda: validation_loss(model, val, pad, ctx.device, recipe_cfg.batch_size)  # noqa: E731
    curve = [(0, 0, vl())]
    seen = {"calls": 0, "tokens": 0}

    def loss_fn(logits, ids, mask, labels):
        n = seen["calls"]
        if n and n % every == 0:
            curve.append((n, seen["tokens"], vl()))
        seen["calls"] += 1
        seen["tokens"] += int(mask.sum())
        return lm.completion_loss(logits, labels) if loss is None else loss(logits, ids, mask, labels)

    stats = lm.fit_lm(model, train, recipe_cfg.recipe(len(train)), ctx, seed=ctx.seed, description=description,
                      pad_id=pad, loss_fn=loss_fn)
    curve.append((stats.steps, stats.tokens_seen, vl()))
    return stats, curve


def curve_stats(prefix: str, curve) -> dict[str, float]:
    out = {}
    for k, (step, tokens, v) in enumerate(curve):
        out[f"{prefix}_step_{k}"] = float(step)
        out[f"{prefix}_tokens_{k}"] = float(tokens)
        out[f"{prefix}_val_loss_{k}"] = float(v)
    return out


@register_method("minitron", family="distillation", year=2024, url="https://arxiv.org/abs/2407.14679",
                 paper="Muralidharan et al., Compact Language Models via Pruning and Knowledge Distillation",
                 modalities=("causal-lm",), requires=(TrainingRows, Draft, Student, Tokenizer),
                 summary="prune the reference's heads, MLP neurons, embedding channels (and blocks) by activation "
                         "importance to the student's size, then distil it on the reference's logits")
class Minitron(Method):
    Config = MinitronConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        from baselines.distillation import _lm
        from baselines.distillation.kd_lm import kd_lm_loss
        from baselines.pruning import _calib

        cfg = self.config
        log = ctx.progress.log
        t0 = time.perf_counter()
        teacher = _lm.frozen_teacher(subject, ctx)
        target = cfg.target_params or student_params(task)
        batches = _calib.calibration_batches(task, dataclasses.replace(subject, model=teacher), ctx,
                                             cfg.calibration_samples)
        pruned, shape, stats = prune(teacher, batches, cfg, target, log)
        prune_seconds = time.perf_counter() - t0
        log(f"minitron: pruned to hidden {shape.hidden}, {shape.heads} heads ({shape.kv_heads} key/value), "
            f"intermediate {shape.intermediate}, {shape.layers} blocks: {int(stats['pruned_parameters']):,} "
            f"parameters (target {target:,}, reference {int(stats['reference_parameters']):,})")

        examples = _lm.ground_truth_examples(task)
        held = set(pick(len(examples), max(1, min(cfg.val_rows, len(examples) // 4)), ctx.seed))
        val = [e for i, e in enumerate(examples) if i in held]
        train = [e for i, e in enumerate(examples) if i not in held]
        every = max(1, cfg.effective_steps(ctx) // cfg.checkpoints)
        start = copy.deepcopy(pruned)

        import torch

        def kd(logits, ids, mask, labels):
            with torch.no_grad():
                z_t = teacher(input_ids=ids, attention_mask=mask).logits
            return kd_lm_loss(logits, z_t, labels, cfg.temperature, cfg.alpha)

        run, curve = fit_tracked(pruned, train, val, cfg, ctx, task, every=every, loss=kd,
                                 description=f"Minitron: distilling the pruned reference (alpha={cfg.alpha})")

        def evaluated(model):
            return task.evaluate(task.prepare(model, ctx), ctx)

        c1, curve1 = fit_tracked(start, train, val, cfg, ctx, task, every=every,
                                 description="Training the same pruned network on the labels alone (control)")
        e1 = evaluated(start)
        student = _lm.initial_student(task, ctx, cfg.init)
        c2, curve2 = fit_tracked(student, train, val, cfg, ctx, task, every=every,
                                 description=f"Training the student ({cfg.init}) for the same tokens (control)")
        e2 = evaluated(student)
        controls = [
            ControlResult("pruned_without_teacher", "the same pruned network, steps, batch, learning rate and seed "
                          "trained on the ground-truth answers alone (no teacher logits)", e1.value, e1.per_example,
                          c1.seconds),
            ControlResult("student_same_tokens", f"the task's student ({_lm.cost_note(cfg.init)}) trained on the "
                          f"ground-truth answers for the same steps and batch (the same tokens)", e2.value,
                          e2.per_example, c2.seconds)]

        stats.update(curve_stats("minitron", curve), **curve_stats("pruned_labels", curve1),
                     **curve_stats("student", curve2), calibration_tokens=float(_calib.token_count(batches)),
                     prune_seconds=prune_seconds, tokens_seen=float(run.tokens_seen),
                     pruned_labels_tokens_seen=float(c1.tokens_seen), student_tokens_seen=float(c2.tokens_seen),
                     pruned_labels_exact_match=e1.value, student_exact_match=e2.value)
        if cfg.scratch_multiple:
            stats.update(self.scratch(task, ctx, cfg, train, val, every, curve[-1][2], run.tokens_seen))
        cost = Cost(prune_seconds + run.seconds, run.steps, run.samples_seen,
                    f"importance on {_calib.token_count(batches)} calibration tokens, slicing, then {run.steps} "
                    f"AdamW steps of logit distillation on the training rows less {len(val)} held out (a teacher "
                    f"forward pass each)", tokens_seen=run.tokens_seen)
        return Applied(task.prepare(pruned, ctx), cost, controls, stats=lambda: stats)

    @staticmethod
    def scratch(task, ctx, cfg: MinitronConfig, train, val, every: int, goal: float, tokens: int) -> dict:
        """A fresh student trained `scratch_multiple` times longer: the tokens it needs to reach `goal`."""
        model = require(task, Student).build_student().to(ctx.device).float()
        longer = dataclasses.replace(cfg, steps=cfg.steps * cfg.scratch_multiple, lr=cfg.scratch_lr,
                                     warmup_steps=cfg.warmup_steps * cfg.scratch_multiple)
        run, curve = fit_tracked(model, train, val, longer, ctx, task, every=every,
                                 description=f"Training a fresh student for {cfg.scratch_multiple}x the tokens "
                                             f"(the token-ratio measurement)")
        hit = next((t for _, t, v in curve if v <= goal), None)
        out = curve_stats("scratch", curve)
        out.update(scratch_tokens_seen=float(run.tokens_seen), scratch_matched=float(hit is not None),
                   scratch_seconds=run.seconds,
                   token_ratio_vs_scratch=tokens / hit if hit else tokens / max(1, run.tokens_seen))
        if hit is not None:  # method_stats are finite: unmatched, the key is absent and the ratio is a bound
            out["scratch_tokens_to_match"] = float(hit)
        return out
