"""toca on the digits-gen DiT: exact at interval 1, token selection, per-layer ratios, resets."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_reproduces_the_uncached_sampler(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("toca", dit_subject, interval=1)
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)
    assert applied.stats()["nfe_partial"] == 0


def test_ratio_one_recomputes_every_mlp_token(dit_subject, inputs, helpers):
    """With every token fresh, a partial step differs from FORA's only in reusing attention, not the MLP."""
    applied = helpers.apply("toca", dit_subject, interval=3, fresh_ratio=1.0, ratio_schedule="constant")
    out = helpers.sample(applied.subject, inputs[0])
    s = applied.stats()
    assert s["mlp_token_fresh_share"] == 1.0 and s["nfe_partial"] == helpers.steps - 3
    fora = helpers.sample(helpers.apply("fora", dit_subject, interval=3).subject, inputs[0])
    assert not torch.allclose(out, fora, atol=1e-5)


def test_ratio_zero_is_fora(dit_subject, inputs, helpers):
    toca = helpers.apply("toca", dit_subject, interval=3, fresh_ratio=0.0)
    fora = helpers.apply("fora", dit_subject, interval=3)
    torch.testing.assert_close(helpers.sample(toca.subject, inputs[0]), helpers.sample(fora.subject, inputs[0]),
                               rtol=1e-6, atol=1e-6)


def test_layer_schedule_and_share(dit_subject, inputs, helpers):
    from baselines.caching.toca import Toca, layer_ratio

    cfg = Toca.Config(fresh_ratio=0.1)
    ratios = [layer_ratio(cfg, i, 4) for i in range(4)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == pytest.approx(0.45)
    applied = helpers.apply("toca", dit_subject, interval=3, fresh_ratio=0.1)
    helpers.sample(applied.subject, inputs[0])
    expected = sum(int(r * 64) for r in ratios) / (4 * 64)
    assert applied.stats()["mlp_token_fresh_share"] == pytest.approx(expected)


def test_spatial_bonus_prefers_one_token_per_neighbourhood():
    from baselines.caching.toca import spatial_bonus

    score = torch.zeros(1, 16)
    score[0, 0], score[0, 1] = 1.0, 0.9  # same 2x2 cell (tokens 0, 1, 4, 5)
    score[0, 2] = 0.8  # next cell
    out = spatial_bonus(score, 0.6)
    assert out[0, 0] == pytest.approx(1.6) and out[0, 1] == pytest.approx(0.9) and out[0, 2] == pytest.approx(1.28)
    assert out.topk(2).indices.tolist() == [[0, 2]]


def test_caches_reset_between_batches(dit_subject, inputs, helpers):
    a = helpers.apply("toca", dit_subject).subject
    helpers.sample(a, inputs[0])
    second = helpers.sample(a, inputs[1])
    assert torch.equal(second, helpers.sample(helpers.apply("toca", dit_subject).subject, inputs[1]))


def test_config_and_backbone(dit_subject, unet_subject, helpers):
    with pytest.raises(ConfigError, match="fresh_ratio"):
        helpers.apply("toca", dit_subject, fresh_ratio=1.5)
    with pytest.raises(ConfigError, match="ratio_schedule"):
        helpers.apply("toca", dit_subject, ratio_schedule="linear")
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("toca", unet_subject)
