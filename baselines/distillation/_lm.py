"""Shared machinery of the language-model distillation methods (`kd-lm`, `seqkd`, `minillm`, `gkd`).

The student. Every method trains the task's student architecture, the draft's (`arith`: Llama 0.47M; `gsm8k`:
Qwen2.5-0.5B-Instruct), from one of two starting points (`init`):
  - "draft" (default): the task's published draft, a student already trained on the task's data. MiniLLM
    (Gu et al. 2024, Algorithm 1) and GKD (Agarwal et al. 2024, section 4) both start from a student fine-tuned
    on the data, and reasoning models are distilled into pretrained students the same way; it also lets a
    few-minute CPU budget measure something (a fresh 0.47M Llama needs ~3,000 steps to reach arith's 44%).
    The draft's own training is not counted in the method's cost (its description says so).
  - "scratch": a fresh, seeded init of the same architecture (the task's `Student.build_student()`).

The data. The task's training split as (prompt, ground-truth answer) pairs in the tasks' format
(`Question: ...\\nAnswer:` + " " + answer + EOS, loss on the answer): `arith`'s generated problems (its drill
lines have no prompts, so they are left out), lm-eval's own train split of `gsm8k`.

The control. The same student, from the same start, trained by the same loop (`tasks._kit.lm.fit_lm`: AdamW,
warm-up then cosine, clipping) for the same steps, batch, learning rate and seed on the ground-truth answers
alone: plain fine-tuning, which `kd-lm` at alpha = 0 reproduces bit for bit. It is cached (weights, its
training seconds, its evaluation) per task, data, start, recipe, seed and device, so the four methods share it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from baselines.base import ControlResult
from bench.api import Budget, Draft, Student, TrainingRows, require
from bench.config import check_range

if TYPE_CHECKING:
    import torch

    from tasks._kit import lm
    from tasks.base import RunContext, Subject, Task

INITS = ("draft", "scratch")
GEN_BATCH = 64  # prompts per batched generation of the teacher (seqkd)


@dataclass(frozen=True)
class LMDistillConfig:
    """The training recipe every LM distillation method shares (and its control with it)."""

    init: Literal["draft", "scratch"] = "draft"  # the student's start: the published draft, or a fresh init
    # optimiser steps: on arith, 8 s (kd-lm) to 65 s (minillm, which decodes with both models at every step) of
    # the 2 CPU cores for the 0.47M student (the committed results); a quick fine-tune from the draft, where no
    # method yet separates from its control: pass more (--set steps=1000) for a longer budget
    steps: int = 150
    batch_size: int = 8  # sequences per step
    lr: float = 5e-4  # AdamW peak rate, warm-up then cosine to zero (the draft was trained at 3e-3; use that
    # order with init=scratch)
    warmup_steps: int = 15  # linear warm-up steps

    def validate(self) -> None:
        check_range("steps", self.steps, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, lo=0)

    def recipe(self, n_examples: int) -> "lm.LMRecipe":
        """`tasks._kit.lm.LMRecipe` running exactly `steps` steps over `n_examples`."""
        from tasks._kit.lm import LMRecipe

        return LMRecipe(epochs=self.steps / math.ceil(n_examples / self.batch_size), lr=self.lr,
                        batch_size=self.batch_size, warmup_steps=self.warmup_steps)

    def effective_steps(self, ctx: "RunContext") -> int:
        return Budget(ctx.budget).steps(self.steps)


# ---- data --------------------------------------------------------------------------------------------------

def training_rows(task: "Task") -> list[dict]:
    """The task's training problems as {"question", "answer"} rows (see the module docstring)."""
    return require(task, TrainingRows).training_rows()


def ground_truth_examples(task: "Task") -> "list[lm.Example]":
    from tasks._kit import lm

    rows = training_rows(task)
    return lm.encode_examples(task.tokenizer, [lm.prompt_of(r["question"]) for r in rows],
                              [r["answer"] for r in rows])


def left_padded_prompts(ids: "torch.Tensor", labels: "torch.Tensor", pad_id: int):
    """The prompts of a right-padded training batch (the tokens before its first label), left-padded, with
    their attention mask: what generation starts from."""
    import torch

    lengths = (labels == -100).long().cumprod(dim=1).sum(dim=1).tolist()
    width = max(lengths)
    out = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(out)
    for r, n in enumerate(lengths):
        out[r, width - n:] = ids[r, :n]
        mask[r, width - n:] = 1
    return out, mask


def positions(mask: "torch.Tensor") -> "torch.Tensor":
    """Position ids that skip left padding."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


# ---- models ------------------------------------------------------------------------------------------------

def frozen_teacher(subject: "Subject", ctx: "RunContext"):
    """A float32 copy of the reference in eval mode without gradients (the subject stays untouched)."""
    teacher = copy.deepcopy(subject.model).to(ctx.device).float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def initial_student(task: "Task", ctx: "RunContext", init: str):
    """The student at its starting point (see the module docstring), float32 on the run's device."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {', '.join(INITS)}")
    if init == "scratch":
        model = require(task, Student).build_student()
    else:
        model = copy.deepcopy(require(task, Draft).draft_subject(ctx).model)
    return model.to(ctx.device).float()


