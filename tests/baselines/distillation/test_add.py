"""add (Sauer et al. 2023): with the adversarial weight 0 one training step is the distillation loss's gradient step,
computed here by hand; the R1 term equals its definition; the hinge losses; the student is cached once for 1 to
4 sampling steps; settings errors name the valid range; the FeatureNetwork is not FID's extractor; a smoke run
through the runner."""

from __future__ import annotations

import pytest
import torch

from baselines.distillation import _adversarial as A
from bench.config import ConfigError
from bench.registry import create_method
from tasks._kit import diffusion


class ConvEps(torch.nn.Module):
    """eps(x, t, y) = conv(x) (1 + t / 1000): a tiny denoiser that reads t."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)


def tiny_setup(disc=None):
    abar = diffusion.reference_scheduler().alphas_cumprod.float()
    teacher = ConvEps(1)
    x0 = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    setup = A.Setup(lambda m, x, t, y: m(x, t), lambda x, t, y: teacher(x, t), x0, torch.zeros(16, dtype=torch.int64),
                    abar, 1.0, A.student_grid(diffusion.reference_scheduler()), disc)
    return setup, teacher, abar


def test_the_student_grid_is_the_trailing_four_step_grid():
    assert A.student_grid(diffusion.reference_scheduler()).tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("weighting, student_grad", [("exponential", "x0"), ("uniform", "x0"),
                                                     ("exponential", "eps")])
def test_one_step_at_adversarial_weight_0_is_the_distillation_gradient_step(weighting, student_grad):
    """SGD, adv_weight 0, distill_weight 1: parameters after one step = before - lr * grad of the loss computed
    here from the paper's equation (x0 estimates by hand, the teacher's target without gradient). With
    student_grad "eps" each row's gradient at x_theta is alpha_s / sigma_s times the paper's: here the gradient of
    the surrogate mean_i c_i w_i mean(2 (x_theta,i - x_psi,i) x_theta,i) with the first factor held constant."""
    setup, teacher, abar = tiny_setup()
    student = ConvEps(0)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    lr, seed = 0.05, 11
    A.train(student, setup, steps=1, batch_size=6, lr=lr, disc_lr=1e-3, adv_weight=0.0, distill_weight=1.0,
            r1_gamma=0.0, weighting=weighting, seed=seed, student_grad=student_grad, optimizer="sgd")

    b = A.draw(torch.Generator().manual_seed(seed), 16, 6, 4, (1, 4, 4), 1000)  # the same draws, in order
    hand = ConvEps(0)
    x0 = setup.x0[b.idx]
    s = torch.tensor([999, 749, 499, 249])[b.k]
    a_s = abar[s].reshape(-1, 1, 1, 1)
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * b.noise_s
    x_theta = ((x_s - (1 - a_s).sqrt() * hand(x_s, s)) / a_s.sqrt()).clamp(-1, 1)
    a_t = abar[b.t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = a_t.sqrt() * x_theta + (1 - a_t).sqrt() * b.noise_t
        x_psi = ((x_t - (1 - a_t).sqrt() * teacher(x_t, b.t)) / a_t.sqrt()).clamp(-1, 1)
    c = abar[b.t].sqrt() if weighting == "exponential" else torch.ones(6)
    loss = (c * ((x_theta - x_psi) ** 2).mean(dim=(1, 2, 3))).mean()
    if student_grad == "eps":
        w = (abar[s] / (1 - abar[s])).sqrt()
        loss = (c * w * (2 * (x_theta.detach() - x_psi) * x_theta).mean(dim=(1, 2, 3))).mean()
    grads = torch.autograd.grad(loss, list(hand.parameters()))
    assert abs(float(loss.detach())) > 1e-6 and all(g.abs().sum() > 0 for g in grads)
    for (name, p), g in zip(hand.named_parameters(), grads):
        torch.testing.assert_close(dict(student.named_parameters())[name].detach(), before[name] - lr * g,
                                   rtol=1e-5, atol=1e-7)


def test_the_r1_term_equals_its_definition_and_trains_the_heads():
    """gamma / 2 * mean_i ||grad_{x_i} D(x_i)||^2, each sample's gradient taken alone."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh())
    for p in body.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    disc = A.Discriminator(lambda v, c: [body(v), body(v).mean(dim=(2, 3))], x[:2], y[:2], 3, hidden=8)
    gamma = 0.7
    r1 = A.r1_penalty(disc, x, y, gamma)
    norms = []
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(disc(xi, y[i:i + 1]).sum(), xi)
        norms.append(float((g ** 2).sum()))
    assert float(r1) == pytest.approx(gamma / 2 * sum(norms) / 5, rel=1e-5)
    r1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    assert float(A.hinge_d(real, fake)) == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 1.5) / 3)
    assert float(A.hinge_g(fake)) == pytest.approx(0.5)


