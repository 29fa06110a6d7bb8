"""Tiny random Llama mask predictors in the diffusion LM's subject (`tasks._kit.dllm`), shared by the dllm-cache and
fast-dllm tests: never trained, so each test runs in a second."""

from __future__ import annotations

import torch

from tasks._kit import dllm

MASK = 19
SAMPLING = dllm.Sampling(gen_length=16, steps=16, block_length=8)


def tiny_model(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=2)).eval()


def tiny_subject(seed: int = 0, sampling: dllm.Sampling = SAMPLING, shift: int = 0):
    """A subject as the task's `prepare` makes it; `shift` 1 reads token i's logits at position i - 1 (Dream)."""
    from tasks.base import Subject

    return Subject(tiny_model(seed), "diffusion-lm", {"sampling": sampling, "mask_id": MASK, "shift": shift,
                                                      "generate": dllm.generate_hook()})


def generate(subject, prompt):
    with torch.no_grad():
        return subject.extra["generate"](subject, prompt, subject.extra["sampling"].gen_length)


class StubTask:
    """Stands in for the task in a control's evaluation: records the subject it was handed."""

    def __init__(self):
        self.seen = []

    def evaluate(self, subject, ctx):
        from types import SimpleNamespace

        import numpy as np

        self.seen.append(subject)
        return SimpleNamespace(value=0.5, per_example=np.array([1.0, 0.0]))
