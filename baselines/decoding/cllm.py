"""`cllm`: consistency large language models (Kou, Hu, He, Deng and Zhang, 2024, "CLLMs: Consistency Large Language
Models", ICML 2024, arXiv:2403.00835): the reference fine-tuned to converge in fewer Jacobi iterations, then
decoded by Jacobi iteration (`baselines.decoding.jacobi`).

Jacobi decoding (see `jacobi.py`) solves the n greedy equations of a block y = (y_1..y_n) after a context x,

    y_i = argmax_v q(v | x, y_{<i}),   i = 1..n,

by the parallel update y^(j+1)_i = argmax_v q(v | x, y^(j)_{<i}) from a guess y^(0). The iterates
J = (y^(0), y^(1), ..., y^(J) = y*) are the block's Jacobi trajectory, and the fixed point y* is the greedy output.
An autoregressively trained model rarely predicts y_i right while some y_{<i} is still wrong, so each pass
fixes about one token (arith's reference: 1.21 tokens a pass). A CLLM q_theta is trained so that *any* state
of a trajectory maps to the fixed point, so that several tokens become right in one pass.

1. Trajectories (`_cllm.jacobi_trajectory`). For `prompts` training problems (the task's `TrainingRows`, a seeded
   sample), the reference p's greedy answer is decoded block by block, n = `block_size` tokens a block, each
   block iterated from y^(0) = (pad, ..., pad) (the guess `jacobi_decode` gives a block's tail) to its fixed
   point; every iterate is kept. The next block's context is x plus the fixed point. (The paper starts a block
   from random prompt tokens; here y^(0) is what the decoder below actually starts from.)

2. Fine-tuning (`_cllm.cllm_losses`, `_cllm.fit`), q_theta initialised with p's weights, on

       L(theta) = L_C + w * L_AR                                     (the paper's section 3.2; w = `ar_weight`)

   global consistency (`consistency=global`, the paper's eq. 4): a random state y = y^(j), j < J, of a random
   block, mapped to the fixed point,

       L_GC = E_{(x, J), y ~ J} [ (1/n) sum_{i=1..n} KL( q_{theta^-}(. | x, y*_{<i}) || q_theta(. | x, y_{<i}) ) ]

   local consistency (`consistency=local`): each state mapped to the next one on its trajectory,

       L_LC = E_{(x, J), j} [ (1/n) sum_{i=1..n} KL( q_{theta^-}(. | x, y^(j+1)_{<i}) || q_theta(. | x, y^(j)_{<i}) ) ]

   theta^- is stop-gradient (the target side is detached), KL is the forward KL (the paper's D; its code's soft
   cross-entropy differs from it by the target's entropy, a constant), n runs over the block's tokens up to its
   EOS, and the batch averages over tokens. The AR loss keeps generation quality: next-token
   cross-entropy on the generated sequence ending in the block's fixed point (the reference's own greedy
   output: what q_theta should still produce),

       L_AR = E_{(x, y*)} [ - sum_t log q_theta(l_t | x, l_{<t}) ] / |l|,   l = the generated tokens of [x, y*].

   AdamW, warm-up then cosine to zero, clipping at 1 (as the tasks' own training). A state y^(j) of a block with
   y^(j) = y* everywhere has L_C = 0 exactly (the two passes have the same inputs and shapes); so has a state
   that differs from y* only in its last token, which no prediction reads (y^(J-1) often does).

3. Decoding: `jacobi_decode` with the trained model and the same n. Jacobi decoding returns the greedy output of
   the model it runs, so the answers are the *fine-tuned* model's greedy answers: quality and its delta against
   the reference are whatever training made them (not lossless). With `steps=0` the model is the reference bit
   for bit and the output its greedy output.

Statistics (`_cllm.count_phenomena`): beside tokens per pass, the two sources of speedup the paper names,
counted on the evaluation's decoding: fast-forwarded tokens (the tokens a pass commits beyond the one
autoregressive decoding would: tokens - passes) and stationary tokens (output positions that a pass predicted
right while an earlier position of the same pass was still wrong, and that kept that token until committed).
The same counts for the reference and for the trained model, decoded the same way on `heldout_prompts` training
problems that training did not use, are recorded from the build (`heldout_*`), with the share of those
answers identical to the reference's.

Cache: trajectories (a function of the reference's weights, the prompts, n, the profile and device) are one JSON
entry with the seconds they took; the fine-tuned weights are one `cached_bundle` with what only their training
knows (seconds, steps, samples, tokens, final losses, the held-out comparison), keyed by the trajectories, the
config, the seed and the budget. The record's cost is trajectories + training, cached or not.

What the libraries lacked: transformers 5 has no Jacobi iteration and no consistency loss; the authors' code
(hao-ai-lab/Consistency_LLM) patches an older transformers' Llama and trains with its Trainer, FSDP and wandb,
on GPUs. Trajectories, losses and the loop are written here on the model's own forward and a DynamicCache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from baselines.base import Applied, Cost, Method
from baselines.decoding.jacobi import decode_rows, int_in_range
from bench.api import TrainingRows
from bench.config import ConfigError, check_range
from bench.registry import register_method

SMOKE_PROMPTS = 6  # trajectories under --budget smoke
SMOKE_HELDOUT = 2


@dataclass(frozen=True)
class CLLMConfig:
    # n, tokens a Jacobi block holds (training and decoding). The paper uses 16-64 on 7B models; a pass over 16
    # tokens of arith's 2.7M reference costs little more than a 1-token step (framework overhead dominates), and
    # a block of 16 holds an arith sentence with its copied numbers. n = 8 measured the same (below)
    block_size: int = 16
    consistency: Literal["global", "local"] = "global"  # L_GC (y^(j) -> y*) or L_LC (y^(j) -> y^(j+1))
    ar_weight: float = 10.0  # w in L_C + w * L_AR (the authors' code scales its AR loss by 10 as well)
    # training problems whose trajectories are collected: ~12 Jacobi passes per block of 16, ~3.7 blocks per
    # problem; 300 problems -> ~1,100 blocks in 1-4 minutes on 2 cores (a pass is framework-bound, ~3-5 ms)
    prompts: int = 300
    # optimiser steps: ~0.4-0.8 s each at batch 16 on 2 cores (two forward/backward passes of the 2.7M
    # reference), so 2-4 minutes. Measured on arith (40 held-out training problems, unquiet machine): the
    # reference commits 1.21 tokens a pass; 300 steps at these defaults 1.30 (local consistency 1.30, n = 8
    # 1.28, w = 30 1.28) with 55-57% exact answers against the reference's 62%; at lr 5e-4 and w = 1, 100
    # steps gave 1.33 but 28%. The paper trains for hours on GPUs: a short CPU budget buys a small gain
    steps: int = 300
    batch_size: int = 16  # blocks per step, each with one random non-fixed state of its trajectory
    lr: float = 1e-4  # AdamW peak rate (the reference was trained at 2e-3; 5e-4 here cost half the accuracy)
    warmup_steps: int = 20
    max_new_tokens: int = 160  # the longest answer a trajectory follows (arith's answers are at most ~110)
    heldout_prompts: int = 32  # training problems left out of training, decoded by reference and model

    def validate(self) -> None:
        int_in_range("block_size", self.block_size, 2, 128)
        if self.consistency not in ("global", "local"):
            raise ConfigError(f"consistency={self.consistency!r} must be 'global' or 'local'")
        check_range("ar_weight", self.ar_weight, lo=0)
        check_range("prompts", self.prompts, lo=1)
        check_range("steps", self.steps, lo=0)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, lo=0)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)
        check_range("heldout_prompts", self.heldout_prompts, lo=0)


def split_rows(n_rows: int, n_train: int, n_held: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint seeded samples of the training split: the trajectories' problems and the held-out ones."""
    import random

    if n_rows == 0:
        raise ValueError("the task's training split is empty: no trajectories to train on")
    drawn = random.Random(seed).sample(range(n_rows), min(n_rows, n_train + n_held))
    return sorted(drawn[:n_train]), sorted(drawn[n_train:])


