"""ladd (Sauer et al. 2024): the discriminator reads the frozen teacher's own blocks at noised inputs (the UNet's pass
stops at its mid block; gradients reach the input, never the teacher); its noise level follows LADD's logit-normal
mapped by SNR; the training set is the reference's own samples with their labels; with the adversarial weight 0
one step is the distillation loss's gradient step on that set (by hand, on the digits UNet); R1 on the teacher's
features equals its definition; one student for 1 to 4 steps; settings errors; a smoke run through the runner."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.distillation import _adversarial as A
from baselines.distillation import ladd
from bench.config import ConfigError
from bench.registry import create_method
from tasks._kit import diffusion


def test_the_discriminator_noise_level_is_logit_normal_in_flow_time_mapped_by_snr():
    abar = diffusion.reference_scheduler().alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    t = ladd.disc_timesteps(abar, 2000, 0.0, 1e-6, gen)  # u = 1/2: SNR 1, abar 1/2
    assert (t == t[0]).all() and abar[t[0]] <= 0.5 < abar[t[0] - 1]
    high = ladd.disc_timesteps(abar, 2000, 1.0, 1.0, gen).float().mean()
    low = ladd.disc_timesteps(abar, 2000, -1.0, 1.0, gen).float().mean()
    assert high > t[0] > low  # m = 1 (LADD's choice) favours noisier levels


def test_teacher_features_stop_at_the_mid_block_and_pass_gradients_to_the_input_only(digits_gen):
    _, ref, _ = digits_gen
    model = ref.model
    up_calls = []
    h = model.up_blocks[0].register_forward_hook(lambda *a: up_calls.append(1))
    feats = ladd.teacher_features(model, ref.extra["denoise"], ref.extra["scheduler"].alphas_cumprod, 1.0, 1.0, 0)
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    try:
        out = feats(x, torch.tensor([1, 2, 3]))
    finally:
        h.remove()
    assert not up_calls  # the decoder half never runs
    assert [tuple(f.shape) for f in out] == [(3, 32, 8, 8), (3, 48, 4, 4), (3, 64, 4, 4), (3, 64, 4, 4)]
    sum(f.sum() for f in out).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="down_blocks"):
        ladd.feature_modules(torch.nn.Linear(2, 2))


def test_r1_on_the_teacher_features_equals_its_definition(digits_gen):
    """gamma / 2 * mean_i ||grad_{x_i} D(x_i)||^2 with the teacher's features at fixed noise draws (two feature
    functions from the same seed draw the same t and noise); the gradient taken without the penalty's graph."""
    _, ref, _ = digits_gen
    abar = ref.extra["scheduler"].alphas_cumprod
    x, y = torch.rand(3, 1, 16, 16) * 2 - 1, torch.tensor([4, 5, 6])
    f1 = ladd.teacher_features(ref.model, ref.extra["denoise"], abar, 1.0, 1.0, 5)
    f2 = ladd.teacher_features(ref.model, ref.extra["denoise"], abar, 1.0, 1.0, 5)
    d1 = A.Discriminator(f1, x[:1], y[:1], 10, hidden=8, seed=0)
    d2 = A.Discriminator(f2, x[:1], y[:1], 10, hidden=8, seed=0)
    r1 = A.r1_penalty(d1, x, y, 2.0)
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d2(xi, y).sum(), xi)  # rows are independent: the gradient of the sum is per row
    assert float(r1) == pytest.approx(2.0 / 2 * float((g ** 2).sum()) / 3, rel=1e-4)
    assert float(r1) > 0


