"""Fixtures for the pruning-method tests: the real `arith` task (data and tokenizer; the models are tiny random
Llamas built on its tokenizer, never trained) and arith-nli with a few encoded training pairs and tiny random
BERTs, so the tests run in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks.base import RunContext

sys.path.insert(0, str(Path(__file__).parent))  # for pruning_models, under --import-mode=importlib too

from pruning_models import small_arith_nli, tiny_bert_pair_classifier, tiny_llama, vlm_context  # noqa: E402


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


@pytest.fixture(scope="session")
def nli():
    return small_arith_nli()


@pytest.fixture
def bert_subject(nli, ctx):
    return nli.prepare(tiny_bert_pair_classifier(nli), ctx)


@pytest.fixture
def prompt_ids(arith):
    from tasks._kit import lm

    return torch.tensor([arith.tokenizer(lm.prompt_of(arith.test[0]["question"]),
                                         add_special_tokens=False)["input_ids"]])


@pytest.fixture(scope="session")
def digits_vlm():
    """The digits-vlm task (data, tokenizer) loaded at smoke budget."""
    from tasks.digits_vlm import DigitsVLM

    task = DigitsVLM()
    task.load(vlm_context())
    return task


@pytest.fixture(scope="session")
def vlm_subject(digits_vlm):
    """digits-vlm's published reference as a subject (0.41M parameters; trained, so its answers vary with the
    image and a changed forward shows)."""
    ctx = vlm_context()
    model = digits_vlm.build_reference()
    model.load_state_dict(digits_vlm.reference_weights(ctx).state)
    return digits_vlm.prepare(model, ctx)
