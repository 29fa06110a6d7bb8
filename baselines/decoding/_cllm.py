"""The parts of `cllm` (consistency LLMs, Kou et al. 2024): Jacobi trajectories, the consistency and AR losses,
the fine-tuning loop, and the counts of fast-forwarded and stationary tokens. The equations are in
`baselines/decoding/cllm.py`'s docstring.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from baselines.decoding.jacobi import Counters, jacobi_decode
from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext


# ---- Jacobi trajectories ------------------------------------------------------------------------------------

@dataclass
class Block:
    """One n-token block of a prompt's greedy answer with its Jacobi trajectory y^(0), ..., y^(J) = y*."""

    context: list[int]  # x: the prompt and the fixed points of the blocks before this one
    prompt_len: int  # how much of `context` is the prompt (the rest was generated)
    states: list[list[int]]  # y^(0) (the init guess) .. y^(J) (the fixed point), each of the block's length
    valid: int  # tokens of the block that belong to the answer (all of it, or up to and including EOS)

    @property
    def fixed_point(self) -> list[int]:
        return self.states[-1][:self.valid]

    def to_json(self) -> list:
        return [self.context, self.prompt_len, self.states, self.valid]

    @classmethod
    def from_json(cls, d: list) -> "Block":
        return cls(list(d[0]), int(d[1]), [list(s) for s in d[2]], int(d[3]))