def test_one_step_at_adversarial_weight_0_is_the_distillation_gradient_step_on_teacher_samples(digits_gen, tmp_path,
                                                                                                   monkeypatch):
    """LADD's own setup (the reference's samples, its labels, the digits UNet as student and teacher), SGD,
    adv_weight 0, distill_weight 1, student_grad x0: parameters after = before - lr * grad of the hand loss."""
    task, ref, ctx = digits_gen
    method = create_method("ladd", {"teacher_samples": "6", "adv_weight": "0", "distill_weight": "1"})
    setup, note, extra = method.setup(ref, task, ctx)
    assert extra["teacher_samples"] == 6 and "sampled from the reference" in note
    # the training set is the task's calibration sampling, labels as the sampler was given them
    torch.testing.assert_close(setup.x0, task.sample_calibration(ref, 6, ctx).float())
    assert setup.y.shape == (6,) and setup.y.dtype == torch.int64
    student = copy.deepcopy(ref.model).float().requires_grad_(True)
    hand = copy.deepcopy(student)
    lr, seed = 1e-3, 3
    A.train(student, setup, steps=1, batch_size=3, lr=lr, disc_lr=1e-4, adv_weight=0.0, distill_weight=1.0,
            r1_gamma=0.0, weighting="exponential", seed=seed, student_grad="x0", optimizer="sgd")

    abar = ref.extra["scheduler"].alphas_cumprod.float()
    b = A.draw(torch.Generator().manual_seed(seed), 6, 3, 4, (1, 16, 16), 1000)
    x0, y = setup.x0[b.idx], setup.y[b.idx]
    s = torch.tensor([999, 749, 499, 249])[b.k]
    a_s = abar[s].reshape(-1, 1, 1, 1)
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * b.noise_s
    eps = hand(x_s, s, class_labels=y).sample
    x_theta = ((x_s - (1 - a_s).sqrt() * eps) / a_s.sqrt()).clamp(-1, 1)
    a_t = abar[b.t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = a_t.sqrt() * x_theta + (1 - a_t).sqrt() * b.noise_t
        x_psi = ((x_t - (1 - a_t).sqrt() * ref.model(x_t, b.t, class_labels=y).sample) / a_t.sqrt()).clamp(-1, 1)
    loss = (abar[b.t].sqrt() * ((x_theta - x_psi) ** 2).mean(dim=(1, 2, 3))).mean()
    names = [n for n, _ in hand.named_parameters()]
    grads = torch.autograd.grad(loss, list(hand.parameters()), allow_unused=True)
    after = dict(student.named_parameters())
    moved = 0
    for n, p, g in zip(names, hand.parameters(), grads):
        want = p.detach() if g is None else p.detach() - lr * g
        torch.testing.assert_close(after[n].detach(), want, rtol=1e-4, atol=1e-7)
        moved += int(g is not None and bool(g.abs().sum() > 0))
    assert moved > 10


def test_one_student_serves_one_to_four_steps_and_says_data_free(digits_gen, tmp_path, monkeypatch):
    task, ref, ctx = digits_gen
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    cfg = {"teacher_samples": "8", "batch_size": "4"}
    four = create_method("ladd", cfg).apply(ref, task, ctx)
    assert four.cost.steps == 20 and "real data seen 0" in four.cost.description
    noise, labels = diffusion.eval_inputs(2, 7)
    diffusion.sample(four.subject, noise, labels)
    stats = four.stats()
    assert stats["nfe"] == 4 and stats["teacher_samples"] == 8 and stats["teacher_sampling_seconds"] > 0
    assert "adv_first" in stats and "distill_first" not in stats  # LADD drops the distillation loss by default
    monkeypatch.setattr(A, "train", lambda *a, **k: pytest.fail("trained again: the key holds a sampling setting"))
    one = create_method("ladd", {**cfg, "num_inference_steps": "1"}).apply(ref, task, ctx)
    diffusion.sample(one.subject, noise, labels)
    assert one.stats()["nfe"] == 1 and one.cost.seconds == four.cost.seconds
    assert all(torch.equal(v, four.subject.model.state_dict()[k]) for k, v in one.subject.model.state_dict().items())


@pytest.mark.parametrize("bad, expected", [
    ({"num_inference_steps": "8"}, "outside 1 to 4"), ({"teacher_samples": "0"}, "teacher_samples=0 must be >= 1"),
    ({"disc_t_std": "0"}, "disc_t_std=0.0 must be > 0"), ({"student_grad": "v"}, "'eps', 'x0'"),
    ({"adv_weight": "0"}, "nothing to train")])
def test_bad_settings_are_refused_with_the_valid_range(bad, expected):
    with pytest.raises(ConfigError, match=expected):
        create_method("ladd", bad)


@pytest.mark.slow  # ~1-2 min: the reference's smoke evaluation, 8 teacher samples, 20 LADD steps, the control
def test_smoke_run_on_digits_gen_through_the_runner(results_root):
    from bench.runner import run
    from bench.store import load_result

    out = run("digits-gen", "ladd", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.method_stats["nfe"] == 4 and r.cost.steps == 20
    assert "data-free" in r.cost.description and [c.name for c in r.controls] == ["teacher_ddim_same_steps"]
