"""What every diffusers-hook method shares (`baselines/caching/_hooks.py`): a hook that never fires is an error,
state resets per batch, the reference model is not hooked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.caching._common import CacheNeverUsed
from baselines.caching._hooks import HookNeverFired, hooked_subject


def test_diffusers_default_taylorseer_identifiers_match_no_dit_module(dit_subject):
    """The FIELD-NOTES trap: TaylorSeerCacheConfig's default identifiers hook nothing in a DiT; that raises."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    def install(model, clock):
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
        return ["taylorseer_cache"]

    with pytest.raises(HookNeverFired, match="attached no hook"):
        hooked_subject(dit_subject, "test", install)


def test_a_hook_on_a_module_the_forward_never_runs_raises(dit_subject, inputs, helpers):
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    def install(model, clock):
        model.unused = torch.nn.Linear(4, 4)  # hooked, but not part of the forward
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                            cache_identifiers=["unused"]))
        return ["taylorseer_cache"]

    subject, _, hooked = hooked_subject(dit_subject, "test", install)
    assert [h.name for h in hooked] == ["unused"]
    with pytest.raises(HookNeverFired, match="ran during a denoiser call"):
        helpers.sample(subject, inputs[0])


@pytest.mark.parametrize("name", ["first-block-cache", "pab", "fastercache", "diffusers-taylorseer", "fora",
                                  "toca", "taylorseer"])
def test_a_denoise_that_bypasses_the_model_it_is_given_raises(dit_subject, inputs, helpers, name):
    real = dit_subject.model

    def bypass(model, x, t, labels, i):
        return real(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample

    subject = dataclasses.replace(dit_subject, extra=dict(dit_subject.extra, denoise=bypass))
    applied = helpers.apply(name, subject)
    with pytest.raises(CacheNeverUsed):
        helpers.sample(applied.subject, inputs[0])


@pytest.mark.parametrize("name, overrides", [("first-block-cache", {"threshold": 0.3}), ("pab", {}),
                                             ("fastercache", {}), ("diffusers-taylorseer", {"interval": 3})])
def test_hook_state_resets_between_batches_and_the_reference_stays_plain(dit_subject, inputs, helpers, name,
                                                                        overrides):
    before = helpers.sample(dit_subject, inputs[0])
    a = helpers.apply(name, dit_subject, **overrides)
    assert a.subject.model is not dit_subject.model  # hooks go on a copy
    helpers.sample(a.subject, inputs[0])
    second = helpers.sample(a.subject, inputs[1])
    alone = helpers.sample(helpers.apply(name, dit_subject, **overrides).subject, inputs[1])
    assert torch.equal(second, alone)
    assert not hasattr(dit_subject.model.transformer_blocks[0], "_diffusers_hook")
    assert torch.equal(helpers.sample(dit_subject, inputs[0]), before)


def test_two_calls_per_step_are_refused_where_hook_state_is_per_layer(dit_subject, inputs, helpers):
    """Guidance done as two denoiser calls would mix PAB's / FasterCache's per-layer state: refused."""
    def twice(model, x, t, labels, i):
        kw = dict(timestep=t.expand(x.shape[0]), class_labels=labels)
        return 0.5 * (model(x, **kw).sample + model(x, **kw).sample)

    subject = dataclasses.replace(dit_subject, extra=dict(dit_subject.extra, denoise=twice))
    for name in ("pab", "fastercache"):
        with pytest.raises(ValueError, match="more than once per step"):
            helpers.sample(helpers.apply(name, subject).subject, inputs[0])
    # the context-keyed hooks (TaylorSeer) keep the two calls apart and run
    applied = helpers.apply("diffusers-taylorseer", subject)
    helpers.sample(applied.subject, inputs[0])
    assert applied.stats()["denoiser_calls"] == 2 * helpers.steps
