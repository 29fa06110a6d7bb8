"""Where a lossless decoding method's answers differ from the reference's: rounding, or an error of the method?

A decoding method that keeps the reference's weights (speculative decoding, Medusa, EAGLE, Jacobi, lookahead,
prompt lookup) and accepts greedily returns, in exact arithmetic, the reference's greedy answer token for token.
In floating point it need not: verifying k + 1 tokens in one forward pass sums in a different order than feeding
them one at a time, and where the reference's top two logits nearly tie the argmax can flip. In float32 this is
rare; in bfloat16 (8 significand bits) the issue's rehearsal found 98.2% of arith answers identical under
`speculative`. The record must tell such flips from a broken method, which would show the same fidelity.

For every answer whose tokens differ, at its first differing position t (prefix y_<t shared by both answers,
reference token a = y_t, method token b):

    z_seq = the reference's logits at t computed the way its own greedy decoding computed them: the context
            prefilled, then y_1 .. y_{t-1} fed one token at a time through the KV cache;
    z_par = the same logits from one forward pass over context + y_<t (a different batch shape: the summation
            orders a multi-token verification pass uses);
    gap   = z_seq[a] - z_seq[b]            (>= 0: a is the reference's argmax there)
    noise = |gap - (z_par[a] - z_par[b])|  (how much merely changing the batch shape moved that gap)

The flip is **numeric** (a near tie) when gap <= noise: recomputing the very same position in the same dtype
with a different batch shape moves the decision by at least as much as its margin, so rounding alone can
explain the other token. Otherwise it is **beyond rounding**: the margin exceeds anything the batching changed,
and the method, not the arithmetic, chose b; in float32 every such case deserves a bug report. An answer that
ends (EOS or the length limit) where the other continues has no token b to compare (`unexplained`).

This is a measurement of one alternative batch shape, not a bound: a verification pass over k + 1 tokens may
round differently again. It is cheap: two reference passes per differing answer (t incremental steps and one
parallel pass), at most `limit` answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

CRITERION = ("at each differing answer's first differing token, numeric iff the reference's margin between "
             "its token and the method's (its own token-by-token logits) is at most the change of that margin "
             "when the same position is recomputed in one parallel pass (same dtype)")


@dataclass(frozen=True)
class Flip:
    """One differing answer's first difference."""

    position: int  # t, in generated tokens
    gap: float | None  # z_seq[a] - z_seq[b]; None when one answer ended there
    noise: float | None  # |gap - (z_par[a] - z_par[b])|

    @property
    def kind(self) -> str:
        if self.gap is None or self.noise is None:
            return "unexplained"
        return "numeric" if self.gap <= self.noise else "beyond_rounding"


def first_difference(a: Sequence[int], b: Sequence[int], pad: int = -1) -> int | None:
    """The first position where two padded token rows differ, or None when they are equal."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def _logits_both_ways(model, context: list[int], prefix: list[int]) -> tuple["np.ndarray", "np.ndarray"]:
    """(z_seq, z_par): the next-token logits after context + prefix, token by token and in one pass."""
    import torch
    from transformers import DynamicCache

    from tasks._kit.lm import cache_kwargs

    device = next(model.parameters()).device
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([context], device=device), **cache_kwargs(model, cache), use_cache=True,
                    logits_to_keep=1)
        for tok in prefix:  # what generate() did: one token per pass through the KV cache
            out = model(input_ids=torch.tensor([[tok]], device=device), **cache_kwargs(model, cache),
                        use_cache=True, logits_to_keep=1)
        seq = out.logits[0, -1].float().cpu().numpy()
        par = model(input_ids=torch.tensor([context + prefix], device=device), logits_to_keep=1).logits
    return seq, par[0, -1].float().cpu().numpy()


def analyse(model, contexts: Sequence[Sequence[int]], reference: "np.ndarray", method: "np.ndarray",
            limit: int = 64) -> dict:
    """The divergence summary of a lossless method's token answers against the reference's (rows padded with
    -1), re-running the reference `model` on at most `limit` differing answers (the first ones, in order)."""
    import numpy as np

    reference, method = np.asarray(reference), np.asarray(method)
    differing = [i for i in range(len(reference)) if not np.array_equal(reference[i], method[i])]
    flips: list[Flip] = []
    for i in differing[:limit]:
        ref = [int(x) for x in reference[i] if x >= 0]
        met = [int(x) for x in method[i] if x >= 0]
        t = first_difference(ref, met)
        if t is None or t >= len(ref) or t >= len(met):
            flips.append(Flip(t or 0, None, None))
            continue
        seq, par = _logits_both_ways(model, list(contexts[i]), ref[:t])
        a, b = ref[t], met[t]
        gap = float(seq[a] - seq[b])
        flips.append(Flip(t, gap, abs(gap - float(par[a] - par[b]))))
    kinds = [f.kind for f in flips]
    return {"differing": len(differing), "analysed": len(flips), "numeric": kinds.count("numeric"),
            "beyond_rounding": kinds.count("beyond_rounding"), "unexplained": kinds.count("unexplained"),
            "criterion": CRITERION}
