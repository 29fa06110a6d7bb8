"""fastercache: diffusers' apply_faster_cache (attention reuse part) on the digits-gen DiT."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_is_exact(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("fastercache", dit_subject, interval=1)
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)


def test_reuse_starts_at_start_step(dit_subject, inputs, helpers):
    from baselines.caching.fastercache import step_range_to_timesteps

    low, high = step_range_to_timesteps(dit_subject, 3)
    ts = [float(t) for t in (lambda s: (s.set_timesteps(helpers.steps), s.timesteps)[1])(
        type(dit_subject.extra["scheduler"]).from_config(dit_subject.extra["scheduler"].config))]
    assert [low < t < high for t in ts] == [False] * 3 + [True] * (helpers.steps - 3)
    applied = helpers.apply("fastercache", dit_subject, interval=2, start_step=3)
    out = helpers.sample(applied.subject, inputs[0])
    s = applied.stats()
    # the hook's own iteration counter: computed at calls 0-2 (outside the range), then at even calls 4, 6
    assert s["nfe_full"] == 5 and s["nfe_partial"] == 2
    assert not torch.equal(out, helpers.sample(dit_subject, inputs[0]))


def test_weight_enters_the_extrapolation(dit_subject, inputs, helpers):
    outs = [helpers.sample(helpers.apply("fastercache", dit_subject, interval=2, weight=w).subject, inputs[0])
            for w in (0.0, 1.0)]
    ref = helpers.sample(dit_subject, inputs[0])
    assert not torch.allclose(outs[0], ref, atol=1e-5)
    assert not torch.equal(outs[0], outs[1])


def test_a_range_including_the_first_step_is_refused(dit_subject, helpers):
    with pytest.raises(ConfigError, match="first step"):
        helpers.apply("fastercache", dit_subject, start_step=0)


def test_refuses_a_unet(unet_subject, helpers):
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("fastercache", unet_subject)
