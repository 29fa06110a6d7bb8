"""Fixtures for the distillation-method tests: a stand-in LM task and tiny models (see distil_models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks.base import RunContext

sys.path.insert(0, str(Path(__file__).parent))  # for distil_models, under --import-mode=importlib too

from distil_models import TinyLMTask  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ctx() -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1)


@pytest.fixture
def lm_task() -> TinyLMTask:
    return TinyLMTask()


@pytest.fixture
def teacher_subject(lm_task, ctx):
    return lm_task.prepare(lm_task.reference(), ctx)