def state_digest(model) -> str:
    from bench import cache

    return cache.weights_digest(model)


def cost_note(init: str) -> str:
    return ("from the published draft (its own training is not counted)" if init == "draft"
            else "from a fresh init")


# ---- the control -------------------------------------------------------------------------------------------

def control(task: "Task", ctx: "RunContext", cfg: LMDistillConfig, examples: "list[lm.Example]") -> ControlResult:
    """The same student and recipe fine-tuned on the ground truth alone, trained and evaluated once, cached."""
    from bench import cache
    from tasks._kit import lm
    from tasks.base import Evaluation

    start = initial_student(task, ctx, cfg.init)
    k = cache.key(task.spec.version, task.data_fingerprint(), cfg.init, state_digest(start), cfg.steps,
                  cfg.batch_size, cfg.lr, cfg.warmup_steps, ctx.seed, ctx.budget, ctx.device)
    folder = cache.task_dir(task) / "controls"
    path = folder / f"lm-student-{k}.safetensors"
    def build() -> tuple[dict, dict]:
        stats = lm.fit_lm(start, examples, cfg.recipe(len(examples)), ctx, seed=ctx.seed,
                          description="Fine-tuning the same student without the teacher (control, cached)",
                          pad_id=task.tokenizer.pad_token_id)
        state = {n: t.detach().clone() for n, t in start.state_dict().items()}  # clones: no shared storage
        return state, {"seconds": stats.seconds}

    # weights and their cost are one cache entry: a damaged half rebuilds both, never a cached null
    state, cost, digest, _ = cache.cached_bundle(path, build)
    start.load_state_dict(state)
    subject = task.prepare(start, ctx)
    ev_path = folder / f"lm-student-eval-{cache.key(digest, ctx.profile.name, ctx.seed, ctx.budget)}.json"
    payload, _ = cache.cached_json(ev_path, lambda: task.evaluate(subject, ctx).to_json())
    ev = Evaluation.from_json(payload)
    return ControlResult(
        "student_without_teacher",
        f"the same student ({cost_note(cfg.init)}), steps, batch, learning rate and seed, fine-tuned on the "
        f"ground-truth answers alone (plain fine-tuning)", ev.value, ev.per_example, cost["seconds"])


# ---- training ----------------------------------------------------------------------------------------------

def train(task: "Task", ctx: "RunContext", cfg: LMDistillConfig, examples: "list[lm.Example]", description: str,
          loss_fn=None, batch_loss=None):
    """(student, `tasks._kit.lm.TrainStats`): the student trained by `tasks._kit.lm.fit_lm` with the method's loss."""
    from tasks._kit import lm

    student = initial_student(task, ctx, cfg.init)
    stats = lm.fit_lm(student, examples, cfg.recipe(len(examples)), ctx, seed=ctx.seed, description=description,
                      pad_id=task.tokenizer.pad_token_id, loss_fn=loss_fn, batch_loss=batch_loss)
    return student, stats


def completion_logits(model, seq: "torch.Tensor", mask: "torch.Tensor", prompt_width: int) -> "torch.Tensor":
    """Logits [B, G, V] that predict the tokens seq[:, prompt_width:] (left-padded prompts, any padding after)."""
    out = model(input_ids=seq, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    return out[:, prompt_width - 1:-1].float()


def sample(student, teacher, prompts: "torch.Tensor", prompt_mask: "torch.Tensor", max_new_tokens: int,
           eos_id: int, pad_id: int, gen: "torch.Generator", teacher_mix: float = 0.0):
    """Sample completions token by token from p~ = teacher_mix * p_teacher + (1 - teacher_mix) * q_student
    (both at temperature 1, whole vocabulary; teacher_mix = 0 samples the student alone), with KV caches.

    Returns (sequences [B, P + G], attention mask, completion mask [B, G]): a completion's tokens up to and
    including its EOS are real; after it, padding. The teacher runs only when teacher_mix > 0."""
    import torch

    from tasks._kit import lm

    mask = prompt_mask.clone()
    pos = positions(mask)
    models = [student] + ([teacher] if teacher_mix > 0 else [])
    outs = [m(input_ids=prompts, attention_mask=mask, position_ids=pos, use_cache=True) for m in models]
    last = pos[:, -1]
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    tokens, real = [], []
    for _ in range(max_new_tokens):
        probs = torch.softmax(outs[0].logits[:, -1].float(), dim=-1)
        if teacher_mix > 0:
            probs = teacher_mix * torch.softmax(outs[1].logits[:, -1].float(), dim=-1) + (1 - teacher_mix) * probs
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        live = ~done
        nxt = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        tokens.append(nxt)
        real.append(live)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        mask = torch.cat([mask, live.long()[:, None]], dim=1)
        last = last + 1
        outs = [m(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                  **lm.cache_kwargs(m, lm.output_cache(o)), use_cache=True) for m, o in zip(models, outs)]
    completion = torch.stack(tokens, dim=1)
    comp_mask = torch.stack(real, dim=1)
    seq = torch.cat([prompts, completion], dim=1)
    return seq, torch.cat([prompt_mask, comp_mask.long()], dim=1), comp_mask
