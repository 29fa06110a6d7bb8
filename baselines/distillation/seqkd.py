"""`seqkd`: sequence-level knowledge distillation (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation",
arXiv:1606.07947, section 3.2): fine-tune the student on the teacher's own outputs.

Kim & Rush approximate the teacher's sequence distribution by its mode, y^ ~= argmax_y p_t(y | x) (beam search
there; greedy decoding here, the task's own decoding), and train the student on it with the NLL:

    L_SEQ-KD = - sum_x log p_s( y^(x) | x ),   y^(x) = greedy decode of the teacher from prompt x

This is the recipe used to distil reasoning models: the student learns the teacher's worked solutions, right
or wrong, instead of the reference answers. Prompts: `steps * batch_size` training prompts drawn without
replacement (seeded by the run's seed), so each step sees fresh teacher solutions. The teacher decodes them
in batches of `GEN_BATCH` (left-padded, greedy, up to `max_new_tokens`, stopping at EOS); a solution cut off
at the limit is kept as it is. The student then trains on (prompt, teacher solution + EOS) exactly as the control
trains on (prompt, reference answer + EOS), by the same loop and recipe (`baselines.distillation._lm`).

The teacher's solutions are a function of the reference's weights, the prompts and the profile, so they are
cached (with the seconds they took, which the cost includes on every run, cached or not).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from baselines.distillation._lm import GEN_BATCH, LMDistillConfig
from bench.config import check_range
from bench.api import Draft, Tokenizer, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class SeqKDConfig(LMDistillConfig):
    max_new_tokens: int = 160  # the longest teacher solution kept (arith's answers are at most ~110 tokens)

    def validate(self) -> None:
        super().validate()
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


def teacher_solutions(subject, task, ctx, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy completions of the teacher subject (its own decoding procedure) for each prompt, each up to and
    including its EOS."""
    import torch

    from tasks._kit import lm

    tok = task.tokenizer
    out: list[list[int]] = []
    with ctx.progress.step("Generating the teacher's solutions", total=len(prompt_ids)) as advance, \
            torch.inference_mode():
        for i in range(0, len(prompt_ids), GEN_BATCH):
            chunk = prompt_ids[i:i + GEN_BATCH]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            gen = lm.generate_ids(subject, ids.to(ctx.device), max_new_tokens, mask.to(ctx.device)).cpu()
            for r in range(len(chunk)):
                out.append(lm.completion_tokens(gen[r:r + 1], width, tok.eos_token_id))
            advance(len(chunk))
    return out


@register_method("seqkd", family="distillation", paper="Kim & Rush, Sequence-Level Knowledge Distillation",
                 year=2016, url="https://arxiv.org/abs/1606.07947", modalities=("causal-lm",),
                 requires=(TrainingRows, Draft, Tokenizer),
                 summary="fine-tune the task's student LM on the teacher's own greedy solutions")
class SeqKD(Method):
    Config = SeqKDConfig

    def apply(self, subject, task, ctx) -> Applied:
        import random
        import time

        from baselines.distillation import _lm
        from bench import cache
        from tasks._kit import lm

        cfg = self.config
        rows = _lm.training_rows(task)
        n = min(len(rows), cfg.effective_steps(ctx) * cfg.batch_size)
        picked = sorted(random.Random(ctx.seed).sample(range(len(rows)), n))
        prompts = task.tokenizer([lm.prompt_of(rows[i]["question"]) for i in picked],
                                 add_special_tokens=False)["input_ids"]
        key = cache.key(task.spec.version, task.data_fingerprint(), _lm.state_digest(subject.model), picked,
                        cfg.max_new_tokens, ctx.profile.name, ctx.budget)
        path = cache.task_dir(task) / f"seqkd-teacher-{key}.json"

        def build() -> dict:
            t0 = time.perf_counter()
            sols = teacher_solutions(subject, task, ctx, prompts, cfg.max_new_tokens)
            return {"solutions": sols, "seconds": time.perf_counter() - t0}

        made, _ = cache.cached_json(path, build)
        sols = made["solutions"]
        eos = task.tokenizer.eos_token_id
        examples = [(p + s, [-100] * len(p) + s) for p, s in zip(prompts, sols) if s]
        student, stats = _lm.train(task, ctx, cfg, examples, description="Fine-tuning the student on the "
                                                                         "teacher's solutions")
        control = _lm.control(task, ctx, cfg, _lm.ground_truth_examples(task))
        generated = sum(len(s) for s in sols)
        ended = sum(1 for s in sols if s and s[-1] == eos)
        cost = Cost(made["seconds"] + stats.seconds, stats.steps, stats.samples_seen,
                    f"greedy solutions of the teacher to {n:,} training prompts ({generated:,} tokens, "
                    f"{made['seconds']:.0f} s), then {stats.steps} AdamW steps of the student "
                    f"{_lm.cost_note(cfg.init)} on them", tokens_seen=stats.tokens_seen)
        stats_out = {"teacher_prompts": float(n), "teacher_tokens_generated": float(generated),
                     "teacher_solutions_ending_in_eos": ended / max(1, n), "teacher_seconds": made["seconds"]}
        return Applied(task.prepare(student, ctx), cost, [control], stats=lambda: stats_out)
