"""`gkd`: generalized knowledge distillation, on-policy (Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist &
Bachem, 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024,
arXiv:2306.13649), run by TRL's own `GKDTrainer` (`trl.experimental.gkd`, TRL 1.16).

At every step, with probability lambda the batch's responses are sampled from the student itself (on-policy,
temperature `temperature`, whole vocabulary, up to `max_new_tokens`), otherwise they are the ground-truth
answers; the student then minimises, token by token over the responses, the generalised Jensen-Shannon
divergence between teacher p_T and student p_S (eq. 1 of the paper):

    L = E_{x, y ~ (lambda: p_S, 1 - lambda: data)} [ (1/|y|) sum_t JSD(beta)( p_T(.|y_<t, x) || p_S(.|y_<t, x) ) ]
    JSD(beta)(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M),   M = beta * P + (1 - beta) * Q

with P = p_T (teacher) and Q = p_S (student), the paper's convention, which TRL's `generalized_jsd_loss`
follows (its mixture is beta * teacher + (1 - beta) * student). The end points (a test checks them): JSD(beta)
tends to 0 at both, and the paper's normalised limits are JSD(beta)/beta -> KL(p_T || p_S), the forward KL,
as beta -> 0, and JSD(beta)/(1 - beta) -> KL(p_S || p_T), the reverse KL, as beta -> 1. TRL computes the two
end points exactly as those KLs: beta = 0 is the forward KL (mean-seeking, as in `kd-lm`), beta = 1 the
reverse KL (mode-seeking, as in `minillm`). TRL's loss is at temperature 1 whatever the sampling temperature;
no gradient flows through the sampling (the paper's choice, section 3.1).

Why TRL and what is ours: TRL 1.16's trainer runs offline on local models on the CPU with transformers 5.23
(checked here), so the library's own loss, sampling and on-policy switch are what is measured. We give it the
student, the frozen float32 teacher, the tokenized training split (its chat-template collator is replaced by
one for the tasks' plain prompt format, left-padding prompts for generation) and a recipe matched to the other
LM methods' `tasks._kit.lm.fit_lm`: AdamW (betas 0.9/0.98, no weight decay), warm-up then cosine to zero, gradient
clipping at 1, `steps` steps of `batch_size` (`max_steps`; 20 under the smoke budget), seeded by the run's
seed; no gradient checkpointing (it only trades time for memory). The control is the shared one
(`baselines.distillation._lm`: plain fine-tuning by `fit_lm`, the same recipe; the data order differs).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from baselines.distillation._lm import LMDistillConfig
from bench.config import check_range
from bench.api import Draft, Tokenizer, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class GKDConfig(LMDistillConfig):
    lmbda: float = 0.5  # lambda, the share of steps on the student's own samples (TRL's default; 1 = on-policy)
    beta: float = 0.5  # JSD interpolation: 0 = forward KL(teacher || student), 1 = reverse KL (TRL's default)
    temperature: float = 1.0  # the student's sampling temperature (the paper samples at 1)
    max_new_tokens: int = 160  # longest sampled response (arith's answers are at most ~110 tokens)

    def validate(self) -> None:
        super().validate()
        check_range("lmbda", self.lmbda, lo=0, hi=1)
        check_range("beta", self.beta, lo=0, hi=1)
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


def generalized_jsd(student_logits, teacher_logits, beta: float, labels=None):
    """TRL's own generalised JSD, as `GKDTrainer.compute_loss` calls it: averaged over the positions whose
    label is not -100 (all positions when `labels` is None)."""
    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    if labels is None:
        labels = torch.zeros(student_logits.shape[:-1], dtype=torch.long, device=student_logits.device)

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta)


def collator(pad_id: int):
    """Batches for GKDTrainer: full sequences right-padded with their labels, and the prompts left-padded
    (what `generate` continues on-policy)."""
    import torch

    def collate(rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        m = max(r["prompt_len"] for r in rows)
        out = {"input_ids": torch.full((len(rows), n), pad_id), "labels": torch.full((len(rows), n), -100),
               "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
               "prompts": torch.full((len(rows), m), pad_id),
               "prompt_attention_mask": torch.zeros((len(rows), m), dtype=torch.long)}
        for i, r in enumerate(rows):
            k, p = len(r["input_ids"]), r["prompt_len"]
            out["input_ids"][i, :k] = torch.tensor(r["input_ids"])
            out["labels"][i, :k] = torch.tensor(r["labels"])
            out["attention_mask"][i, :k] = 1
            out["prompts"][i, m - p:] = torch.tensor(r["input_ids"][:p])
            out["prompt_attention_mask"][i, m - p:] = 1
        return out

    return collate


def _checkpointing_field(config_cls) -> str:
    """transformers 5.x renamed `gradient_checkpointing` `activation_checkpointing` (the old name warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


@register_method("gkd", family="distillation", paper="Agarwal et al., On-Policy Distillation of Language Models: "
                 "Learning from Self-Generated Mistakes", year=2024, url="https://arxiv.org/abs/2306.13649",
                 modalities=("causal-lm",),
                 requires=(TrainingRows, Draft, Tokenizer),
                 summary="generalised JSD between teacher and student on a lambda-mix of the student's own "
                         "samples and the data (TRL's GKDTrainer)")
class GKD(Method):
    Config = GKDConfig

    def apply(self, subject, task, ctx) -> Applied:
        import time

        import datasets
        from transformers import TrainerCallback

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig as TRLConfig
        from trl.experimental.gkd import GKDTrainer

        from baselines.distillation import _lm

        cfg = self.config
        teacher = _lm.frozen_teacher(subject, ctx)
        student = _lm.initial_student(task, ctx, cfg.init)
        examples = _lm.ground_truth_examples(task)
        data = datasets.Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples],
                                           "prompt_len": [next(i for i, t in enumerate(e[1]) if t != -100)
                                                          for e in examples]})
        total = cfg.effective_steps(ctx)
        counted = {"tokens": 0, "samples": 0}

        class Trainer(GKDTrainer):
            def compute_loss(self, model, inputs, *args, **kwargs):  # the batch as trained on (sampled or not)
                counted["tokens"] += int(inputs["attention_mask"].sum())
                counted["samples"] += int(inputs["input_ids"].shape[0])
                return super().compute_loss(model, inputs, *args, **kwargs)

        with ctx.progress.step(f"GKD (TRL): lambda {cfg.lmbda}, beta {cfg.beta}", total=total) as advance, \
                tempfile.TemporaryDirectory(prefix="bench-gkd-") as out:

            class Progress(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    advance(1)

            args = TRLConfig(
                output_dir=out, max_steps=total, per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                lr_scheduler_type="cosine", warmup_steps=min(cfg.warmup_steps, max(1, total // 10)),
                adam_beta1=0.9, adam_beta2=0.98, weight_decay=0.0, max_grad_norm=1.0, seed=ctx.seed,
                data_seed=ctx.seed, use_cpu=ctx.device == "cpu", bf16=False, fp16=False, report_to=[],
                save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                lmbda=cfg.lmbda, beta=cfg.beta, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                **{_checkpointing_field(TRLConfig): False})
            trainer = Trainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                              data_collator=collator(task.tokenizer.pad_token_id), processing_class=task.tokenizer,
                              callbacks=[Progress()])
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
        student = trainer.model
        student.eval()
        control = _lm.control(task, ctx, cfg, examples)
        steps = int(trainer.state.global_step)
        cost = Cost(seconds, steps, counted["samples"],
                    f"{steps} AdamW steps of TRL's GKDTrainer on the student {_lm.cost_note(cfg.init)} "
                    f"(on-policy samples on a share lambda={cfg.lmbda} of them)", tokens_seen=counted["tokens"])
        return Applied(task.prepare(student, ctx), cost, [control])
