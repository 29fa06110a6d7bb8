"""diffusers-taylorseer: diffusers' apply_taylorseer_cache on every DiT block's attn1 and ff (the agreement with
the hand-written `taylorseer` is in test_taylorseer.py)."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_is_exact_and_every_block_is_hooked(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("diffusers-taylorseer", dit_subject, interval=1)
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)
    s = applied.stats()
    assert s["hooked_modules"] == 8 and s["hook_calls"] == 8 * helpers.steps and s["nfe_partial"] == 0


def test_schedule(dit_subject, inputs, helpers):
    from baselines.caching.diffusers_taylorseer import diffusers_full_step

    applied = helpers.apply("diffusers-taylorseer", dit_subject, interval=3, warmup=1)
    helpers.sample(applied.subject, inputs[0])
    full = [i for i in range(helpers.steps) if diffusers_full_step(i, 3, 1)]
    assert full == [0, 2, 5]
    assert applied.stats()["nfe_full"] == len(full)


def test_config_and_backbone(dit_subject, unet_subject, helpers):
    with pytest.raises(ConfigError, match="warmup"):
        helpers.apply("diffusers-taylorseer", dit_subject, warmup=0)
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("diffusers-taylorseer", unet_subject)
