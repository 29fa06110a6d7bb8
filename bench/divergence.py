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
    z_s   = the same logits computed in another batch shape s, from the shapes a multi-token verifier uses:
            s = 0: one forward pass over context + y_<t;
            s = j (1 <= j <= min(BLOCKS, t)): context + y_<{t-j} prefilled in one pass, then the block
            y_{t-j} .. y_{t-1} in one pass through that KV cache (a verification pass of j tokens ending at t);
    gap   = z_seq[a] - z_seq[b]                   (>= 0: a is the reference's argmax there)
    noise = max_s |gap - (z_s[a] - z_s[b])|       (how much merely changing the batch shape moved that gap)

The flip is **numeric** (a near tie) when gap <= noise: recomputing the very same position in the same dtype
with another batch shape moves the decision by at least as much as its margin, so rounding alone can explain
the other token. Otherwise it is **beyond rounding**: the margin exceeds anything these batch shapes changed,
and the method, not the arithmetic, chose b; in float32 every such case deserves a bug report. An answer that
ends (EOS or the length limit) where the other continues has no token b to compare (`unexplained`).

This is a measurement over a family of batch shapes, not a bound: the method's own pass (a tree, a cache filled
by earlier blocks of other sizes) may round differently again, so in bfloat16 a flip whose margin is a small
multiple of the measured noise can still be rounding (`Flip.gap`, `Flip.noise` are kept for a reader). Cost per
differing answer: t incremental reference steps and 2 min(BLOCKS, t) + 1 passes, at most `limit` answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

BLOCKS = 8  # verification blocks of 1..BLOCKS tokens ending at the position are tried (speculative: k + 1 = 5)
CRITERION = ("at each differing answer's first differing token, numeric iff the reference's margin between "
             "its token and the method's (its own token-by-token logits) is at most the largest change of that "
             f"margin when the same position is recomputed in one parallel pass or as the last of a block of "
             f"1-{BLOCKS} tokens after a prefilled cache (same dtype)")


@dataclass(frozen=True)
class Flip:
    """One differing answer's first difference."""

    position: int  # t, in generated tokens
    gap: float | None  # z_seq[a] - z_seq[b]; None when one answer ended there
    noise: float | None  # max over the other batch shapes s of |gap - (z_s[a] - z_s[b])|

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


def _logits_in_shapes(model, context: list[int], prefix: list[int]) -> tuple["np.ndarray", list["np.ndarray"]]:
    """(z_seq, [z_s ...]): the next-token logits after context + prefix, token by token as greedy decoding
    computes them, and in each other batch shape of the module docstring."""
    import torch
    from transformers import DynamicCache

    from tasks._kit.lm import cache_kwargs

    device = next(model.parameters()).device
    ids = lambda xs: torch.tensor([xs], device=device)  # noqa: E731
    last = lambda out: out.logits[0, -1].float().cpu().numpy()  # noqa: E731

    def through_cache(*chunks: list[int]):
        cache = DynamicCache(config=model.config)
        for chunk in chunks:
            out = model(input_ids=ids(chunk), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        return last(out)

    with torch.inference_mode():
        seq = through_cache(context, *[[tok] for tok in prefix])  # what generate() did: one token per pass
        others = [last(model(input_ids=ids(context + prefix), logits_to_keep=1))]
        t = len(prefix)
        for j in range(1, min(BLOCKS, t) + 1):
            others.append(through_cache(context + prefix[:t - j], prefix[t - j:]))
    return seq, others


def analyse(model, contexts: Sequence[Sequence[int]], reference: "np.ndarray", method: "np.ndarray",
            limit: int = 64, details: bool = False) -> dict:
    """The divergence summary of a lossless method's token answers against the reference's (rows padded with
    -1), re-running the reference `model` on at most `limit` differing answers (the first ones, in order); with
    `details`, also each analysed flip (answer index, position, gap, noise, kind) under "flips"."""
    import numpy as np

    reference, method = np.asarray(reference), np.asarray(method)
    differing = [i for i in range(len(reference)) if not np.array_equal(reference[i], method[i])]
    flips: list[Flip] = []
    analysed = differing[:limit]
    for i in analysed:
        ref = [int(x) for x in reference[i] if x >= 0]
        met = [int(x) for x in method[i] if x >= 0]
        t = first_difference(ref, met)
        if t is None or t >= len(ref) or t >= len(met):
            flips.append(Flip(t or 0, None, None))
            continue
        seq, others = _logits_in_shapes(model, list(contexts[i]), ref[:t])
        a, b = ref[t], met[t]
        gap = float(seq[a] - seq[b])
        flips.append(Flip(t, gap, max(abs(gap - float(z[a] - z[b])) for z in others)))
    kinds = [f.kind for f in flips]
    summary = {"differing": len(differing), "analysed": len(flips), "numeric": kinds.count("numeric"),
               "beyond_rounding": kinds.count("beyond_rounding"), "unexplained": kinds.count("unexplained"),
               "criterion": CRITERION}
    if details:
        summary["flips"] = [{"answer": i, "position": f.position, "gap": f.gap, "noise": f.noise, "kind": f.kind}
                            for i, f in zip(analysed, flips)]
    return summary