def jacobi_trajectory(model, prompt: list[int], max_new_tokens: int, eos: int, n: int,
                      init: int) -> tuple[list[Block], int]:
    """The Jacobi trajectories of `model`'s greedy answer to `prompt`, block by block, and the forward passes
    they took. Each block starts from y^(0) = (init, ..., init) (the guess `jacobi_decode` starts a block's
    tail from) and iterates y^(j+1)_i = argmax q(. | x, y^(j)_{<i}) for all i at once (one forward pass over
    the block, the context x in a KV cache) until y^(j+1) = y^(j) up to the block's first EOS: that state is
    the fixed point, the block's greedy tokens, and x grows by it. Stops at EOS or `max_new_tokens`."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = list(prompt)
    if len(ids) > 1:  # the cache holds x minus its last token, which each pass feeds first
        model(input_ids=torch.tensor([ids[:-1]], device=device), **cache_kwargs(model, cache), use_cache=True,
              logits_to_keep=1)
    blocks: list[Block] = []
    generated = passes = 0
    while generated < max_new_tokens:
        nb = min(n, max_new_tokens - generated)
        y = [init] * nb
        states = [y]
        while True:
            inp = torch.tensor([[ids[-1]] + y[:nb - 1]], device=device)
            logits = model(input_ids=inp, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=nb).logits
            new = logits[0].argmax(-1).tolist()
            passes += 1
            end = new.index(eos) + 1 if eos in new else nb
            if new[:end] == y[:end]:  # a fixed point; the cache now holds x and y*_1..y*_{nb-1}
                break
            cache.crop(-nb)
            y = new
            states.append(y)
        blocks.append(Block(list(ids), len(prompt), states, end))
        ids += y[:end]
        generated += end
        if end < nb or y[end - 1] == eos:
            break
    return blocks, passes


def collect_trajectories(model, prompts: list[list[int]], max_new_tokens: int, eos: int, n: int, init: int,
                         ctx: "RunContext") -> tuple[list[Block], int, float]:
    """`jacobi_trajectory` of every prompt: (blocks, forward passes, seconds)."""
    import torch

    blocks: list[Block] = []
    passes = 0
    t0 = time.perf_counter()
    with ctx.progress.step("Collecting the reference's Jacobi trajectories", total=len(prompts)) as advance, \
            torch.inference_mode():
        for p in prompts:
            b, k = jacobi_trajectory(model, p, max_new_tokens, eos, n, init)
            blocks += b
            passes += k
            advance(1)
    return blocks, passes, time.perf_counter() - t0


# ---- the losses ---------------------------------------------------------------------------------------------

def _batch(seqs: list[list[int]], pad: int, device) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded ids and attention mask (a causal model's real positions never see the padding after them)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def cllm_losses(model, samples: list[tuple[Block, int]], consistency: str, pad: int
                ) -> tuple["torch.Tensor", "torch.Tensor", int]:
    """(L_C, L_AR, tokens) of a batch of (block, j) samples: the consistency loss between the model's next-token
    distributions on [x, y^(j)] and on the target state (y* for `global`, y^(j+1) for `local`) at the block's
    positions, the target side without gradient; and the AR loss on [x, y*] over the generated tokens.

    Every sequence of a sample has the same length (x plus the block's valid tokens), so the student and target
    passes have the same shapes: a state equal to its target gives bit-identical logits and L_C = 0 exactly."""
    import torch
    import torch.nn.functional as F

    from tasks._kit.lm import completion_loss

    device = next(model.parameters()).device
    star = [b.context + b.fixed_point for b, _ in samples]
    state = [b.context + b.states[j][:b.valid] for b, j in samples]
    ids_star, mask = _batch(star, pad, device)
    ids_state, _ = _batch(state, pad, device)
    logits_star = model(input_ids=ids_star, attention_mask=mask).logits
    labels = torch.full_like(ids_star, -100)
    rows, pos = [], []
    for r, (b, _) in enumerate(samples):
        labels[r, b.prompt_len:len(star[r])] = ids_star[r, b.prompt_len:len(star[r])]
        rows += [r] * b.valid
        pos += range(len(b.context) - 1, len(b.context) - 1 + b.valid)  # the logits that predict the block
    loss_ar = completion_loss(logits_star, labels)
    if consistency == "global":
        target = logits_star.detach()
    else:  # local: the next iterate of the trajectory is the target
        with torch.no_grad():
            nxt = [b.context + b.states[j + 1][:b.valid] for b, j in samples]
            target = model(input_ids=_batch(nxt, pad, device)[0], attention_mask=mask).logits
    student = model(input_ids=ids_state, attention_mask=mask).logits
    r_idx, p_idx = torch.tensor(rows, device=device), torch.tensor(pos, device=device)
    log_q = F.log_softmax(student[r_idx, p_idx].float(), dim=-1)
    log_p = F.log_softmax(target[r_idx, p_idx].float(), dim=-1)
    loss_c = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()  # KL(p_target || q_theta)
    return loss_c, loss_ar, int(mask.sum()) * 2


@dataclass
class FitStats:
    seconds: float = 0.0
    steps: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    final_consistency: float = float("nan")
    final_ar: float = float("nan")


def fit(model, blocks: list[Block], *, steps: int, batch_size: int, lr: float, warmup_steps: int,
        ar_weight: float, consistency: str, pad: int, seed: int, ctx: "RunContext") -> FitStats:
    """Fine-tune `model` in place on L = L_C + w * L_AR (AdamW, linear warm-up then cosine to zero, gradient
    clipping at 1, as `tasks._kit.lm.fit_lm`), deterministically for `seed`: each step draws `batch_size` blocks
    (an epoch at a time, shuffled) and for each a random non-fixed state y^(j), j < J."""
    import torch

    pool = [b for b in blocks if len(b.states) > 1]  # a block whose init guess was already y* teaches nothing
    stats = FitStats()
    if steps == 0 or not pool:
        return stats
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = min(warmup_steps, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    queue: list[int] = []
    run_c = run_ar = None
    t0 = time.perf_counter()
    with ctx.progress.step(f"Consistency training ({consistency})", total=steps) as advance:
        for _ in range(steps):
            picked = []
            while len(picked) < min(batch_size, len(pool)):
                if not queue:
                    queue = torch.randperm(len(pool), generator=gen).tolist()
                picked.append(pool[queue.pop()])
            samples = [(b, int(torch.randint(len(b.states) - 1, (1,), generator=gen))) for b in picked]
            loss_c, loss_ar, tokens = cllm_losses(model, samples, consistency, pad)
            loss = loss_c + ar_weight * loss_ar
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            c, a = loss_c.item(), loss_ar.item()
            run_c = c if run_c is None else 0.95 * run_c + 0.05 * c
            run_ar = a if run_ar is None else 0.95 * run_ar + 0.05 * a
            stats.steps += 1
            stats.samples_seen += len(samples)
            stats.tokens_seen += tokens
            advance(1)
    model.eval()
    stats.seconds = time.perf_counter() - t0
    stats.final_consistency, stats.final_ar = float(run_c), float(run_ar)
    return stats


# ---- decoding and its two sources of speedup ----------------------------------------------------------------

def count_phenomena(trace: list[tuple[int, list[int], int]], out: list[int]) -> tuple[int, int]:
    """(fast-forwarded, stationary) tokens of one `jacobi_decode` call, from its passes (start, pred, k) and
    its output. Fast-forwarded: the tokens a pass commits beyond the one autoregressive decoding would (k - 1;
    every one of them was predicted right in an earlier pass while a token before it was still wrong).
    Stationary: output positions that some pass predicted right while an earlier position of the same pass was
    predicted wrong, and that kept that token in every later pass until committed (each counted once)."""
    fast = 0
    stationary: set[int] = set()  # positions right, with a wrong one before them, in every pass since
    for start, pred, k in trace:
        fast += min(k, len(out) - start) - 1
        wrong_before = False
        for m, t in enumerate(pred):
            p = start + m
            if p >= len(out):
                break
            right = t == out[p]
            if not right:
                stationary.discard(p)  # it changed again: not stationary (yet)
            elif wrong_before:
                stationary.add(p)
            wrong_before = wrong_before or not right
    return fast, len(stationary)


class Decoder:
    """Greedy Jacobi decoding (`jacobi_decode`) of a model, with its counters and the two phenomena."""

    def __init__(self, model, block_size: int, init: int):
        self.model, self.n, self.init = model, block_size, init
        self.counters = Counters()

    def decode(self, prompt: "torch.Tensor", max_new_tokens: int, eos: int) -> list[int]:
        trace: list[tuple[int, list[int], int]] = []
        out = jacobi_decode(self.model, prompt, max_new_tokens, eos, self.n, self.init, self.counters,
                            on_pass=lambda start, pred, k: trace.append((start, pred, k)))
        fast, stationary = count_phenomena(trace, out)
        self.counters.add("fast_forwarded_tokens", fast)
        self.counters.add("stationary_tokens", stationary)
        return out

    def stats(self) -> dict[str, float]:
        c = self.counters
        ff, st = c.extra.get("fast_forwarded_tokens", 0.0), c.extra.get("stationary_tokens", 0.0)
        return {**c.base(), "tokens_per_pass": c.tokens / max(1, c.forward_passes),
                "fast_forwarded_tokens": ff, "stationary_tokens": st,
                "fast_forwarded_share": ff / max(1, c.tokens), "stationary_share": st / max(1, c.tokens)}


def decode_prompts(model, prompts: list[list[int]], max_new_tokens: int, eos: int, block_size: int,
                   init: int) -> tuple[list[list[int]], dict[str, float]]:
    """Jacobi-decode each prompt with `model`: the outputs and the decoder's statistics."""
    import torch

    dec = Decoder(model, block_size, init)
    device = next(model.parameters()).device
    with torch.inference_mode():
        outs = [dec.decode(torch.tensor([p], device=device), max_new_tokens, eos) for p in prompts]
    return outs, dec.stats()
