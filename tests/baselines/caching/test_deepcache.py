"""deepcache on the digits-gen UNet: exact at interval 1, the shallow path reproduces the full pass from a fresh
cache, caches reset per batch, config and backbone checks."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_reproduces_the_uncached_sampler(unet_subject, inputs, helpers):
    ref = helpers.sample(unet_subject, inputs[0])
    applied = helpers.apply("deepcache", unet_subject, interval=1)
    out = helpers.sample(applied.subject, inputs[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert applied.stats() == {"nfe_full": helpers.steps, "nfe_partial": 0}


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_partial_pass_on_a_fresh_cache_equals_the_full_pass(unet_subject, branch):
    """Run the shallow path right after a full pass on the same input: the cached feature is exact, so the
    output must be too (checks the skip-feature bookkeeping and the skipped downsampler of every branch)."""
    from baselines.caching.deepcache import unet_forward

    model = unet_subject.model
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([600, 600]), torch.tensor([3, 7])
    with torch.inference_mode():
        ref = model(x, t, class_labels=y).sample
        cache = {}
        full = unet_forward(model, x, t, y, branch, cache, full=True)
        partial = unet_forward(model, x, t, y, branch, cache, full=False)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial, ref, rtol=1e-5, atol=1e-5)


def test_caching_changes_the_output_and_counts_partial_steps(unet_subject, inputs, helpers):
    ref = helpers.sample(unet_subject, inputs[0])
    applied = helpers.apply("deepcache", unet_subject, interval=3)
    out = helpers.sample(applied.subject, inputs[0])
    assert not torch.allclose(out, ref, atol=1e-4)
    assert applied.stats() == {"nfe_full": 3, "nfe_partial": helpers.steps - 3}  # steps 0, 3, 6 of 7


def test_caches_reset_between_batches(unet_subject, inputs, helpers):
    a = helpers.apply("deepcache", unet_subject, interval=3).subject
    helpers.sample(a, inputs[0])
    second = helpers.sample(a, inputs[1])
    alone = helpers.sample(helpers.apply("deepcache", unet_subject, interval=3).subject, inputs[1])
    assert torch.equal(second, alone)


def test_the_model_is_left_untouched(unet_subject, inputs, helpers):
    before = helpers.sample(unet_subject, inputs[0])
    applied = helpers.apply("deepcache", unet_subject, interval=2)
    helpers.sample(applied.subject, inputs[0])
    assert applied.subject.model is unet_subject.model
    assert torch.equal(helpers.sample(unet_subject, inputs[0]), before)


def test_config_validation(unet_subject, helpers):
    with pytest.raises(ConfigError, match="interval"):
        helpers.apply("deepcache", unet_subject, interval=0)
    with pytest.raises(ConfigError, match="valid branches are 0..2"):
        helpers.apply("deepcache", unet_subject, branch=3)


def test_refuses_a_dit(dit_subject, helpers):
    with pytest.raises(ValueError, match="needs a UNet"):
        helpers.apply("deepcache", dit_subject)
