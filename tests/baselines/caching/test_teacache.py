"""teacache on the digits-gen DiT: exact when every step runs, the accumulator of eq. 5 by hand, a reused step is
the cached residual added to the new embedding, the rescaling fit, calibration through the task's capability."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.api import CalibrationSampling
from bench.config import ConfigError


class CalibrationTask(CalibrationSampling):
    """A stand-in task that samples its calibration inputs with the digits kit (noise of seed 99)."""

    def __init__(self):
        self.calls = []

    def sample_calibration(self, subject, n, ctx):
        from tasks._kit.diffusion import eval_inputs, generate

        self.calls.append(n)
        return generate(subject, *eval_inputs(n, 99), batch_size=n)


def test_threshold_zero_computes_every_step_exactly(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("teacache", dit_subject, threshold=0, rescale="none")
    torch.testing.assert_close(helpers.sample(applied.subject, inputs[0]), ref, rtol=1e-5, atol=1e-5)
    s = applied.stats()
    assert s["nfe_full"] == helpers.steps and s["nfe_partial"] == 0


def test_a_large_threshold_computes_only_the_first_and_last_steps(dit_subject, inputs, helpers):
    ref = helpers.sample(dit_subject, inputs[0])
    applied = helpers.apply("teacache", dit_subject, threshold=1e9, rescale="none")
    out = helpers.sample(applied.subject, inputs[0])
    s = applied.stats()
    assert s["nfe_full"] == 2 and s["nfe_partial"] == helpers.steps - 2
    assert torch.allclose(out[0], ref[0], rtol=1e-5, atol=1e-5)  # step 0 is computed
    assert not torch.allclose(out[1:-1], ref[1:-1], atol=1e-4)


def test_the_accumulator_follows_eq_5_by_hand():
    from baselines.caching.teacache import Accumulator

    acc = Accumulator(threshold=0.5, rescale=lambda x: 2 * x)
    base = torch.ones(4)
    # relative changes 0.1, 0.1, 0.2, 0.05 -> rescaled 0.2, 0.2, 0.4, 0.1; accumulated 0.2, 0.4, 0.8 (>= 0.5: run,
    # reset), 0.1
    seq = [base, base * 1.1, base * 1.1 * 1.1, base * 1.1 * 1.1 * 1.2, base * 1.1 * 1.1 * 1.2 * 1.05, base]
    flags = [acc.compute(f, i, last_step=5) for i, f in enumerate(seq)]
    assert flags == [True, False, False, True, False, True]  # the last step always runs


def test_a_negative_rescaled_change_does_not_lower_the_accumulator():
    from baselines.caching.teacache import Accumulator

    acc = Accumulator(threshold=0.15, rescale=lambda x: x - 1.0)  # every change maps below zero
    base = torch.ones(3)
    assert [acc.compute(base * (1 + 0.1 * i), i, last_step=9) for i in range(4)] == [True, False, False, False]
    assert acc.acc == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_reused_step_adds_the_cached_residual_to_the_new_embedding(inputs, helpers, dtype):
    """h_L(t) = h_0(t) + (h_L - h_0)(t_full), the residual held in float32 (a bf16 difference of two nearby
    states would keep few of its bits), the sum cast back to the model's dtype."""
    from baselines.caching._dit import dit_blocks, dit_head

    base = helpers.make_subject("dit")
    m = base.model.to(dtype)
    seen = []
    inner = base.extra["denoise"]

    def recording(model, x, t, labels, i):
        seen.append((x.clone(), t, labels))
        return inner(model, x, t, labels, i)

    subject = dataclasses.replace(base, model=m, extra=dict(base.extra, denoise=recording))
    applied = helpers.apply("teacache", subject, threshold=1e9, rescale="none")
    noise, labels = inputs[0]
    out = helpers.sample(applied.subject, (noise.to(dtype), labels))
    with torch.inference_mode():
        x0, t0, y = seen[0]
        t0 = t0.expand(x0.shape[0])
        h0 = m.pos_embed(x0)
        residual = dit_blocks(m, h0, t0, y, lambda i, mod, f, z: f(z)).float() - h0.float()
        x1, t1, _ = seen[1]
        t1 = t1.expand(x1.shape[0])
        h1 = m.pos_embed(x1)
        expected = dit_head(m, (h1.float() + residual).to(dtype), t1, y)
    assert out.dtype == dtype
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-5)


