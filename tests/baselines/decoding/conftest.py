"""Fixtures for the decoding-method tests: the arith tokenizer and prompts, tiny random Llama targets and drafts
built on it (never trained, so the tests run in seconds), and a stand-in task that hands out the draft."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks.base import RunContext

sys.path.insert(0, str(Path(__file__).parent))  # for decoding_models, under --import-mode=importlib too

from decoding_models import perturbed, tiny_llama  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ctx() -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1)


@pytest.fixture(scope="session")
def arith_task(ctx):
    from tasks.arith import Arith

    task = Arith()
    task.load(ctx)
    return task


@pytest.fixture(scope="session")
def tokenizer(arith_task):
    return arith_task.tokenizer


@pytest.fixture(scope="session")
def prompts(arith_task, tokenizer) -> list[torch.Tensor]:
    """Four arith test questions in the task's prompt format, as (1, L) token ids."""
    from tasks._kit import lm

    return [tokenizer(lm.prompt_of(p["question"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
            for p in arith_task.test[:4]]


@pytest.fixture(scope="session")
def target(tokenizer):
    return tiny_llama(len(tokenizer), eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def drafts(target, tokenizer) -> dict:
    """Two drafts: the target with noise (frequent agreement) and an unrelated smaller model (rare agreement)."""
    return {"noisy-copy": perturbed(target, 0.2),
            "unrelated": tiny_llama(len(tokenizer), hidden=16, layers=1, heads=1, seed=7,
                                    eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)}


@pytest.fixture(scope="module")
def smoke_ctx(ctx):
    """The `ctx` profile at the smoke budget (what the apply tests train under)."""
    return RunContext(profile=ctx.profile, seed=0, progress=ctx.progress, batch_size=1, budget="smoke")
