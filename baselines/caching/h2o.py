"""`h2o`: Heavy-Hitter Oracle KV-cache eviction (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048).

Eviction rule. Every layer and every KV head h keeps a set S of at most B = H + R tokens: the R most recent and
H "heavy hitters", the tokens with the largest attention accumulated over all queries so far. With a_{i,j} the
attention probability of query i on key j (summed over the query heads that share KV head h),

    F_t(j) = sum_{i <= t, j in S_i} a_{i,j}                                   (accumulated score, paper eq. 2-3)
    S_{t+1} = {t-R+1, ..., t}  U  argtop_H { F_t(j) : j in S_t U {t}, j <= t-R }   (paper, algorithm 1)

so when the cache would exceed B, the tokens outside the recent window with the smallest accumulated score are
evicted: one per generated token once the cache is full (`HeavyHitterLayer.observe`). Scores are the
attention over the *kept* tokens only (an evicted token's share goes to the others through the softmax), and a
token's score survives as long as it does, as in the authors' `H2OKVCache_LayerWise`. Each KV head keeps its
own set, as in the authors' code (the score tensor is per head), so the cache stays one rectangular tensor.

Positions: every token keeps its position in the text (keys are cached already rotated, so a head's kept set
needs no re-rotation); the paper's method predates StreamingLLM's position re-assignment.

Attention probabilities: the fused kernels (SDPA, flash) do not return them, so during this method's decoding
the model runs with eager attention (`model.set_attn_implementation("eager")`, restored after every sequence)
and a forward hook on each attention module reads the probabilities right after that layer's attention and
evicts there; the weights die with the step, and nothing is left on the model between calls (the reference,
which shares the model, is timed with its own attention). That eager attention is part of this method's cost.

Prefill. The prompt is processed in one forward with full attention, its column sums seed F, and the cache is
cut to B, as in the authors' code (a prompt longer than B sees all of itself once).

Why hand-written: transformers has no H2O cache; `kvpress` 0.5 has no H2O press (its `ObservedAttentionPress`
scores the prefill's attention only, and its `DecodingPress` re-scores from buffered hidden states, not scores
accumulated over every query), its hooks read the attention kwarg `cache_position` that transformers 5.23 no
longer passes (KeyError here), and it pins datasets<3, pandas<3 and protobuf<6 against this project's versions.
So the policy is a cache layer on transformers' `Cache` API (`DynamicLayer` subclass), driven by
`_kv.greedy_decode`.
"""

from __future__ import annotations

from contextlib import contextmanager
import functools
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from baselines.caching._kv import check_in
from bench.config import ConfigError, check_range
from bench.registry import register_method
from tasks._kit.lm import passed_cache

METHOD = "h2o"


@dataclass(frozen=True)
class H2OConfig:
    # tokens every layer and head keeps, heavy hitters + recent. 64 is below arith's sequences (prompt + answer
    # 47-137 tokens, mean 95), so most answers run with evictions; the paper keeps 20% of the sequence
    cache_budget: int = 64
    # share of the budget given to heavy hitters, the rest to the recent window; the paper splits its budget
    # evenly between the two (10% + 10% of the sequence)
    heavy_ratio: float = 0.5

    @property
    def heavy(self) -> int:
        return int(round(self.heavy_ratio * self.cache_budget))

    @property
    def recent(self) -> int:
        return self.cache_budget - self.heavy

    def validate(self) -> None:
        check_range("cache_budget", self.cache_budget, lo=2)
        check_in("heavy_ratio", self.heavy_ratio, 0.0, 1.0)
        if self.recent < 1:
            raise ConfigError(f"heavy_ratio={self.heavy_ratio} gives {self.heavy} heavy hitters out of cache_budget="
                              f"{self.cache_budget}, leaving no recent window; valid range: 0 <= heavy_ratio < "
                              f"{(self.cache_budget - 0.5) / self.cache_budget:.4f} (at least one recent token)")

