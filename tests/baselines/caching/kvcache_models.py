"""Tiny models and an independent oracle for the KV-cache policy tests (`streamingllm`, `h2o`).

The oracle recomputes every step from scratch: it keeps the list of text indices the policy should hold, runs
the model without a cache on exactly those tokens plus the new ones (positions in the cache or in the text),
and applies the eviction rule written out plainly. For a one-layer model a key or value depends only on its
token and position, so the oracle's next token must equal the cached implementation's at every step."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from tasks.base import Subject

EOS, PAD = 63, 0


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 32, vocab: int = 64,
               seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None,
                      attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS, PAD
    return model


def subject(model, tokenizer=None) -> Subject:
    tok = tokenizer if tokenizer is not None else SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    return Subject(model, "causal-lm", {"tokenizer": tok})


def prompt(n: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 2, (1, n), generator=gen)  # never EOS or PAD


def reference_greedy(model, ids: torch.Tensor, max_new: int, eos: int = EOS, pad: int = PAD) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                              eos_token_id=eos, pad_token_id=pad)


def oracle(model, ids: torch.Tensor, max_new: int, evict: Callable[[list[int], dict[int, float]], list[int]],
           positions: str) -> list[int]:
    """Greedy tokens of a one-layer, one-KV-head `model` under a policy given as `evict(kept, scores) -> kept`
    (text indices in text order; scores: text index -> accumulated attention, over all query heads)."""
    tokens = ids[0].tolist()
    kept: list[int] = []
    scores: dict[int, float] = {}
    new = list(range(len(tokens)))
    out = []
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            for _ in range(max_new):
                ctx = kept + new
                pos = list(range(len(ctx))) if positions == "cache" else ctx
                # an explicit mask: without one, transformers reads gaps in position_ids as packed sequences
                res = model(input_ids=torch.tensor([[tokens[i] for i in ctx]]), position_ids=torch.tensor([pos]),
                            attention_mask=torch.ones(1, len(ctx), dtype=torch.long), output_attentions=True,
                            use_cache=False)
                att = res.attentions[0][0, :, len(kept):, :].sum(dim=(0, 1))  # new queries, summed over heads
                for j, a in zip(ctx, att.tolist()):
                    scores[j] = scores.get(j, 0.0) + a
                kept = evict(ctx, scores)
                scores = {j: scores[j] for j in kept}
                token = int(res.logits[0, -1].argmax())
                out.append(token)
                if token == EOS:
                    break
                tokens.append(token)
                new = [len(tokens) - 1]
    finally:
        model.set_attn_implementation(prev)
    return out


def sinks_and_window(sinks: int, window: int):
    def evict(ctx, scores):
        return ctx if len(ctx) <= sinks + window else ctx[:sinks] + ctx[len(ctx) - window:]
    return evict


def heavy_and_recent(heavy: int, recent: int):
    def evict(ctx, scores):
        if len(ctx) <= heavy + recent:
            return ctx
        older = ctx[:len(ctx) - recent]
        top = sorted(sorted(older, key=lambda j: -scores[j])[:heavy])
        return top + ctx[len(ctx) - recent:]
    return evict