def test_the_fit_recovers_a_polynomial():
    from baselines.caching.teacache import fit_rescale

    xs = [0.01 * i for i in range(1, 30)]
    f, coeffs = fit_rescale([(x, 3 * x ** 2 + 0.5 * x + 0.01) for x in xs], degree=2)
    assert coeffs == pytest.approx([3.0, 0.5, 0.01], abs=1e-8)
    assert f(0.2) == pytest.approx(3 * 0.04 + 0.1 + 0.01)
    with pytest.raises(ValueError, match="calibration_samples"):
        fit_rescale([(0.1, 0.1), (0.2, 0.2)], degree=4)


def test_calibration_runs_through_the_task_and_fits_on_full_trajectories(dit_subject, inputs, helpers):
    from bench import registry

    task = CalibrationTask()
    method = registry.create_method("teacache", {"calibration_samples": "3", "degree": "2"})
    applied = method.apply(dit_subject, task, None)
    assert task.calls == [3]
    s = applied.stats()
    assert s["calibration_pairs"] == helpers.steps - 1  # one batch, one branch: a pair per consecutive steps
    assert {"rescale_coefficient_0", "rescale_coefficient_1", "rescale_coefficient_2"} <= set(s)
    assert applied.cost.seconds > 0 and applied.cost.samples_seen == 3
    assert s["nfe_full"] == 0  # calibration is not counted as the method's work
    helpers.sample(applied.subject, inputs[0])
    assert applied.stats()["nfe_full"] + applied.stats()["nfe_partial"] == helpers.steps


def test_fitting_needs_a_task_that_samples_calibration_inputs(dit_subject):
    from bench import registry
    from bench.api import CapabilityMissing

    with pytest.raises(CapabilityMissing, match="CalibrationSampling"):
        registry.create_method("teacache", {}).apply(dit_subject, object(), None)


def test_a_denoise_that_bypasses_the_model_it_is_given_raises(dit_subject, inputs, helpers):
    from baselines.caching._common import CacheNeverUsed

    real = dit_subject.model

    def bypass(model, x, t, labels, i):
        return real(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample

    subject = dataclasses.replace(dit_subject, extra=dict(dit_subject.extra, denoise=bypass))
    with pytest.raises(CacheNeverUsed):
        helpers.sample(helpers.apply("teacache", subject, rescale="none").subject, inputs[0])


def test_state_resets_between_batches(dit_subject, inputs, helpers):
    a = helpers.apply("teacache", dit_subject, threshold=0.2, rescale="none").subject
    helpers.sample(a, inputs[0])
    second = helpers.sample(a, inputs[1])
    fresh = helpers.apply("teacache", dit_subject, threshold=0.2, rescale="none").subject
    assert torch.equal(second, helpers.sample(fresh, inputs[1]))


@pytest.mark.parametrize("key, value, match", [("threshold", -1, "threshold"), ("rescale", "poly", "fit, none"),
                                               ("degree", 0, "degree"), ("calibration_samples", 0,
                                                                         "calibration_samples")])
def test_settings_are_checked(dit_subject, helpers, key, value, match):
    with pytest.raises(ConfigError, match=match):
        helpers.apply("teacache", dit_subject, **{key: value})


def test_a_unet_is_refused(unet_subject, helpers):
    with pytest.raises(ValueError, match="needs a DiT"):
        helpers.apply("teacache", unet_subject, rescale="none")


def test_the_digits_tasks_calibrate_on_noise_no_evaluation_uses():
    from tasks._kit.diffusion import eval_inputs
    from tasks.digits_gen import CALIBRATION_SEED, WORKLOAD_SEED

    assert CALIBRATION_SEED not in (0, WORKLOAD_SEED)
    assert not torch.equal(eval_inputs(4, CALIBRATION_SEED)[0], eval_inputs(4, 0)[0])
