"""The diffusion samplers ddim, dpm-solver, unipc on the digits-gen tasks."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError
from bench.profiles import load_profile
from bench.progress import Reporter
from bench.registry import create_method, get_task_spec
from tasks import diffusion
from tasks.base import RunContext

SAMPLERS = {"ddim": 20, "dpm-solver": 10, "unipc": 10}  # name -> default steps


def make_ctx() -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=4, budget="smoke")


@pytest.fixture(scope="module", params=["digits-gen", "digits-gen-dit"])
def setup(request):
    """(task, reference subject): the published reference where it is recorded, else the untrained one."""
    torch.set_num_threads(1)
    task = get_task_spec(request.param).cls()
    ctx = make_ctx()
    task.load(ctx)
    if task.reference_sha256:
        state = task.reference_weights(ctx).state
    else:
        state = task.build_reference().state_dict()
    return task, task.subject_from_state(state, ctx)


def test_ddim_at_the_reference_steps_reproduces_the_reference_exactly(setup):
    task, ref = setup
    applied = create_method("ddim", {"num_inference_steps": "50"}).apply(ref, task, make_ctx())
    noise, labels = diffusion.eval_inputs(4, 3)
    assert torch.equal(diffusion.sample(applied.subject, noise, labels), diffusion.sample(ref, noise, labels))
    assert applied.stats()["nfe"] == 50


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_count_one_evaluation_per_step_and_are_deterministic(setup, name):
    task, ref = setup
    applied = create_method(name).apply(ref, task, make_ctx())
    noise, labels = diffusion.eval_inputs(4, 5)
    a = diffusion.generate(applied.subject, noise, labels, batch_size=2)
    b = diffusion.generate(applied.subject, noise, labels, batch_size=2)
    assert torch.equal(a, b)
    assert applied.stats() == {"nfe": SAMPLERS[name], "num_inference_steps": SAMPLERS[name]}
    assert ref.extra["num_inference_steps"] == 50 and "on_batch_start" not in ref.extra  # the reference is untouched
    assert type(applied.subject.extra["scheduler"]).__name__ != "DDIMScheduler" or name == "ddim"
    assert applied.subject.extra["scheduler"].config.beta_schedule == "linear"  # the task's schedule


def test_samplers_keep_an_inner_batch_hook(setup):
    task, ref = setup
    calls = []
    inner = type(ref)(ref.model, ref.kind, {**ref.extra, "on_batch_start": lambda: calls.append(1)})
    applied = create_method("unipc", {"num_inference_steps": "3"}).apply(inner, task, make_ctx())
    noise, labels = diffusion.eval_inputs(4, 0)
    diffusion.generate(applied.subject, noise, labels, batch_size=2)
    assert calls == [1, 1] and applied.stats()["nfe"] == 3


def test_higher_order_solvers_get_closer_to_the_reference_than_ddim_at_10_steps(setup):
    task, ref = setup
    if not task.reference_sha256:
        pytest.skip("needs the published (trained) reference: an untrained denoiser has no ODE to follow")
    noise, labels = diffusion.eval_inputs(16, 7)
    target = diffusion.sample(ref, noise, labels)
    err = {}
    for name in ("ddim", "dpm-solver", "unipc"):
        sub = create_method(name, {"num_inference_steps": "10"}).apply(ref, task, make_ctx()).subject
        err[name] = float((diffusion.sample(sub, noise, labels) - target).pow(2).mean())
    assert err["dpm-solver"] < err["ddim"] and err["unipc"] < err["ddim"], err


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_step_counts_are_rejected(name):
    with pytest.raises(ConfigError, match="num_inference_steps"):
        create_method(name, {"num_inference_steps": "0"})
