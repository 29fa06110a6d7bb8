"""`streamingllm`: attention sinks plus a rolling window of recent tokens (Xiao et al., 2024, "Efficient Streaming
Language Models with Attention Sinks", ICLR 2024, arXiv:2309.17453).

Eviction rule. With S sink tokens, a window of W recent tokens and budget B = S + W, after the model has
processed tokens 0 .. t-1 every layer's cache holds

    C_t = {0, ..., S-1}  U  {t-W, ..., t-1}          (all tokens while t <= B)                 (paper, fig. 1d, 4)

and each new token attends to C_t and itself; the middle tokens S .. t-W-1 are evicted, oldest first
(`SinkWindowLayer.update`). S = 0 is the paper's "window attention" baseline, which it shows collapsing.

Positions. The paper assigns positions *within the cache*, not in the text (sec. 3.2): "if the current cache
has tokens [0, 1, 2, 3, 6, 7, 8] and is decoding the 9th token, the positions assigned are [0, ..., 7]". For
RoPE this means the key at cache index c is rotated by c, whatever its place in the text:

    k_c = R(c) W_k x_{j(c)}  =  R(c - p_j) (R(p_j) W_k x_j),     query at cache index |C_t|      (`positions="cache"`)

The model caches keys already rotated by the position p_j they were computed at; this module keeps p_j beside
each key and, for the attention of every step, rotates the stored key once more by the difference c - p_j
(`rerotate`, with the model's own `apply_rotary_pos_emb` and rotary module, the RoPE scaling factor divided
out). Every key is rotated from its stored value, never from an already re-rotated copy, so rounding does not
accumulate over steps (a bf16 concern: transformers' removed `SinkCache` re-rotated the stored keys in place
at every eviction); keys that never moved (all of them before the first eviction) are used exactly as computed,
so with B >= the sequence length the output is the reference's token for token. `positions="original"` keeps
the text positions instead (no re-rotation; a model without RoPE can only run this way).

Prefill. A prompt is processed in one forward, as in the authors' code (`evict_for_space` makes room, then
the prompt runs with full attention); the cache is then cut to S + W, so a prompt longer than B sees all of
itself once and only the budget afterwards.

Why hand-written: transformers 5 removed `SinkCache`; `kvpress` 0.5 (NVIDIA) has a `StreamingLLMPress`, but
its hooks read the attention kwarg `cache_position`, which transformers 5.23's Llama no longer passes (KeyError
on the first forward here), it pins datasets<3, pandas<3 and protobuf<6 against this project's datasets 5,
pandas 3 and protobuf 7, and it compresses the prefill (decoding-time eviction needs its `DecodingPress`
wrapper) without re-assigning positions unless wrapped again in `KeyRerotationPress`. So the policy is a
cache layer on transformers' own `Cache` API (`DynamicLayer` subclass), driven by `_kv.greedy_decode`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from baselines.caching._kv import Positions, check_in
from bench.config import ConfigError, check_range
from bench.registry import register_method

METHOD = "streamingllm"


@dataclass(frozen=True)
class StreamingLLMConfig:
    # tokens every layer keeps, sinks + window. 64 is below arith's sequences (prompts of 23-54 tokens, prompt +
    # answer 47-137, mean 95), so most answers run with evictions and the quality cost is measurable; the paper
    # uses caches of 256-4096 tokens on texts far longer than that
    cache_budget: int = 64
    sink_tokens: int = 4  # S: initial tokens kept for good; the paper finds 4 enough (table 2); window = budget - S
    positions: Positions = "cache"  # "cache": positions within the cache, as the paper; "original": text positions

    @property
    def window(self) -> int:
        return self.cache_budget - self.sink_tokens

    def validate(self) -> None:
        check_range("cache_budget", self.cache_budget, lo=2)
        check_in("sink_tokens", self.sink_tokens, 0, self.cache_budget - 1,
                 f"cache_budget - 1 = {self.cache_budget - 1}: the recent window needs at least one token")
        if self.positions not in ("cache", "original"):
            raise ConfigError(f"positions={self.positions!r} is not one of 'cache', 'original'")


def rope_rotation(model):
    """`rotate(keys, delta)`: keys (1, H, N, d) rotated further by `delta` (N,) positions, with the model's own
    RoPE (its module's `apply_rotary_pos_emb` and the decoder's `rotary_emb`); a clear error if the model has
    none or its RoPE is not a fixed rotation per position."""
    import importlib

    import torch

    module = importlib.import_module(type(model).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if apply is None or rotary is None:
        raise ValueError(f"{METHOD}: positions='cache' re-rotates RoPE keys, and {type(model).__name__} has no "
                         f"rotary embedding (apply_rotary_pos_emb / rotary_emb); use positions='original'")
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:
        raise ValueError(f"{METHOD}: positions='cache' needs a rotation fixed per position; rope_type "
                         f"{rope_type!r} changes its frequencies with the length; use positions='original'")
    scale = float(getattr(rotary, "attention_scaling", 1.0))

    def rotate(keys: "torch.Tensor", delta: "torch.Tensor") -> "torch.Tensor":
        cos, sin = rotary(keys, delta[None])
        cos, sin = cos / scale, sin / scale  # the keys already carry the scaling once
        return apply(keys, keys, cos, sin)[1]

    return rotate


@functools.cache  # one class, made on first use (transformers is imported inside)
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class SinkWindowLayer(DynamicLayer):
        """One layer's cache under StreamingLLM: S sinks + W recent tokens, with the position each stored key
        was rotated at (`pos`) and its place in the text (`tokens`); `rotate` (None for text positions)
        re-rotates keys to their cache index for the attention."""

        is_croppable = False  # evicted tokens cannot be restored

        def __init__(self, sinks: int, window: int, rotate=None):
            super().__init__()
            self.sinks, self.window, self.rotate = sinks, window, rotate
            self.pos = None  # the position each stored key was rotated at
            self.tokens = None  # the text position of each stored token
            self.evicted = 0

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.pos = self.tokens = torch.empty(0, dtype=torch.long, device=key_states.device)
                self.seen = 0
            n_old, q = self.get_seq_length(), key_states.shape[-2]
            dev = self.pos.device
            new_tokens = torch.arange(self.seen, self.seen + q, device=dev)
            self.seen += q
            # the model rotated the new keys at their cache index (positions="cache") or text position
            new_pos = torch.arange(n_old, n_old + q, device=dev) if self.rotate is not None else new_tokens
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            pos, tokens = torch.cat([self.pos, new_pos]), torch.cat([self.tokens, new_tokens])
            attn_keys = keys
            if self.rotate is not None and self.evicted:  # keys have moved since the first eviction
                # k_c = R(c - p) k_p for the old keys; the new ones are already at their index
                moved = self.rotate(self.keys, torch.arange(n_old, device=dev) - self.pos)
                attn_keys = torch.cat([moved, key_states], dim=-2)
            n = n_old + q
            if n > self.sinks + self.window:  # C_t = sinks U the W most recent
                keep = torch.cat([torch.arange(self.sinks, device=dev), torch.arange(n - self.window, n, device=dev)])
                self.keys, self.values = keys[..., keep, :], values[..., keep, :]
                self.pos, self.tokens = pos[keep], tokens[keep]
                self.evicted += n - keep.numel()
            else:
                self.keys, self.values, self.pos, self.tokens = keys, values, pos, tokens
            return attn_keys, values

    return SinkWindowLayer


def make_cache(model, sinks: int, window: int, positions: Positions = "cache"):
    """A transformers `Cache` of `SinkWindowLayer`s for `model` (also used directly by the tests)."""
    from baselines.caching._kv import bounded_cache, num_layers

    rotate = rope_rotation(model) if positions == "cache" else None
    layer = _layer_class()
    return bounded_cache([layer(sinks, window, rotate) for _ in range(num_layers(model))])


@register_method(METHOD, family="caching", paper="Xiao et al., Efficient Streaming Language Models with "
                 "Attention Sinks", year=2024, url="https://arxiv.org/abs/2309.17453", modalities=("causal-lm",),
                 summary="KV cache of the first S tokens (attention sinks) plus a rolling window of recent ones; "
                         "positions re-assigned within the cache")
class StreamingLLM(Method):
    Config = StreamingLLMConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._kv import KVCounts, cached_generate
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        if cfg.positions == "cache":
            rope_rotation(subject.model)  # fail now, with the reason, rather than at the first sequence
        counts = KVCounts()
        generate = cached_generate(lambda m: make_cache(m, cfg.sink_tokens, cfg.window, cfg.positions),
                                   cfg.positions, counts, METHOD)
        extra = {**subject.extra, "generate": generate}
        return Applied(Subject(subject.model, subject.kind, extra),
                       Cost(description="none: a decoding-time cache policy, no training or calibration"),
                       stats=counts.as_dict)