def test_an_adversarial_step_moves_the_student_and_the_heads():
    setup, _, _ = tiny_setup()
    body = torch.nn.Conv2d(1, 4, 3, padding=1).requires_grad_(False)
    setup.disc = A.Discriminator(lambda v, c: [body(v)], setup.x0[:2], setup.y[:2], 1, hidden=8)
    heads = {k: v.clone() for k, v in setup.disc.heads.state_dict().items()}
    student = ConvEps(0)
    before = student.conv.weight.detach().clone()
    out = A.train(student, setup, steps=3, batch_size=4, lr=1e-2, disc_lr=1e-2, adv_weight=1.0, distill_weight=0.0,
                  r1_gamma=1.0, weighting="exponential", seed=0)
    assert not torch.equal(student.conv.weight, before)
    assert any(not torch.equal(v, heads[k]) for k, v in setup.disc.heads.state_dict().items())
    assert len(out["losses"]["loss_d"]) == 3 and out["r1_last"] > 0 and not out["losses"]["distill"]
    assert torch.equal(body.weight, body.weight.detach()) and body.weight.grad is None  # the features stay frozen


@pytest.mark.parametrize("bad, expected", [
    ({"num_inference_steps": "5"}, "outside 1 to 4"), ({"num_inference_steps": "0"}, "outside 1 to 4"),
    ({"sampler": "euler"}, "'ancestral', 'ddim'"), ({"weighting": "sds"}, "'exponential', 'uniform'"),
    ({"adv_weight": "-1"}, "adv_weight=-1.0 must be >= 0"), ({"lr": "0"}, "lr=0.0 must be > 0"),
    ({"adv_weight": "0", "distill_weight": "0"}, "nothing to train"), ({"r1_gamma": "-0.1"}, "must be >= 0")])
def test_bad_settings_are_refused_with_the_valid_range(bad, expected):
    with pytest.raises(ConfigError, match=expected):
        create_method("add", bad)


SMOKE = {"batch_size": "4"}


def test_the_feature_network_is_frozen_and_not_fids_extractor(digits_gen, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    task, _, ctx = digits_gen
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    net = task.feature_network(ctx)
    assert all(not p.requires_grad for p in net.parameters()) and not net.training
    fid_weights = load_file(str(task.classifier_path(ctx)))
    assert not torch.allclose(net.body[0].weight, fid_weights["0.weight"])
    again = task.feature_network(ctx)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    shapes = [tuple(f.shape) for f in net(task.training_split().x[:3])]
    assert shapes == [(3, 16, 8, 8), (3, 32, 4, 4), (3, 64)]


def test_one_student_serves_one_to_four_steps_and_the_reference_is_untouched(digits_gen, tmp_path, monkeypatch):
    task, ref, ctx = digits_gen
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    four = create_method("add", {**SMOKE, "num_inference_steps": "4", "sampler": "ancestral"}).apply(ref, task, ctx)
    assert four.cost.steps == 20 and four.cost.samples_seen == 80 and four.cost.seconds > 0
    assert [c.name for c in four.controls] == ["teacher_ddim_same_steps"]
    assert any(not torch.equal(v, before[k]) for k, v in four.subject.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())

    monkeypatch.setattr(A, "train", lambda *a, **k: pytest.fail("trained again: the key holds a sampling setting"))
    one = create_method("add", {**SMOKE, "num_inference_steps": "1", "sampler": "ddim"}).apply(ref, task, ctx)
    assert one.cost.seconds == four.cost.seconds
    assert all(torch.equal(v, four.subject.model.state_dict()[k]) for k, v in one.subject.model.state_dict().items())
    noise, labels = diffusion.eval_inputs(4, 7)
    x1, x4 = diffusion.sample(one.subject, noise, labels), diffusion.sample(four.subject, noise, labels)
    assert one.stats()["nfe"] == 1 and four.stats()["nfe"] == 4
    assert torch.equal(x4, diffusion.sample(four.subject, noise, labels))  # ancestral, yet deterministic per image
    assert torch.isfinite(x1).all() and not torch.equal(x1, x4)
    with pytest.raises(BaseException, match="trained again"):  # a weight-shaping setting is another student
        create_method("add", {**SMOKE, "lr": "2e-5"}).apply(ref, task, ctx)


@pytest.mark.slow  # ~1-2 min: the reference's smoke evaluation (DDIM-50), 20 ADD steps, the control
def test_smoke_run_on_digits_gen_through_the_runner(results_root):
    from bench.runner import run
    from bench.store import load_result

    out = run("digits-gen", "add", budget="smoke", overrides={"num_inference_steps": "1"}, results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.method_stats["nfe"] == 1 and r.cost.steps == 20 and r.cost.seconds > 0
    assert r.compute.method < r.compute.reference and "class_accuracy" in r.quality.secondary
    assert [c.name for c in r.controls] == ["teacher_ddim_same_steps"]
