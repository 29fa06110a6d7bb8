"""fora on the digits-gen DiT."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_reproduces_the_uncached_sampler(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("fora", dit_subject, interval=1)
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)
    assert applied.stats() == {"nfe_full": helpers.steps, "nfe_partial": 0}


def test_reuse_changes_the_output_and_is_counted(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("fora", dit_subject, interval=2)
    assert not torch.allclose(helpers.sample(applied.subject, inputs[0]), ref, atol=1e-4)
    assert applied.stats() == {"nfe_full": 4, "nfe_partial": 3}  # steps 0, 2, 4, 6 of 7


def test_caches_reset_between_batches(dit_subject, inputs, helpers):
    a = helpers.apply("fora", dit_subject, interval=3).subject
    helpers.sample(a, inputs[0])
    second = helpers.sample(a, inputs[1])
    assert torch.equal(second, helpers.sample(helpers.apply("fora", dit_subject, interval=3).subject, inputs[1]))


def test_config_and_backbone(dit_subject, unet_subject, helpers):
    with pytest.raises(ConfigError, match="interval"):
        helpers.apply("fora", dit_subject, interval=0)
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("fora", unet_subject)
