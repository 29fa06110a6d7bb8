"""progressive (Salimans & Ho 2022): the batched DDIM step against diffusers', the two-step target and the loss on
a hand-made linear epsilon-model where both have a closed form, a round that trains towards that target, the
config's validation, and the method end to end on digits-gen (smoke budget, cached, deterministic)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from baselines.distillation import _progressive as P
from bench.config import ConfigError
from bench.registry import create_method
from tasks._kit import diffusion


def test_batched_ddim_step_reproduces_diffusers_ddim_over_whole_loops():
    """The per-example step (the teacher's in training) is diffusers' DDIMScheduler.step (eta 0, x0 clipped by
    the task's thresholding), including its destination t - T // n that the trailing list does not share."""
    cfg = diffusion.reference_scheduler().config
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 4, 4, generator=gen)

    def eps_fn(x, t):  # any deterministic function of (x, t) with O(1) outputs
        return torch.tanh(0.7 * x + w * (t.float().reshape(-1, 1, 1, 1) / 1000))

    for n in (4, 8, 16, 32, 64):
        s = type(diffusion.reference_scheduler()).from_config(cfg)
        s.set_timesteps(n)
        plan = P.ddim_plan(cfg, n)
        assert torch.equal(plan.timesteps, s.timesteps)
        x = torch.randn(3, 1, 4, 4, generator=gen)
        z = x.clone()
        for k, t in enumerate(s.timesteps):
            x = s.step(eps_fn(x, t[None]), t, x).prev_sample
            idx = torch.full((3,), k)
            z, _ = P.ddim_step(eps_fn(z, plan.timesteps[idx]), z, plan.abar[idx], plan.abar_prev[idx],
                               P.x0_clip(cfg))
        torch.testing.assert_close(z, x, rtol=1e-5, atol=1e-5)
    assert P.x0_clip(cfg) == 1.0  # the task clips x0 to [-1, 1]


class LinearEps(torch.nn.Module):
    """eps(x, t) = k[t] x: one scalar per training timestep, so one DDIM step is z -> c(a, a', k) z."""

    def __init__(self, k0: float):
        super().__init__()
        self.k = torch.nn.Parameter(torch.full((1000,), k0, dtype=torch.float64))

    def forward(self, x, t):
        return self.k[t].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * x


def denoise_linear(model, x, t, labels, step_index):
    return model(x, t.expand(x.shape[0]) if t.ndim == 0 else t)


def c(a: float, ap: float, k: float) -> float:
    """One unclipped DDIM step with eps = k z, from alpha-bar a to a': z' = c z,
    c = sqrt(a'/a) + k (sqrt(1 - a') - sqrt(a' (1 - a) / a))."""
    return math.sqrt(ap / a) + k * (math.sqrt(1 - ap) - math.sqrt(ap * (1 - a) / a))


def hand_target(tplan, splan, i: int, k: float) -> tuple[float, float]:
    """(m, z''/z): x~ = m z for the linear teacher's two steps merged into student step i, by hand."""
    a = lambda v, j: float(v[j])  # noqa: E731
    c1 = c(a(tplan.abar, 2 * i), a(tplan.abar_prev, 2 * i), k)
    c2 = c(a(tplan.abar, 2 * i + 1), a(tplan.abar_prev, 2 * i + 1), k)
    s_a, s_ap = a(splan.abar, i), a(splan.abar_prev, i)
    r = math.sqrt(1 - s_ap) / math.sqrt(1 - s_a)
    return (c2 * c1 - r) / (math.sqrt(s_ap) - r * math.sqrt(s_a)), c2 * c1


def test_one_round_with_the_student_equal_to_the_teacher_computes_its_loss_against_two_teacher_steps():
    """Hand-made case: the linear epsilon-model, a 4-step teacher merged into a 2-step student, no clipping.
    The target x~ is the hand-computed x of one student step landing on the teacher's two steps (z''), and
    each loss of the student-as-teacher is computed against it, by hand."""
    cfg = diffusion.reference_scheduler().config
    tplan, splan = P.ddim_plan(cfg, 4), P.ddim_plan(cfg, 2)
    k0 = 0.4
    teacher, student = LinearEps(k0), LinearEps(k0)
    z = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.int64)
    index = torch.tensor([0, 1, 0, 1, 1, 0])
    x_t, z2 = P.two_step_target(teacher, denoise_linear, z, labels, index, tplan, splan, clip=None)
    m = torch.tensor([hand_target(tplan, splan, int(i), k0)[0] for i in index], dtype=torch.float64)
    zz = torch.tensor([hand_target(tplan, splan, int(i), k0)[1] for i in index], dtype=torch.float64)
    torch.testing.assert_close(x_t, m.reshape(-1, 1, 1, 1) * z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z2, zz.reshape(-1, 1, 1, 1) * z, rtol=1e-10, atol=1e-12)
    assert float(splan.abar_prev[1]) == 1.0  # the last student step ends at alpha-bar 1: there x~ = z'' = x0

    # the loss of the student (still the teacher) against that target, by hand
    a = splan.abar[index].reshape(-1, 1, 1, 1)
    x_hat = (z - (1 - a).sqrt() * k0 * z) / a.sqrt()
    w = (splan.abar[index] / (1 - splan.abar[index])).clamp(min=1)
    expected = (w * ((x_hat - m.reshape(-1, 1, 1, 1) * z) ** 2).flatten(1).mean(1)).mean()
    loss = P.student_loss(student, denoise_linear, z, labels, index, splan, x_t, z2, "truncated-snr", None)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    assert float(loss.detach()) > 1e-3  # two teacher steps are not one: there is something to learn
    # SNR weighting is the epsilon MSE against the target's epsilon~ = (z - alpha x~) / sigma
    eps_t = (z - a.sqrt() * x_t) / (1 - a).sqrt()
    torch.testing.assert_close(P.student_loss(student, denoise_linear, z, labels, index, splan, x_t, z2, "snr", None),
                               ((k0 * z - eps_t) ** 2).flatten(1).mean(1).mean(), rtol=1e-8, atol=1e-12)
    # "sampler": the student's one step against the teacher's two, || c(a, a', k) z - c2 c1 z ||^2, which is the
    # x-space loss weighted by (alpha'' - (sigma''/sigma) alpha)^2
    ap = splan.abar_prev[index].reshape(-1, 1, 1, 1)
    one = torch.tensor([c(float(splan.abar[i]), float(splan.abar_prev[i]), k0) for i in index],
                       dtype=torch.float64).reshape(-1, 1, 1, 1) * z
    d2 = (ap.sqrt() - ((1 - ap) / (1 - a)).sqrt() * a.sqrt()) ** 2
    sampler = P.student_loss(student, denoise_linear, z, labels, index, splan, x_t, z2, "sampler", None)
    torch.testing.assert_close(sampler, ((one - z2) ** 2).flatten(1).mean(1).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(sampler, (d2 * (x_hat - x_t) ** 2).flatten(1).mean(1).mean(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("weighting", ["sampler", "truncated-snr"])
def test_a_round_trains_the_student_towards_the_teacher_s_two_steps_merged(weighting):
    """From the teacher's k, the student's k[t_i] moves to the k* whose one step equals the teacher's two,
    c(a, a', k*) = c2 c1 (hand-computed), for each of its steps; nothing else moves."""
    cfg = diffusion.reference_scheduler().config
    tplan, splan = P.ddim_plan(cfg, 4), P.ddim_plan(cfg, 2)
    k0 = 0.4
    teacher, student = LinearEps(k0), LinearEps(k0)
    data_x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.5
    rec = P.distill_round(teacher, student, denoise_linear, data_x, torch.zeros(64, dtype=torch.int64), tplan,
                          splan, None, steps=400, batch_size=16, lr=0.02, weighting=weighting,
                          gen=torch.Generator().manual_seed(0))
    assert rec["steps"] == 400 and rec["loss_last"] < 1e-3 * rec["loss_first"]
    for i in range(2):
        a_, ap_ = float(splan.abar[i]), float(splan.abar_prev[i])
        k_star = (hand_target(tplan, splan, i, k0)[1] - math.sqrt(ap_ / a_)) / (
            math.sqrt(1 - ap_) - math.sqrt(ap_ * (1 - a_) / a_))
        t = int(splan.timesteps[i])
        assert abs(k_star - k0) > 0.01
        assert abs(float(student.k.detach()[t]) - k_star) < 1e-3 * max(1.0, abs(k_star)), (i, k_star)
    assert torch.equal(teacher.k, torch.full((1000,), k0, dtype=torch.float64))  # the teacher stays frozen
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[splan.timesteps] = False
    assert torch.equal(student.k[untouched], teacher.k[untouched])


def test_the_target_is_clipped_to_the_data_range_when_the_sampler_clips():
    cfg = diffusion.reference_scheduler().config
    tplan, splan = P.ddim_plan(cfg, 8), P.ddim_plan(cfg, 4)
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3)) * 3
    index = torch.arange(8) % 4
    free, _ = P.two_step_target(LinearEps(-2.0), denoise_linear, z, None, index, tplan, splan, clip=None)
    clipped, _ = P.two_step_target(LinearEps(-2.0), denoise_linear, z, None, index, tplan, splan, clip=1.0)
    assert free.abs().max() > 1 and clipped.abs().max() <= 1


def test_config_validation_and_rounds():
    cfg = create_method("progressive").config
    assert cfg.rounds() == [(32, 16), (16, 8), (8, 4)]
    assert create_method("progressive", {"teacher_steps": "8", "target_steps": "1"}).config.rounds() == [
        (8, 4), (4, 2), (2, 1)]
    with pytest.raises(ConfigError, match="power of two.*8, 16, 32"):
        create_method("progressive", {"teacher_steps": "12"})
    with pytest.raises(ConfigError, match="power of two"):
        create_method("progressive", {"teacher_steps": "4", "target_steps": "4"})
    with pytest.raises(ConfigError, match="truncated-snr"):
        create_method("progressive", {"weighting": "min-snr"})
    for bad in ({"steps_per_round": "0"}, {"lr": "0"}, {"batch_size": "0"}, {"target_steps": "0"}):
        with pytest.raises(ConfigError):
            create_method("progressive", bad)
    with pytest.raises(ValueError, match="epsilon"):
        P.x0_clip(dict(diffusion.reference_scheduler().config) | {"prediction_type": "v_prediction"})


SMOKE = {"teacher_steps": "8", "target_steps": "4", "batch_size": "8"}


def test_smoke_apply_on_digits_gen_is_cached_deterministic_and_samples_with_the_student(digits_gen, tmp_path,
                                                                                          monkeypatch):
    from baselines.distillation import progressive

    task, ref, ctx = digits_gen
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "a"))
    applied = create_method("progressive", SMOKE).apply(ref, task, ctx)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "b"))
    again = create_method("progressive", SMOKE).apply(ref, task, ctx)
    for k, v in applied.subject.model.state_dict().items():  # trained twice from scratch: bit for bit the same
        assert torch.equal(v, again.subject.model.state_dict()[k])
    assert any(not torch.equal(v, before[k]) for k, v in applied.subject.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())  # the reference untouched

    extra = applied.subject.extra
    assert type(extra["scheduler"]).__name__ == "DDIMScheduler" and extra["num_inference_steps"] == 4
    assert extra["scheduler"].config.thresholding and ref.extra["num_inference_steps"] == 50
    noise, labels = diffusion.eval_inputs(4, 7)
    images = diffusion.sample(applied.subject, noise, labels)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    stats = applied.stats()
    assert stats["nfe"] == 4 and stats["round1_teacher_steps"] == 8 and stats["round1_student_steps"] == 4
    assert stats["round1_steps"] == progressive.SMOKE_ROUND_STEPS == applied.cost.steps
    assert stats["round1_mse_student"] >= 0 and stats["round1_mse_naive"] > 0 and "round2_steps" not in stats
    assert applied.cost.seconds > 0 and applied.cost.samples_seen == 2 * 8
    assert [c.name for c in applied.controls] == ["teacher_ddim_same_steps"]

    # a third apply finds the student in the cache: no training, same weights, same recorded cost
    monkeypatch.setattr(progressive, "distill", lambda *a, **k: pytest.fail("trained again despite the cache"))
    cached = create_method("progressive", SMOKE).apply(ref, task, ctx)
    assert cached.cost.seconds == again.cost.seconds
    for k, v in cached.subject.model.state_dict().items():
        assert torch.equal(v, again.subject.model.state_dict()[k])


