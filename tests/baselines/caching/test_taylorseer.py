"""taylorseer on the digits-gen DiT: exact at interval 1, order 0 is FORA, the expansion itself, agreement with
diffusers' TaylorSeer hook on the same modules and schedule, resets."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_reproduces_the_uncached_sampler(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("taylorseer", dit_subject, interval=1, order=2)
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interval", [2, 3])
def test_order_zero_is_exactly_fora(dit_subject, inputs, helpers, interval):
    ts = helpers.apply("taylorseer", dit_subject, interval=interval, order=0)
    fora = helpers.apply("fora", dit_subject, interval=interval)
    assert torch.equal(helpers.sample(ts.subject, inputs[0]), helpers.sample(fora.subject, inputs[0]))
    assert ts.stats() == fora.stats()


def test_the_expansion():
    """F(s0 + k) = F + D1 k + D2 k^2 / 2 with divided differences D over the full steps; linear features are
    forecast exactly from order 1 on, not by reuse."""
    from baselines.caching.taylorseer import TaylorFactors

    f = TaylorFactors(2)
    for s, v in ((0, 1.0), (3, 4.0), (6, 10.0)):
        f.update(torch.tensor([v]), s)
    d1, d1_prev = (10.0 - 4.0) / 3, (4.0 - 1.0) / 3
    d2 = (d1 - d1_prev) / 3
    assert f.predict(8).item() == pytest.approx(10.0 + d1 * 2 + d2 * 4 / 2)
    for order, exact in ((1, True), (2, True), (0, False)):
        f = TaylorFactors(order)
        for s in (0, 3, 6):
            f.update(torch.tensor([2.0 + 0.5 * s]), s)
        assert (f.predict(8).item() == pytest.approx(6.0)) is exact


def test_bf16_features_are_differenced_in_float32():
    """Two bf16 features that differ in their last bits: their difference in bf16 is rounded to bf16's 8-bit
    mantissa; the factors are float32, so the difference is that of the upcast values exactly, and the
    forecast comes back in the feature's dtype."""
    from baselines.caching.taylorseer import TaylorFactors

    a = torch.tensor([100.0, 3.0], dtype=torch.bfloat16)
    b = torch.tensor([100.5, 3.0078125], dtype=torch.bfloat16)  # both exactly representable in bf16
    f = TaylorFactors(1)
    f.update(a, 0)
    f.update(b, 3)
    assert f.factors[1].dtype == torch.float32
    assert torch.equal(f.factors[1], (b.float() - a.float()) / 3)
    out = f.predict(4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (b.float() + (b.float() - a.float()) / 3).to(torch.bfloat16))


def test_agrees_with_diffusers_taylorseer(dit_subject, inputs, helpers):
    """Same modules (every block's attn1 and ff), same schedule, float32 factors: the same samples."""
    from baselines.caching.diffusers_taylorseer import diffusers_full_step
    from baselines.caching.taylorseer import taylorseer_subject

    interval, order, warmup = 3, 2, 1
    ours, _ = taylorseer_subject(dit_subject, order, lambda i: diffusers_full_step(i, interval, warmup))
    lib = helpers.apply("diffusers-taylorseer", dit_subject, interval=interval, order=order, warmup=warmup)
    a, b = helpers.sample(ours, inputs[0]), helpers.sample(lib.subject, inputs[0])
    ref = helpers.sample(dit_subject, inputs[0])
    print(f"\nmax |ours - diffusers| = {float((a - b).abs().max()):.3g}; "
          f"max |ours - uncached| = {float((a - ref).abs().max()):.3g}")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, ref, atol=1e-4)


def test_caches_reset_between_batches(dit_subject, inputs, helpers):
    a = helpers.apply("taylorseer", dit_subject, interval=3).subject
    helpers.sample(a, inputs[0])
    second = helpers.sample(a, inputs[1])
    assert torch.equal(second, helpers.sample(helpers.apply("taylorseer", dit_subject, interval=3).subject, inputs[1]))


def test_config_and_backbone(dit_subject, unet_subject, helpers):
    with pytest.raises(ConfigError, match="order"):
        helpers.apply("taylorseer", dit_subject, order=-1)
    with pytest.raises(ConfigError, match="warmup"):
        helpers.apply("taylorseer", dit_subject, warmup=0)
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("taylorseer", unet_subject)
