"""`lookahead`: lookahead decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding", ICML 2024, arXiv:2402.02057), greedy.

Each forward pass has two branches beside the last committed token c (at position p), separated by a custom
attention mask (a 4D additive mask with explicit position_ids, built by `_branches`):

Lookahead branch: a 2D window of N - 1 levels of W tokens (window size W, n-gram size N). The token at level
l and column i, t_{l,i}, sits at position p + i + l and sees the prefix, the level-0 tokens of columns 1..i
and the tokens of its own column at levels 1..l: the chain c, t_{0,1..i}, t_{1,i}, ..., t_{l,i} is a
contiguous guessed continuation (t_{0,0} = c). One Jacobi step on the last level gives, for every column,

    o_i = argmax_v p(v | x_{<=p}, t_{0,1..i}, t_{1,i}, ..., t_{N-2,i}),   i = 0..W-1,

and the n-gram (t_{0,i}, t_{1,i}, ..., t_{N-2,i}, o_i) goes into the pool under its first token t_{0,i}
(each key keeps its G most recent n-grams). The window then moves one level up (the paper's trajectory:
level 0 <- level 1 shifted by one column, level l <- level l + 1, level N - 2 <- o), whatever was accepted.

Verification branch: the pool's n-grams that start with c, at most G of them, each without its first token
(g_1..g_{N-1} at positions p + 1..p + N - 1, each candidate seeing only itself). With y_0 the prediction
at c and y_j the prediction at g_j, a candidate's first m tokens are verified when g_j = y_{j-1} for
j = 1..m; the longest verified candidate is accepted with the model's next prediction, y_0..y_m (1 to N
tokens per pass; m = 0 is plain greedy decoding). Greedy output is reproduced exactly: every accepted token
is the argmax given the exact committed prefix. The cache keeps c and the accepted candidate's keys and
values (moved next to c) and the rest is cropped with `DynamicCache.crop`.

Deviations from the authors' code, stated plainly: all levels start as tokens drawn from the prompt (the
authors fill levels one pass at a time in a warm-up); here the first N - 2 passes push model outputs up
the window while the tensor shapes stay fixed, and n-grams are collected from pass N - 1 on, as in theirs.
The prompt is prefilled in the same pass as the first lookahead step. The pool lives for one call.

Why hand-written: transformers 5's `generate` has prompt lookup and assisted decoding but no lookahead
decoding, and the authors' `lade` package (0.0.2) patches transformers 4's `greedy_search`, which
transformers 5 removed. Llama-style models with the `sdpa` or `eager` attention take the 4D mask as is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from baselines.base import Applied, Method
from baselines.decoding.jacobi import Counters, decode_rows, int_in_range
from bench.config import ConfigError
from bench.registry import register_method
from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Subject, Task


@lru_cache(maxsize=256)
def _branches(w: int, n: int, g: int) -> tuple[tuple[int, ...], "torch.Tensor"]:
    """Layout of the tokens after c: level 0 (columns 1..W-1), levels 1..N-2 (W each), then g candidates of
    N - 1 tokens. Returns their positions relative to c and who-sees-whom (bool, rows attend to columns)."""
    import torch

    rel: list[int] = []
    sees: list[list[int]] = []
    level0 = {}
    for i in range(1, w):
        level0[i] = len(rel)
        rel.append(i)
        sees.append([level0[j] for j in range(1, i + 1)])
    column: dict[int, list[int]] = {i: [] for i in range(w)}
    for lvl in range(1, n - 1):
        for i in range(w):
            column[i].append(len(rel))
            rel.append(i + lvl)
            sees.append([level0[j] for j in range(1, i + 1)] + list(column[i]))
    for _ in range(g):
        first = len(rel)
        for j in range(n - 1):
            rel.append(1 + j)
            sees.append(list(range(first, first + j + 1)))
    allow = torch.zeros(len(rel), len(rel), dtype=torch.bool)
    for row, cols in enumerate(sees):
        allow[row, cols] = True
    return tuple(rel), allow


def _mask(cached: int, feed: int, allow: "torch.Tensor", dtype, device) -> "torch.Tensor":
    """Additive (1, 1, Q, cached + Q) mask: the cache and the fed tokens are seen causally by everything, the
    branch tokens see each other as `allow` says."""
    import torch

    b = allow.shape[0]
    q = feed + b
    ok = torch.ones(q, cached + q, dtype=torch.bool)
    ok[:feed, cached:] = torch.ones(feed, q, dtype=torch.bool).tril()
    ok[feed:, cached + feed:] = allow
    m = torch.zeros(q, cached + q, dtype=dtype)
    m.masked_fill_(~ok, torch.finfo(dtype).min)
    return m.to(device)[None, None]


def lookahead_decode(model, prompt: "torch.Tensor", max_new_tokens: int, eos: int, w: int, n: int, g_max: int,
                     seed: int, counters: Counters) -> list[int]:
    """Greedy lookahead decoding of one prompt (1, L); returns the generated ids (up to and including EOS)."""
    import torch
    from transformers import DynamicCache

    dev = prompt.device
    cache = DynamicCache(config=model.config)
    history = prompt[0].tolist()
    rng = random.Random(seed)  # per call, so a prompt's run never depends on the calls before it
    level0 = [rng.choice(history) for _ in range(w - 1)]  # columns 1..W-1 (column 0 is c)
    levels = [[rng.choice(history) for _ in range(w)] for _ in range(n - 2)]  # levels 1..N-2
    pool: dict[int, list[tuple[int, ...]]] = {}
    feed = history  # committed tokens not in the cache yet; the last one is c
    cached = 0
    out: list[int] = []
    passes = 0
    counters.calls += 1
    while len(out) < max_new_tokens:
        c = feed[-1]
        cands = list(pool.get(c, ()))  # a copy: the pool update below may change the bucket
        rel, allow = _branches(w, n, len(cands))
        f = len(feed)
        tokens = feed + level0 + [t for lv in levels for t in lv] + [t for cand in cands for t in cand]
        pos = list(range(cached, cached + f)) + [cached + f - 1 + r for r in rel]
        last_level = f + len(level0) + (n - 3) * w  # input index of level N-2's first token
        keep = torch.tensor([f - 1] + list(range(last_level, len(tokens))), device=dev)
        logits = model(input_ids=torch.tensor([tokens], device=dev), position_ids=torch.tensor([pos], device=dev),
                       attention_mask=_mask(cached, f, allow, model.dtype, dev), **cache_kwargs(model, cache),
                       use_cache=True, logits_to_keep=keep).logits
        pred = logits[0].argmax(-1).tolist()
        passes += 1
        first, new, checked = pred[0], pred[1:1 + w], pred[1 + w:]
        best, hit = 0, 0  # the longest verified candidate and its verified length m
        for k, cand in enumerate(cands):
            y = [first] + checked[k * (n - 1):(k + 1) * (n - 1)]
            m = 0
            while m < n - 1 and cand[m] == y[m]:
                m += 1
            if m > hit:
                best, hit, accepted = k, m, y[:m + 1]
        if hit == 0:
            accepted = [first]
        # the cache: the fed tokens, then the accepted candidate's first `hit` entries moved next to them
        start = cached + f
        if hit:
            src = start + len(rel) - len(cands) * (n - 1) + best * (n - 1)
            for layer in cache.layers:
                layer.keys[:, :, start:start + hit] = layer.keys[:, :, src:src + hit].clone()
                layer.values[:, :, start:start + hit] = layer.values[:, :, src:src + hit].clone()
        cache.crop(-(len(rel) - hit))
        cached = start + hit
        if passes >= n - 1:  # the window holds model outputs from here on (see the module docstring)
            keys = [c] + level0
            for i in range(w):
                gram = tuple(lv[i] for lv in levels) + (new[i],)
                bucket = pool.setdefault(keys[i], [])
                if gram in bucket:
                    bucket.remove(gram)
                elif len(bucket) >= g_max:
                    bucket.pop(0)
                bucket.append(gram)
        level0, levels = levels[0][1:], levels[1:] + [new]
        counters.forward_passes += 1
        counters.add("candidate_passes", 1.0 if cands else 0.0)
        counters.add("candidates", len(cands))
        counters.add("candidate_tokens_accepted", hit)
        accepted = accepted[:max_new_tokens - len(out)]
        done = eos in accepted
        if done:
            accepted = accepted[:accepted.index(eos) + 1]
        out += accepted
        counters.tokens += len(accepted)
        if done:
            break
        feed = [accepted[-1]]
    counters.add("pool_size", sum(len(b) for b in pool.values()))
    return out


@dataclass(frozen=True)
class LookaheadConfig:
    # The paper's setting for 7B models on an A100 is (W, N, G) = (15, 5, 15), with G = W recommended. A CPU
    # pass costs more per extra token than a GPU pass, so the defaults here are smaller: one pass holds
    # 1 + (W - 1) + (N - 2) W + G (N - 1) = 37 tokens at most.
    window: int = 7  # W: lookahead window (columns of the 2D Jacobi window)
    ngram: int = 4  # N: n-gram size (levels + 1); at most N tokens are accepted per pass
    guesses: int = 7  # G: at most this many candidate n-grams verified per pass (and kept per first token)
    seed: int = 0  # the random prompt tokens the window starts from (output does not depend on it)

    def validate(self) -> None:
        int_in_range("window", self.window, 1, 64)
        int_in_range("ngram", self.ngram, 3, 16)
        int_in_range("guesses", self.guesses, 1, 64)
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")


@register_method("lookahead", family="decoding", year=2024, url="https://arxiv.org/abs/2402.02057",
                 paper="Fu et al., Break the Sequential Dependency of LLM Inference Using Lookahead Decoding",
                 modalities=("causal-lm",),
                 summary="Jacobi lookahead branch fills an n-gram pool; verification branch checks it in the same "
                         "pass; exact greedy output")
class Lookahead(Method):
    Config = LookaheadConfig

    def apply(self, subject: "Subject", task: "Task", ctx: "RunContext") -> Applied:
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        impl = getattr(subject.model.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise ValueError(f"lookahead needs an attention implementation that takes a 4D additive mask "
                             f"('sdpa' or 'eager'); the model uses {impl!r}")
        counters = Counters()

        def generate(subj: "Subject", input_ids, max_new_tokens: int, attention_mask=None):
            return decode_rows(subj, input_ids, max_new_tokens, attention_mask,
                               lambda ids, m, eos: lookahead_decode(subj.model, ids, m, eos, cfg.window,
                                                                    cfg.ngram, cfg.guesses, cfg.seed, counters))

        def stats() -> dict[str, float]:
            e = counters.extra
            passes_with = e.get("candidate_passes", 0.0)
            return {**counters.base(),
                    # accepted candidate tokens / the N - 1 tokens of the best candidate, over passes that
                    # verified at least one candidate
                    "acceptance_rate": e.get("candidate_tokens_accepted", 0.0) / max(1.0, passes_with * (cfg.ngram - 1)),
                    "candidates_per_pass": e.get("candidates", 0.0) / max(1, counters.forward_passes),
                    "passes_with_candidates": passes_with,
                    "pool_size": e.get("pool_size", 0.0) / max(1, counters.calls)}  # n-grams at the end of a call

        new = Subject(subject.model, subject.kind, {**subject.extra, "generate": generate})
        return Applied(new, stats=stats)
