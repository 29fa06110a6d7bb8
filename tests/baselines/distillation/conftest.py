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


@pytest.fixture(scope="module")
def digits_gen():
    """(task, reference subject, ctx): the published digits-gen UNet (else the untrained one), smoke budget,
    batch 4: the diffusion distillations' tests (progressive, add, ladd, freeflow) share it."""
    from bench.registry import get_task_spec

    torch.set_num_threads(1)
    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=4, budget="smoke")
    task = get_task_spec("digits-gen").cls()
    task.load(ctx)
    state = task.reference_weights(ctx).state if task.reference_sha256 else task.build_reference().state_dict()
    return task, task.subject_from_state(state, ctx), ctx
