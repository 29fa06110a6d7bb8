"""Fixtures for the diffusion caching tests: the digits-gen denoisers (random weights, seeded) in the task's own
sampling loop (`tasks._kit.diffusion.sample`), with few steps and a batch of 2, so each test takes a fraction of a
second."""

from __future__ import annotations

import pytest

STEPS = 7


def make_subject(backbone: str, steps: int = STEPS):
    import torch

    from tasks._kit import diffusion
    from tasks.base import Subject

    torch.set_num_threads(1)
    model = (diffusion.build_unet() if backbone == "unet" else diffusion.build_dit()).eval()
    extra = dict(diffusion.sampling_extra(backbone), num_inference_steps=steps)
    return Subject(model, "image-generation", extra)


@pytest.fixture(scope="module")
def unet_subject():
    return make_subject("unet")


@pytest.fixture(scope="module")
def dit_subject():
    return make_subject("dit")


@pytest.fixture(scope="module")
def inputs():
    from tasks._kit.diffusion import eval_inputs

    return eval_inputs(2, 0), eval_inputs(2, 1)  # two different batches (noise, labels)


def sample(subject, batch):
    """The denoiser outputs of every step, stacked (steps x B x 1 x 16 x 16), from the task's loop.

    Not the final images: with random weights, DDIM's first step (t = 999, abar near 0) scales them to ~1e4,
    which would hide any difference under a relative tolerance; the eps are O(1)."""
    import dataclasses

    import torch

    from tasks._kit.diffusion import sample as run_loop

    eps = []
    inner = subject.extra["denoise"]

    def recording(*args):
        out = inner(*args)
        eps.append(out.clone())
        return out

    noise, labels = batch
    run_loop(dataclasses.replace(subject, extra=dict(subject.extra, denoise=recording)), noise, labels)
    return torch.stack(eps)


def apply(name: str, subject, **overrides):
    from bench import registry

    method = registry.create_method(name, {k: str(v) for k, v in overrides.items()})
    return method.apply(subject, None, None)


@pytest.fixture
def helpers():
    return type("H", (), {"sample": staticmethod(sample), "apply": staticmethod(apply),
                          "make_subject": staticmethod(make_subject), "steps": STEPS})