def test_the_cache_key_is_stable_across_processes_and_follows_what_the_student_depends_on(digits_gen):
    """diffusers' `_use_default_values` comes from a set, so its order changes between processes: the key must
    not see it; the teacher's weights, the schedule and the config must change it."""
    import copy
    import dataclasses

    from baselines.distillation.progressive import student_key

    task, ref, ctx = digits_gen
    cfg = create_method("progressive").config
    key = student_key(ref, task, cfg, ctx)
    sched = ref.extra["scheduler"]
    used = list(sched.config["_use_default_values"])
    assert len(used) > 1
    shuffled = SimpleNamespace(config=dict(sched.config) | {"_use_default_values": used[::-1]})
    assert student_key(dataclasses.replace(ref, extra=dict(ref.extra, scheduler=shuffled)), task, cfg, ctx) == key
    other = type(sched).from_config(sched.config, beta_end=0.03)
    assert student_key(dataclasses.replace(ref, extra=dict(ref.extra, scheduler=other)), task, cfg, ctx) != key
    assert student_key(ref, task, dataclasses.replace(cfg, lr=2e-4), ctx) != key
    model = copy.deepcopy(ref.model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert student_key(dataclasses.replace(ref, model=model), task, cfg, ctx) != key


def test_a_task_without_training_images_is_refused_with_the_reason(digits_gen):
    _, ref, ctx = digits_gen
    with pytest.raises(ValueError, match="training images"):
        create_method("progressive").apply(ref, object(), ctx)
