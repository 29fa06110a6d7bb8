"""Tiny models and a stand-in causal-LM task for the distillation tests (never trained, so tests take seconds).

`TinyLMTask` has what the LM distillation methods read from a task (`spec`, `tokenizer`, `train` rows,
`data_fingerprint`, `draft_subject`, `build_student`, `prepare`, `evaluate`) on GSM8K-format fixture rows
(the gsm8k task tests' own), a 2-layer Llama teacher and a 1-layer draft student."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench.api import Draft, Student, Tokenizer, TrainingRows

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture rows and writers

import test_gsm8k as gsm8k_fixtures  # noqa: E402

from tasks._kit import lm  # noqa: E402
from tasks.base import Evaluation, Subject  # noqa: E402


@functools.cache
def tokenizer():
    rows = gsm8k_fixtures.TRAIN + gsm8k_fixtures.TEST
    return lm.train_tokenizer([lm.prompt_of(q) + " " + a for q, a in rows], vocab_size=400)


def tiny_llama(hidden: int, layers: int, seed: int):
    return lm.build_lm(lm.LMArch(hidden=hidden, layers=layers, heads=2, intermediate=2 * hidden), tokenizer(),
                       seed=seed)


class _Spec:
    name, version, modality = "tiny-lm", "1", "causal-lm"


class TinyLMTask(TrainingRows, Draft, Student, Tokenizer):
    """A stand-in causal-LM task: fixture problems, a tiny teacher and draft; evaluation is per-problem
    exact match of the greedy answer's first 8 tokens against the ground truth (cheap, deterministic)."""

    spec = _Spec()
    student_recipe = None

    def training_rows(self) -> list[dict]:
        return self.train

    def __init__(self, rows=None):
        self.tokenizer = tokenizer()
        self.train = [{"question": q, "answer": a} for q, a in (rows or gsm8k_fixtures.TRAIN)]

    def data_fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.train).encode()).hexdigest()

    def reference(self):
        return tiny_llama(32, 2, seed=0)

    def build_student(self):
        return tiny_llama(16, 1, seed=0)

    def draft_subject(self, ctx) -> Subject:
        return self.prepare(tiny_llama(16, 1, seed=1), ctx)

    def prepare(self, model, ctx) -> Subject:
        return Subject(model.to(ctx.device).float().eval(), "causal-lm", {"tokenizer": self.tokenizer})

    def evaluate(self, subject, ctx) -> Evaluation:
        scores, outs = [], []
        for r in self.train[:2]:
            ids = torch.tensor([self.tokenizer(lm.prompt_of(r["question"]), add_special_tokens=False)["input_ids"]])
            with torch.inference_mode():
                got = lm.generate_ids(subject, ids, 8)[0, ids.shape[1]:].tolist()
            want = self.tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"][:8]
            scores.append(float(got == want))
            outs.append(got + [-1] * (8 - len(got)))
        return Evaluation(float(np.mean(scores)), np.asarray(scores), np.asarray(outs))


def tiny_bert(layers: int = 4, hidden: int = 32, heads: int = 4, seed: int = 0, vocab: int = 60):
    """A random BertForSequenceClassification (two labels) with weights larger than BERT's 0.02 init, so that
    its attention and layers matter to the output."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2,
                     attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.2)
    return model.eval()


def packed_batch(n: int = 3, length: int = 9, vocab: int = 60, seed: int = 0) -> torch.Tensor:
    """x [n, 3, length]: (input_ids, token_type_ids, attention_mask), rows right-padded to different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=gen)
    mask = torch.zeros(n, length, dtype=torch.long)
    for r in range(n):
        mask[r, :length - 2 * r] = 1
    ids = ids * mask
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    return torch.stack([ids, types * mask, mask], dim=1)