@functools.cache  # one class, made on first use (transformers is imported inside)
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class HeavyHitterLayer(DynamicLayer):
        """One layer's cache under H2O: per KV head, the `recent` newest tokens and the `heavy` others with the
        largest accumulated attention (`scores`, float32, shape (heads, tokens))."""

        is_croppable = False  # evicted tokens cannot be restored

        def __init__(self, heavy: int, recent: int):
            super().__init__()
            self.heavy, self.recent = heavy, recent
            self.scores = None
            self.evicted = 0

        def observe(self, weights) -> None:
            """Add one forward's attention probabilities (batch 1, query heads, q, kv) to the scores, then evict
            down to the budget: the recent window plus the top-`heavy` scores among the older tokens."""
            import torch

            kv_heads, n, dim = self.keys.shape[1], self.keys.shape[2], self.keys.shape[3]
            if weights.shape[0] != 1 or weights.shape[-1] != n:
                raise RuntimeError(f"{METHOD}: attention weights of shape {tuple(weights.shape)} do not match a "
                                   f"batch-1 cache of {n} tokens")
            w = weights[0].float()
            w = w.reshape(kv_heads, w.shape[0] // kv_heads, w.shape[1], n).sum(dim=(1, 2))  # (kv heads, n)
            old = self.scores if self.scores is not None else w.new_zeros(kv_heads, 0)
            scores = torch.cat([old, old.new_zeros(kv_heads, n - old.shape[1])], dim=1) + w
            budget = self.heavy + self.recent
            if n <= budget:
                self.scores = scores
                return
            older = n - self.recent  # candidates for heavy hitters: everything outside the recent window
            heavy = scores[:, :older].topk(self.heavy, dim=1).indices.sort(dim=1).values
            recent = torch.arange(older, n, device=heavy.device).expand(kv_heads, self.recent)
            keep = torch.cat([heavy, recent], dim=1)  # (kv heads, budget), in text order
            idx = keep[None, :, :, None].expand(1, kv_heads, budget, dim)
            self.keys, self.values = self.keys.gather(2, idx), self.values.gather(2, idx)
            self.scores = scores.gather(1, keep)
            self.evicted += n - budget

    return HeavyHitterLayer


def make_cache(model, heavy: int, recent: int):
    """A transformers `Cache` of `HeavyHitterLayer`s for `model` (also used directly by the tests). It only
    evicts while `scoring(model)` is active."""
    from baselines.caching._kv import bounded_cache, num_layers

    layer = _layer_class()
    return bounded_cache([layer(heavy, recent) for _ in range(num_layers(model))])


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer (they carry `layer_idx`)."""
    from baselines.caching._kv import num_layers

    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if len(mods) != num_layers(model):
        raise ValueError(f"{METHOD}: found {len(mods)} attention modules with a layer index in "
                         f"{type(model).__name__}, expected one per decoder layer ({num_layers(model)})")
    return mods


@contextmanager
def scoring(model):
    """While active: eager attention (which returns the probabilities) and a hook on every attention module that
    hands them to its `HeavyHitterLayer`. Both are undone on exit."""
    previous = model.config._attn_implementation
    handles = []

    def hook(module, args, kwargs, output):
        cache = passed_cache(kwargs)
        layer = cache.layers[module.layer_idx] if cache is not None else None
        if hasattr(layer, "observe"):
            if output[1] is None:
                raise RuntimeError(f"{METHOD}: the attention of layer {module.layer_idx} returned no weights")
            layer.observe(output[1])
        return output

    try:
        model.set_attn_implementation("eager")
        for m in attention_modules(model):
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)


@register_method(METHOD, family="caching", paper="Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative "
                 "Inference of Large Language Models", year=2023, url="https://arxiv.org/abs/2306.14048",
                 modalities=("causal-lm",),
                 summary="KV cache of the recent tokens plus the heavy hitters (largest accumulated attention); "
                         "the lowest-scoring other token is evicted")
class H2O(Method):
    Config = H2OConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._kv import KVCounts, cached_generate
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        attention_modules(subject.model)  # fail now, with the reason, rather than at the first sequence
        counts = KVCounts()
        generate = cached_generate(lambda m: make_cache(m, cfg.heavy, cfg.recent), "original", counts, METHOD,
                                   around=scoring)
        extra = {**subject.extra, "generate": generate}
        return Applied(Subject(subject.model, subject.kind, extra),
                       Cost(description="none: a decoding-time cache policy, no training or calibration"),
                       stats=counts.as_dict)
