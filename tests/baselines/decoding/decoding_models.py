"""Tiny models and helpers for the decoding-method tests (imported by conftest and the test files)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bench.api import Draft, TrainingRows

from tasks.base import Subject


def tiny_llama(vocab: int, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0, eos: int = 0,
               pad: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):  # seeded weights that leave the global generator alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    return model


def perturbed(model, scale: float, seed: int = 1):
    """A draft that agrees with `model` often but not always: its weights plus Gaussian noise."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return draft


@dataclass
class DraftTask(Draft):
    """Stands in for a causal-LM task with a draft (what `Method.apply` reads from a task)."""

    draft: torch.nn.Module

    def draft_subject(self, ctx) -> Subject:
        return Subject(self.draft, "causal-lm", {})


def greedy(model, ids: torch.Tensor, max_new: int, eos: int, pad: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=pad)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


@dataclass
class RowsTask(TrainingRows):
    """Stands in for a causal-LM task with a training split: all that medusa, eagle and cllm read from a task."""

    rows: list

    def training_rows(self) -> list:
        return self.rows

    def data_fingerprint(self) -> str:
        return "rows-" + str(len(self.rows))

    class spec:  # noqa: N801 - what the cache's folder names read
        name, version = "rows", "1"
