"""`jacobi`: greedy Jacobi (parallel fixed-point) decoding of a block of n tokens.

Santilli et al., "Accelerating Transformer Inference for Translation via Parallel Decoding", ACL 2023
(arXiv:2305.10427); the same iteration is what CLLMs (Kou et al., 2024, arXiv:2403.00835) train a model to
converge in fewer steps.

Greedy decoding of the n tokens after a committed prefix x is the solution of n equations,

    y_i = argmax_v p(v | x, y_1, ..., y_{i-1}),   i = 1..n,

which autoregressive decoding solves one at a time. Jacobi decoding starts from a guess y^(0) and updates
every position at once, from one forward pass over [x, y^(j)]:

    y_i^(j+1) = argmax_v p(v | x, y_1^(j), ..., y_{i-1}^(j)),   i = 1..n   (all i in parallel).

y_1^(j+1) is always exact (it depends on x only), and by induction y_1..y_k are exact once
y^(j)_1..y^(j)_{k-1} = y^(j+1)_1..y^(j+1)_{k-1}: the fixed point y^(j+1) = y^(j) is reached in at most n
iterations and *is* the greedy output. The paper iterates one block until all of it is fixed; this module
uses the sliding form, which computes the same iterates for a block's positions and so needs no more
passes: after each pass it commits the longest prefix that is already fixed,
    k = 1 + max{m : y_i^(j) = y_i^(j+1) for all i <= m},
(at least one token per pass), keeps the KV-cache entries of x and of the committed guesses, crops the
block's other (speculative) entries with `DynamicCache.crop`, and slides the block: the not yet committed
updates y^(j+1)_{k+1..n} become the next block's first guesses and its new tail starts as the pad token (an
uninformed guess). `jacobi_decode` below is the whole loop; the forward pass of a block is one
`model(...)` call with the KV cache of the committed prefix, so the per-pass Python work is a few list ops.

Why hand-written: transformers 5's `generate` offers assisted decoding and prompt lookup but no Jacobi
iteration; the CLLM and Santilli code bases patch older transformers releases.

Batch: each row is decoded on its own (left padding stripped with the attention mask), and the rows are
re-assembled as `model.generate` returns them (prompt as given, finished rows padded with the pad token).
`decode_rows`, `int_in_range` and `Counters` are shared with `lookahead`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from baselines.base import Applied, Method
from bench.config import ConfigError, check_range
from bench.registry import register_method
from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Subject, Task


def int_in_range(name: str, value: int, lo: int, hi: int) -> None:
    """`check_range` for an integer setting, with the whole valid range in the message."""
    try:
        check_range(name, value, lo=lo, hi=hi)
    except ConfigError as e:
        raise ConfigError(f"{e} (valid: integers {lo} <= {name} <= {hi})") from None


@dataclass
class Counters:
    """What a decoding procedure did, summed over every call since `apply` (the runner reads it after the
    evaluation, so the numbers describe the evaluation set)."""

    calls: int = 0
    forward_passes: int = 0
    tokens: int = 0  # tokens committed (generated), EOS included
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.extra[key] = self.extra.get(key, 0.0) + value

    def base(self) -> dict[str, float]:
        return {"mean_accepted_length": self.tokens / max(1, self.forward_passes),
                "forward_passes": float(self.forward_passes), "tokens": float(self.tokens),
                "calls": float(self.calls)}


def decode_rows(subject: "Subject", input_ids: "torch.Tensor", max_new_tokens: int,
                attention_mask: "torch.Tensor | None",
                decode_one: Callable[["torch.Tensor", int, int], list[int]]) -> "torch.Tensor":
    """Run `decode_one(prompt (1, L) without padding, max_new_tokens, eos_id) -> generated ids` on every row and
    assemble the output like `model.generate`: the input as given, then the generated tokens, rows that
    stopped early padded with the pad token."""
    import torch

    tok = subject.extra["tokenizer"]
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    with torch.no_grad():
        rows = []
        for r in range(input_ids.shape[0]):
            ids = input_ids[r] if attention_mask is None else input_ids[r][attention_mask[r].bool()]
            if ids.numel() == 0:
                raise ValueError("decode_rows: a row has no prompt tokens (its attention mask is all zeros)")
            rows.append(decode_one(ids.unsqueeze(0), max_new_tokens, eos) if max_new_tokens > 0 else [])
    width = max(len(g) for g in rows)
    out = torch.full((input_ids.shape[0], input_ids.shape[1] + width), pad, dtype=input_ids.dtype,
                     device=input_ids.device)
    out[:, :input_ids.shape[1]] = input_ids
    for r, g in enumerate(rows):
        out[r, input_ids.shape[1]:input_ids.shape[1] + len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    return out


def jacobi_decode(model, prompt: "torch.Tensor", max_new_tokens: int, eos: int, block_size: int,
                  init_token: int, counters: Counters,
                  on_pass: Callable[[int, list[int], int], None] | None = None) -> list[int]:
    """Greedy Jacobi decoding of one prompt (1, L); returns the generated ids (up to and including EOS).
    `on_pass(start, pred, k)`, when given, sees every pass: the tokens committed before it, its updates
    y^(j+1)_1..nb and the k it commits (`cllm` counts fast-forwarded and stationary tokens from them)."""
    import torch
    from transformers import DynamicCache

    n = block_size
    cache = DynamicCache(config=model.config)
    feed = prompt  # committed tokens whose keys and values are not in the cache yet (first: the prompt)
    guess = [init_token] * (n - 1)  # y^(j)_1..y^(j)_{n-1}: the inputs after x; y_n is only predicted
    out: list[int] = []
    counters.calls += 1
    while len(out) < max_new_tokens:
        nb = min(n, max_new_tokens - len(out))  # no guesses beyond the token budget
        block = torch.tensor([guess[:nb - 1]], dtype=feed.dtype, device=feed.device)
        logits = model(input_ids=torch.cat([feed, block], dim=1), **cache_kwargs(model, cache), use_cache=True,
                       logits_to_keep=nb).logits
        pred = logits[0].argmax(-1).tolist()  # y^(j+1)_1..y^(j+1)_nb
        k = 1
        while k < nb and guess[k - 1] == pred[k - 1]:  # y^(j)_{k+1} was already the fixed point
            k += 1
        cache.crop(-(nb - k))  # keep x and the k - 1 committed guesses; drop the block's other entries
        accepted = pred[:k]
        if on_pass is not None:
            on_pass(len(out), pred, k)
        counters.forward_passes += 1
        done = eos in accepted
        if done:
            accepted = accepted[:accepted.index(eos) + 1]
        out += accepted
        counters.tokens += len(accepted)
        if done:
            break
        feed = torch.tensor([[pred[k - 1]]], dtype=prompt.dtype, device=prompt.device)
        guess = pred[k:nb] + [init_token] * (n - 1 - (nb - k))  # y^(j+1)_{k+1..nb}, then the pad guess
    return out


@dataclass(frozen=True)
class JacobiConfig:
    # n: tokens decoded per forward pass (1 = plain greedy decoding). Santilli et al. use blocks of a few
    # tokens; 8 keeps a pass on a CPU-sized model about as cheap as a single-token step while leaving room
    # for runs of fixed tokens (formatting, copied numbers) to be committed together.
    block_size: int = 8

    def validate(self) -> None:
        int_in_range("block_size", self.block_size, 1, 128)


@register_method("jacobi", family="decoding", year=2023, url="https://arxiv.org/abs/2305.10427",
                 paper="Santilli et al., Accelerating Transformer Inference for Translation via Parallel Decoding",
                 modalities=("causal-lm",),
                 summary="greedy Jacobi fixed-point iteration over a block of n tokens; exact greedy output")
class Jacobi(Method):
    Config = JacobiConfig

    def apply(self, subject: "Subject", task: "Task", ctx: "RunContext") -> Applied:
        from tasks.base import Subject

        self.config.validate()
        tok = subject.extra["tokenizer"]
        init = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        counters = Counters()
        n = self.config.block_size

        def generate(subj: "Subject", input_ids, max_new_tokens: int, attention_mask=None):
            return decode_rows(subj, input_ids, max_new_tokens, attention_mask,
                               lambda ids, m, eos: jacobi_decode(subj.model, ids, m, eos, n, init, counters))

        new = Subject(subject.model, subject.kind, {**subject.extra, "generate": generate})
        return Applied(new, stats=counters.base)
