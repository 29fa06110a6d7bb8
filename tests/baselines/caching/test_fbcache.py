"""first-block-cache: diffusers' apply_first_block_cache on the digits-gen DiT."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_threshold_zero_computes_every_step_exactly(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("first-block-cache", dit_subject, threshold=0)
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)
    s = applied.stats()
    assert s["nfe_full"] == helpers.steps and s["nfe_partial"] == 0 and s["hook_calls"] == 4 * helpers.steps


def test_a_large_threshold_skips_the_tail_blocks(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("first-block-cache", dit_subject, threshold=10.0)
    out = helpers.sample(applied.subject, inputs[0])
    s = applied.stats()
    assert s["nfe_full"] == 1 and s["nfe_partial"] == helpers.steps - 1  # only the first step is full
    assert not torch.allclose(out, ref, atol=1e-4)


def test_config_and_backbone(dit_subject, unet_subject, helpers):
    with pytest.raises(ConfigError, match="threshold"):
        helpers.apply("first-block-cache", dit_subject, threshold=-1)
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("first-block-cache", unet_subject)
