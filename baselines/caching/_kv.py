"""What the causal-LM KV-cache policies (`streamingllm`, `h2o`) share: the greedy decoding loop that drives a
bounded cache, the cache container, the counters behind `Applied.stats`, and range checks for the budget.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.

The decoding loop is written here rather than delegated to `model.generate` because a bounded cache breaks
generate's bookkeeping: generate grows a 2-D attention mask and derives position ids from it, one entry per
token ever seen, while an evicting cache holds fewer keys than that. The loop calls the model's forward with
the cache object (transformers' `Cache` API: per-layer `update`, `get_seq_length`, `get_mask_sizes`, from which
transformers 5.x builds the causal mask, so a compacted cache gets a correct mask with no further help),
explicit position ids (the policy's positional scheme), and `logits_to_keep=1`, as generate does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from bench.config import ConfigError, check_range
from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch

Positions = Literal["cache", "original"]


def check_in(name: str, value: float, lo: float, hi: float, what: str = "") -> None:
    """`check_range` with the whole valid interval in the message (`what` explains a derived bound)."""
    try:
        check_range(name, value, lo=lo, hi=hi)
    except ConfigError as e:
        raise ConfigError(f"{e}; valid range: {lo} <= {name} <= {hi}{' (' + what + ')' if what else ''}") from None


@dataclass
class KVCounts:
    """Counters over every sequence decoded with the policy (`Applied.stats`).

    kv_tokens_kept: the largest number of tokens any layer's cache held between forward steps (<= the budget);
    kv_tokens_full: the largest number a full cache would have held for the same sequences (every token the
    model processed: prompt + generated - 1); evictions: tokens dropped from the cache, per sequence position
    (every layer and head drops the same number at the same step), summed over sequences."""

    kv_tokens_kept: int = 0
    kv_tokens_full: int = 0
    evictions: int = 0
    sequences: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"kv_tokens_kept": self.kv_tokens_kept, "kv_tokens_full": self.kv_tokens_full,
                "kv_kept_fraction": self.kv_tokens_kept / max(1, self.kv_tokens_full),
                "evictions": self.evictions, "sequences": self.sequences}


def bounded_cache(layers: list):
    """A transformers `Cache` made of the policy's own layers (subclasses of `DynamicLayer`), one per decoder
    layer. Each layer counts its `evicted` tokens and reports its length through `get_seq_length`."""
    from transformers.cache_utils import Cache

    return Cache(layers=layers)


def num_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def single_row(input_ids: "torch.Tensor", attention_mask: "torch.Tensor | None", method: str) -> "torch.Tensor":
    """The one prompt of a batch-1 call as a 1-D tensor, left padding stripped (the causal-LM profiles run
    batch 1; a per-sequence eviction policy keeps a different set of tokens for every row)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"method {method!r} decodes one sequence at a time (batch 1, the causal-LM profiles' "
                         f"batch size); got input_ids of shape {tuple(input_ids.shape)}")
    row = input_ids[0]
    if attention_mask is not None:
        row = row[attention_mask[0].bool()]
    return row


def greedy_decode(model, input_ids: "torch.Tensor", attention_mask: "torch.Tensor | None", max_new_tokens: int,
                  eos_id: int | None, cache, positions: Positions, counts: KVCounts,
                  method: str) -> "torch.Tensor":
    """Greedy continuation with `cache`, stopping after EOS, as `tasks._kit.lm.generate_ids` returns it: the input
    (with its padding) followed by the generated tokens.

    Position ids: `"original"` gives every token its index in the text (0, 1, 2, ...); `"cache"` gives each new
    token its index in the cache (the number of tokens the cache holds before it), which is what StreamingLLM
    does. Before any eviction the two coincide."""
    import torch

    row = single_row(input_ids, attention_mask, method)
    device = input_ids.device
    new: list[int] = []
    x = row[None]
    seen = 0  # tokens processed so far (= the length a full cache would have)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            q = x.shape[1]
            start = seen if positions == "original" else cache.get_seq_length()
            pos = torch.arange(start, start + q, device=device)[None]
            logits = model(input_ids=x, position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                           logits_to_keep=1).logits
            seen += q
            counts.kv_tokens_kept = max(counts.kv_tokens_kept, max(l.get_seq_length() for l in cache.layers))
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos_id:
                break
            x = torch.tensor([[token]], device=device)
    counts.kv_tokens_full = max(counts.kv_tokens_full, seen)
    counts.evictions += cache.layers[0].evicted if cache.layers else 0
    counts.sequences += 1
    tail = torch.tensor(new, dtype=input_ids.dtype, device=device)
    return torch.cat([input_ids[0], tail])[None]


def cached_generate(make_cache: Callable[[object], object], positions: Positions, counts: KVCounts, method: str,
                    around: Callable | None = None):
    """The `extra["generate"]` hook of a policy: a fresh cache per sequence, optionally inside a context
    manager `around(model)` (H2O's eager attention and score hooks)."""
    from contextlib import nullcontext

    def generate(subject, input_ids, max_new_tokens, attention_mask=None):
        tok = subject.extra["tokenizer"]
        model = subject.model
        with (around(model) if around is not None else nullcontext()):
            return greedy_decode(model, input_ids, attention_mask, max_new_tokens, tok.eos_token_id,
                                 make_cache(model), positions, counts, method)

    return generate
