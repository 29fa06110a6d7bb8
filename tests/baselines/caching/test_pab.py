"""pab: diffusers' apply_pyramid_attention_broadcast on the digits-gen DiT and UNet."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


@pytest.mark.parametrize("backbone", ["dit", "unet"])
def test_interval_one_is_exact_and_broadcast_skips_attention(backbone, inputs, helpers, request):
    subject = request.getfixturevalue(f"{backbone}_subject")
    ref = helpers.sample(subject, inputs[0])
    exact = helpers.apply("pab", subject, interval=1)
    torch.testing.assert_close(helpers.sample(exact.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)
    assert exact.stats()["hook_reuse_share"] == 0
    applied = helpers.apply("pab", subject, interval=2, timestep_low=-1, timestep_high=1000)
    out = helpers.sample(applied.subject, inputs[0])
    s = applied.stats()
    layers = s["hooked_modules"]
    assert layers == 4  # DiT: the 4 blocks' attn1; UNet: AttnDownBlock2D (1), the mid block (1), AttnUpBlock2D (2)
    assert s["hook_calls"] == layers * helpers.steps and s["hook_computed"] == layers * 4  # calls 0, 2, 4, 6
    assert not torch.allclose(out, ref, atol=1e-5)


def test_the_timestep_range_is_read_from_the_loop(dit_subject, inputs, helpers):
    """A range no timestep of the schedule falls in: PAB computes everything (its callback sees real t)."""
    applied = helpers.apply("pab", dit_subject, interval=2, timestep_low=1000, timestep_high=2000)
    helpers.sample(applied.subject, inputs[0])
    assert applied.stats()["hook_reuse_share"] == 0


def test_config(dit_subject, helpers):
    with pytest.raises(ConfigError, match="timestep_low"):
        helpers.apply("pab", dit_subject, timestep_low=900, timestep_high=100)
    with pytest.raises(ConfigError, match="interval"):
        helpers.apply("pab", dit_subject, interval=0)