@register_method("cllm", family="decoding", year=2024, url="https://arxiv.org/abs/2403.00835",
                 paper="Kou et al., CLLMs: Consistency Large Language Models",
                 modalities=("causal-lm",), requires=(TrainingRows,),
                 summary="the reference fine-tuned on its own Jacobi trajectories (consistency + AR loss) to "
                         "converge in fewer passes, then Jacobi-decoded; changes the model")
class CLLM(Method):
    Config = CLLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        import torch

        from baselines.decoding import _cllm
        from bench import cache
        from bench.api import require
        from tasks._kit import lm
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        tok = subject.extra["tokenizer"]
        eos = tok.eos_token_id
        init = pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        steps = ctx.budget.steps(cfg.steps)
        model = copy.deepcopy(subject.model)
        cost, built = Cost(description="none: steps=0, the reference itself decoded by Jacobi iteration"), {}
        if steps > 0:
            rows = require(task, TrainingRows, "cllm collects the reference's Jacobi trajectories on the "
                                               "training problems").training_rows()
            train_idx, held_idx = split_rows(len(rows), ctx.budget.pick(cfg.prompts, SMOKE_PROMPTS),
                                             ctx.budget.pick(cfg.heldout_prompts, SMOKE_HELDOUT), ctx.seed)
            encode = lambda idx: tok([lm.prompt_of(rows[i]["question"]) for i in idx],  # noqa: E731
                                     add_special_tokens=False)["input_ids"] if idx else []
            prompts, held = encode(train_idx), encode(held_idx)
            ref_digest = cache.weights_digest(subject.model)
            tkey = cache.key(task.spec.version, task.data_fingerprint(), ref_digest, train_idx, cfg.block_size,
                             cfg.max_new_tokens, ctx.profile.name, ctx.dtype, ctx.device)
            folder = cache.method_dir("cllm", task)

            def collect() -> dict:
                blocks, passes, seconds = _cllm.collect_trajectories(subject.model, prompts, cfg.max_new_tokens,
                                                                     eos, cfg.block_size, init, ctx)
                return {"blocks": [b.to_json() for b in blocks], "passes": passes, "seconds": seconds}

            traj, _ = cache.cached_json(folder / f"trajectories-{tkey}.json", collect)
            blocks = [_cllm.Block.from_json(b) for b in traj["blocks"]]
            config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
            wkey = cache.key(tkey, config, steps, ctx.seed, ctx.budget, held_idx)

            def build() -> tuple[dict, dict]:
                student = copy.deepcopy(subject.model).float()
                st = _cllm.fit(student, blocks, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                               warmup_steps=cfg.warmup_steps, ar_weight=cfg.ar_weight,
                               consistency=cfg.consistency, pad=pad, seed=ctx.seed, ctx=ctx)
                meta = {"seconds": st.seconds, "steps": st.steps, "samples": st.samples_seen,
                        "tokens": st.tokens_seen, "final_consistency_loss": st.final_consistency,
                        "final_ar_loss": st.final_ar}
                student.to(next(subject.model.parameters()).dtype)  # as the run will decode it
                if held:
                    ref_out, ref_stats = _cllm.decode_prompts(subject.model, held, cfg.max_new_tokens, eos,
                                                              cfg.block_size, init)
                    out, stats = _cllm.decode_prompts(student, held, cfg.max_new_tokens, eos, cfg.block_size, init)
                    for name, s in (("heldout_reference", ref_stats), ("heldout", stats)):
                        for k in ("tokens_per_pass", "fast_forwarded_share", "stationary_share"):
                            meta[f"{name}_{k}"] = s[k]
                    meta["heldout_identical_answers"] = sum(a == b for a, b in zip(out, ref_out)) / len(held)
                state = {k: v.detach().clone() for k, v in student.state_dict().items()}  # no shared storage
                return state, meta

            state, built, _, _ = cache.cached_bundle(folder / f"model-{wkey}.safetensors", build)
            model.load_state_dict(state)
            n_states = sum(len(b.states) for b in blocks)
            cost = Cost(traj["seconds"] + built["seconds"], built["steps"], built["samples"],
                        f"greedy Jacobi trajectories of the reference on {len(prompts)} training problems "
                        f"({len(blocks)} blocks of {cfg.block_size}, {n_states} states, {traj['passes']} passes, "
                        f"{traj['seconds']:.0f} s), then {built['steps']} AdamW steps of {cfg.consistency} "
                        f"consistency + {cfg.ar_weight:g} x AR loss ({built['seconds']:.0f} s)",
                        tokens_seen=built["tokens"])
            built = {**{k: v for k, v in built.items() if k not in ("seconds", "steps", "samples", "tokens")},
                     "trajectory_blocks": len(blocks), "trajectory_states_per_block": n_states / max(1, len(blocks)),
                     "trajectory_seconds": traj["seconds"], "training_seconds": built["seconds"]}
        decoder = _cllm.Decoder(model, cfg.block_size, init)  # the copy keeps the subject's device and dtype

        def generate(subj, input_ids, max_new_tokens: int, attention_mask=None):
            return decode_rows(subj, input_ids, max_new_tokens, attention_mask, decoder.decode)

        new = Subject(model, subject.kind, {**subject.extra, "generate": generate})
        return Applied(new, cost, stats=lambda: {**decoder.stats(), **built})
