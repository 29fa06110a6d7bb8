"""Fixtures for the calibrated quantizers' tests (`gptq`, `awq`, `smoothquant`), imported by their test modules:
the real `arith` task (data and tokenizer) with the pruning tests' tiny random Llamas on its tokenizer, and their
calibration layers with correlated, outlier-carrying inputs (`tests/baselines/pruning/pruning_models.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks.base import RunContext

sys.path.insert(0, str(Path(__file__).parents[1] / "pruning"))  # pruning_models, under --import-mode=importlib

from pruning_models import correlated_inputs, layer_error, tiny_llama  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ctx() -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1)


@pytest.fixture(scope="session")
def arith():
    from tasks.arith import Arith

    task = Arith()
    task.load()
    return task


@pytest.fixture
def llama_subject(arith, ctx):
    return arith.prepare(tiny_llama(arith.tokenizer), ctx)


@pytest.fixture
def prompt_ids(arith):
    from tasks._kit import lm

    return torch.tensor([arith.tokenizer(lm.prompt_of(arith.test[0]["question"]),
                                         add_special_tokens=False)["input_ids"]])


def calibration_layer(out_f: int = 48, in_f: int = 64, seed: int = 0, tokens: int = 512):
    """(W [out, in], X [tokens, in], H = 2 X^T X) of one layer with correlated, outlier-carrying inputs."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    x = correlated_inputs(in_f, tokens, seed=seed + 1)
    return w, x, 2 * x.T @ x
