"""`fast-dllm`: block-wise approximate KV cache and confidence-aware parallel decoding for diffusion LMs (Wu et al.,
2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding",
arXiv:2505.22618).

Two independent savings on the semi-autoregressive sampler (`tasks._kit.dllm`: blocks of length b decoded left to
right, each over several steps).

1. Approximate KV cache (the paper's section 3.2). Within one block's steps, the tokens outside the block change
   not at all (the prefix is decoded, the suffix is all [MASK]), and their keys and values change little, because
   they only see the block through attention. So at a block's first step one full pass computes every layer's
   K, V for all positions and stores them; at the block's later steps only the block's positions are run through
   the layers, their queries attending to

       prefix cache:  [K_cache[:lo] ; K_fresh[lo:]]         recomputes the block *and* the suffix (positions lo..L)
       dual cache:    [K_cache[:lo] ; K_fresh[lo:hi] ; K_cache[hi:]]   recomputes the block only (`cache=dual`)

   (and the same for V); `_dllm` has the layer's equations. The cache is refreshed by the next block's full pass,
   which also brings in the tokens just decoded. The paper shows the cached and the fresh K/V of the prefix
   have cosine similarity close to 1 within a block (its Figure 3), so the approximation costs little.

2. Confidence-aware parallel decoding (section 3.3, Theorem 1): at each step unmask every masked position of the
   block whose confidence c_j = max_v p_theta(v | x) exceeds a threshold tau (at least the most confident one),
   instead of a fixed k per step. The paper's argument: when each of the n positions unmasked together has
   marginal confidence above 1 - epsilon and (n + 1) epsilon <= 1, the argmax of the product of marginals is
   the argmax of the joint, so greedy parallel decoding picks what sequential greedy decoding would; tau = 0.9
   is its default. This is `Sampling.threshold` of the task's own sampler. A block
   then ends as soon as it has no masked position, so the sampler is given one step per position
   (steps = gen_length) and stops early: the network calls made are the statistics' `steps_per_sequence`.

Logits are computed for the current block only (the sampler reads nothing else). With the model's logit shift
(Dream: position i - 1 predicts token i), the recomputed rows start one position earlier, at the last position
before the block, whose query attends to the cache like the block's (our choice: the paper describes the
unshifted LLaDA case, and that row is the one that predicts the block's first token). With `cache=none` and
threshold 1 (no confidence clears 1: one token per step) this is the reference sampler exactly.

Left out: the paper's factor-based parallel rule (a variant of the threshold rule in its appendix) and its
batching/bf16 serving optimisations; the suffix in prefix mode is recomputed at every step, as in the authors'
prefix-cache code.

Control: confidence-aware parallel decoding alone (the same threshold, no cache), which separates what the cache
costs in quality from what the parallel unmasking costs; the fewer-steps baseline is `dllm-steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.config import ConfigError
from bench.registry import register_method

METHOD = "fast-dllm"
CACHES = ("dual", "prefix", "none")


@dataclass(frozen=True)
class FastDLLMConfig:
    # "dual": prefix and suffix K/V cached (the paper's fastest setting); "prefix": only the prefix cached, the
    # block and suffix recomputed; "none": no cache (parallel decoding alone)
    cache: str = "dual"
    # tau of confidence-aware parallel decoding: 0.9 is the paper's default; None: the reference's fixed number of
    # tokens per step (cache alone)
    threshold: float | None = 0.9
    control: bool = True  # evaluate the parallel-decoding-alone control (one more evaluation of the task)

    def validate(self) -> None:
        if self.cache not in CACHES:
            raise ConfigError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold={self.threshold} must be in (0, 1] (1: one token per step), or None")


class BlockCachedForward:
    """The sampler's `forward` under Fast-dLLM's block-wise cache (or none, counting only)."""

    def __init__(self, cache: str, on_call=None):
        from baselines.caching._dllm import Caches, Counts

        self.cache, self.on_call = cache, on_call
        self.caches, self.counts = Caches(), Counts()
        self.layers = 0

    def __call__(self, model, x, attention_mask, step: dict):
        from baselines.caching import _dllm
        from tasks._kit import dllm

        decoder, _ = _dllm.llama_parts(model)
        self.layers = layers = len(decoder.layers)
        b, n = x.shape
        lo, hi = step["lo"], step["hi"]
        if step["block"] == 0 and step["index"] == 0:
            self.counts.sequences += 1
        if self.cache == "none":
            self.counts.add(n * layers, n * layers, full=True)
            return dllm.default_forward(model, x, attention_mask, step)
        if step["index"] == 0:  # the block's first step: a full pass refreshes every layer's K/V
            out = _dllm.full_pass(model, x, attention_mask, self.caches, step["block"], rows=_dllm.logit_rows(step))
            self.counts.add(n * layers, n * layers, full=True)
        else:  # the block (from one position earlier with the logit shift: its row predicts the block's first)
            start, end = _dllm.logit_rows(step)[0], hi if self.cache == "dual" else n
            out = self.block_pass(model, x, attention_mask, start, end)[:, :hi - lo]
            self.counts.add((end - start) * layers, n * layers, full=False)
        if self.on_call is not None:
            self.on_call(self.caches, step)
        return _dllm.padded_logits(out, n, lo)

    def block_pass(self, model, x, attention_mask, lo: int, end: int):
        """Positions lo..end through every layer, attending to the cached K/V of the others (the keys keep their
        positions' order, so the task's key mask applies unchanged)."""
        import torch

        from baselines.caching import _dllm

        decoder, _ = _dllm.llama_parts(model)
        frame = _dllm.Frame.of(model, x, attention_mask)
        h = decoder.embed_tokens(x[:, lo:end])
        cos, sin = frame.cos[:, lo:end], frame.sin[:, lo:end]
        for layer, c in zip(decoder.layers, self.caches.layers):
            q, k, v = _dllm.project(layer, h, cos, sin)
            keys = torch.cat([c.k[:, :, :lo], k, c.k[:, :, end:]], dim=2)
            values = torch.cat([c.v[:, :, :lo], v, c.v[:, :, end:]], dim=2)
            h1 = h + _dllm.attend(layer, q, keys, values, frame.keys)
            h = h1 + _dllm.ffn(layer, h1)
        return _dllm.head(model, h)

    def stats(self) -> dict[str, float]:
        return self.counts.as_dict(self.layers)


def fast_subject(subject, cache: str, threshold: float | None, on_call=None):
    """(subject sampled with Fast-dLLM's cache and threshold, its forward): with a threshold the sampler gets one
    step per position, so every block runs until it has no masked position."""
    import dataclasses

    sampling = subject.extra["sampling"]
    if threshold is not None:
        sampling = dataclasses.replace(sampling, threshold=threshold, steps=sampling.gen_length)
    sampling.validate()
    forward = BlockCachedForward(cache, on_call)
    extra = {**subject.extra, "sampling": sampling, "forward": forward}
    return dataclasses.replace(subject, extra=extra), forward


@register_method(METHOD, family="caching", paper="Wu et al., Fast-dLLM: Training-free Acceleration of Diffusion LLM "
                 "by Enabling KV Cache and Parallel Decoding", year=2025, url="https://arxiv.org/abs/2505.22618",
                 modalities=("diffusion-lm",),
                 summary="block-wise approximate KV cache (prefix, or prefix and suffix) refreshed at every block's "
                         "first step, plus unmasking every position whose confidence exceeds a threshold")
class FastDLLM(Method):
    Config = FastDLLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._dllm import llama_parts
        from baselines.decoding.dllm_steps import StepCounter

        cfg = self.config
        cfg.validate()
        llama_parts(subject.model)
        new, forward = fast_subject(subject, cfg.cache, cfg.threshold)
        counter = StepCounter(subject.extra.get("observe"))
        new.extra["observe"] = counter
        controls = []
        if cfg.control and cfg.cache != "none" and cfg.threshold is not None:
            alone, _ = fast_subject(subject, "none", cfg.threshold)
            ev = task.evaluate(alone, ctx)
            controls.append(ControlResult("parallel_decoding_without_cache", f"the reference sampler with the same "
                                          f"confidence threshold {cfg.threshold}, no KV cache", ev.value,
                                          ev.per_example, 0.0))

        def stats() -> dict[str, float]:
            return {**forward.stats(), "tokens_unmasked_per_step": counter.as_dict()["tokens_unmasked_per_step"]}

        return Applied(new, Cost(description="training-free; a sampling-time KV cache and decoding rule"), controls,
                       stats=stats)
