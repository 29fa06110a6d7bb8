"""freeflow (Tong et al. 2025): the epsilon-to-velocity conversion against the exact probability-flow ODE and
DDIM on Gaussian data, the flow map's identity at s = t, the untrained student as the reference's DDIM, the
predictor's target and data-free start states, the corrector's gradient, config validation, one cached student
for every step count, and the method end to end on digits-gen (smoke budget)."""

from __future__ import annotations

import pytest
import torch

from baselines.distillation import _freeflow as F
from bench.config import ConfigError
from bench.registry import create_method
from tasks._kit import diffusion

MU, S = 0.3, 0.5  # the Gaussian data N(MU, S^2) of the closed-form tests


def ab_of(alpha_bar):
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return a.sqrt(), (1 - a).sqrt()


def eps_star(x, alpha_bar):
    """The exact epsilon-model of x0 ~ N(MU, S^2): E[eps | x_t] = sigma (x - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    a, s = ab_of(alpha_bar)
    a, s = F.col(a.reshape(-1), x), F.col(s.reshape(-1), x)
    return s * (x - a * MU) / (a * a * S * S + s * s)


def exact_path(x_T, abar_T, abar):
    """x_t on the probability-flow path through x_T: the standardised value (x - alpha MU) / sqrt(alpha^2 S^2 +
    sigma^2) is constant along it (the ODE is linear for Gaussian data)."""
    aT, sT = ab_of(abar_T)
    z = (x_T - aT * MU) / (aT * aT * S * S + sT * sT).sqrt()
    a, s = ab_of(abar)
    return a * MU + (a * a * S * S + s * s).sqrt() * z


def abar_of_tau(tau):
    """The alpha-bar whose tau = sigma / (alpha + sigma) is `tau` (alpha / sigma = (1 - tau) / tau)."""
    return 1 / (1 + (tau / (1 - tau)) ** 2)  # 1 at tau = 0


def test_the_retiming_is_the_flow_matching_interpolant():
    """y = x_t / (alpha_t + sigma_t) is (1 - tau_t) x0 + tau_t eps exactly, at every timestep and at CLEAN."""
    ft = F.flow_time(diffusion.reference_scheduler().alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(7, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randn(7, 1, 4, 4, generator=gen,
                                                                                         dtype=torch.float64)
    t = torch.tensor([999, 749, 499, 249, 10, 0, F.CLEAN])
    a, s = ft.alpha_sigma(t)
    x_t = F.col(a, x0) * x0 + F.col(s, x0) * eps
    tau = F.col(ft.tau(t), x0)
    torch.testing.assert_close(x_t / F.col(ft.scale(t), x0), (1 - tau) * x0 + tau * eps, rtol=1e-12, atol=1e-12)
    assert float(ft.tau(torch.tensor(F.CLEAN))) == 0.0 and 0.99 < float(ft.tau(torch.tensor(999))) < 1
    assert torch.all(ft.tau(torch.arange(-1, 1000)).diff() > 0)  # tau increases with t


def test_the_converted_velocity_is_the_probability_flow_ode_on_gaussian_data():
    """RK4 on dy/dtau = u(y, tau) (u from the exact epsilon through `velocity`) lands on the closed-form ODE
    path at every checkpoint: the conversion is exact, not an approximation that DDIM happens to share."""
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tau0, tau1 = 0.995, 0.0

    def u(y, tau):
        ab = abar_of_tau(torch.tensor(tau, dtype=torch.float64))
        a, s = ab_of(ab)
        eps = eps_star((a + s) * y, ab)
        return F.velocity(y, eps, torch.full((y.shape[0],), tau, dtype=torch.float64))

    ab_T = abar_of_tau(torch.tensor(tau0, dtype=torch.float64))
    y = x_T / sum(ab_of(ab_T))
    n = 2000
    taus = torch.linspace(tau0, tau1, n + 1, dtype=torch.float64)
    checkpoints = {n // 4, n // 2, 3 * n // 4, n}
    for i in range(n):
        a, b = float(taus[i]), float(taus[i + 1])
        h = b - a
        k1 = u(y, a)
        k2 = u(y + h / 2 * k1, a + h / 2)
        k3 = u(y + h / 2 * k2, a + h / 2)
        k4 = u(y + h * k3, b)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i + 1 in checkpoints:
            ab = abar_of_tau(taus[i + 1]) if i + 1 < n else torch.tensor(1.0, dtype=torch.float64)
            exact = exact_path(x_T, ab_T, ab) / sum(ab_of(ab))
            torch.testing.assert_close(y, exact, rtol=1e-7, atol=1e-7)


class GaussianStudent(torch.nn.Module):
    """A flow-map 'student' whose epsilon is the exact Gaussian one on the task's discrete schedule, whatever s
    (what the untrained student is to its teacher)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.abar = diffusion.reference_scheduler().alphas_cumprod.double()

    def eps(self, x, t, labels, tau_s):
        return eps_star(x, self.abar[t])


def ddim_loop(x_T, n):
    """The task's own sampling loop with diffusers' DDIMScheduler (x0 clip off: Gaussian data is unbounded) and
    the exact epsilon: the states after every step."""
    sched = type(diffusion.reference_scheduler()).from_config(diffusion.reference_scheduler().config,
                                                              thresholding=False)
    sched.set_timesteps(n)
    x, out = x_T, []
    for t in sched.timesteps:
        x = sched.step(eps_star(x, sched.alphas_cumprod[int(t)].double()), t, x).prev_sample
        out.append(x)
    return out, [int(t) for t in sched.timesteps]


def test_the_flow_map_sampler_is_ddim_retimed_and_both_converge_to_the_exact_ode_in_the_small_step_limit():
    """On N(MU, S^2) with the exact epsilon: (a) an Euler step of the converted velocity in (y, tau) is DDIM's
    step, state for state over whole 1- to 50-step loops (the untrained flow map is DDIM-n); (b) DDIM's trajectory
    converges to the closed-form ODE path as its steps shrink (the error falls as 1 / n and is < 5e-3 at
    1,000 steps), at the intermediate states as well as at x0."""
    ft = F.flow_time(diffusion.reference_scheduler().alphas_cumprod)
    cfg = diffusion.reference_scheduler().config
    student = GaussianStudent()
    x_T = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.zeros(32, dtype=torch.int64)
    abar = diffusion.reference_scheduler().alphas_cumprod.double()
    for n in (1, 2, 4, 10, 50):
        states, ts = ddim_loop(x_T, n)
        assert ts == F.sampling_timesteps(cfg, n)
        y = x_T / float(ft.scale(torch.tensor(ts[0])))
        ends = ts[1:] + [F.CLEAN]
        for k, (t, s) in enumerate(zip(ts, ends)):
            y = F.flow_map(student, y, t, s, labels, ft, clip=None)
            # diffusers' step from t goes to t - 1000 // n, which is the next start here (trailing spacing)
            dest = s if s != F.CLEAN else -1
            # (diffusers computes its alpha terms in float32: agreement to float32 rounding)
            torch.testing.assert_close(y * F.col(ft.scale(torch.full((32,), dest)), y), states[k], rtol=1e-5,
                                       atol=2e-5)
        torch.testing.assert_close(F.sample(student, x_T, labels, ft, ts, clip=None), states[-1], rtol=1e-5,
                                   atol=2e-5)
    err = {}
    for n in (10, 100, 1000):
        states, ts = ddim_loop(x_T, n)
        exact = [exact_path(x_T, abar[999], abar[t - 1000 // n] if t - 1000 // n >= 0 else torch.tensor(1.0,
                 dtype=torch.float64)) for t in ts]
        err[n] = max(float((a - b).abs().max()) for a, b in zip(states, exact))
    # first order, as Euler is: ten times the steps, about a tenth of the error (measured 0.28, 0.032, 0.0033)
    assert err[100] < err[10] / 8 and err[1000] < err[100] / 8 and err[1000] < 5e-3, err


class ConstantEps(torch.nn.Module):
    """A student whose epsilon is one learnable image, whatever its inputs."""

    def __init__(self, e):
        super().__init__()
        self.e = torch.nn.Parameter(e)

    def eps(self, x, t, labels, tau_s):
        return self.e.expand_as(x)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_the_eps_weighting_s_gain_is_the_derivative_of_the_jump_in_epsilon(clip):
    """The predictor's "eps" weighting divides by d f / d eps_theta per pixel: autograd's derivative of the jump,
    158 (tau_s - tau_t)-ish where x0^ is inside the clip at t = 999 and (tau_s - tau_t) where it is clipped."""
    ft = F.flow_time(diffusion.reference_scheduler().alphas_cumprod)
    gen = torch.Generator().manual_seed(9)
    y = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    student = ConstantEps(y.clone() + 0.003 * torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64))
    for t, s in ((999, F.CLEAN), (999, 949), (249, 199)):
        f, gain = F.flow_map(student, y, t, s, None, ft, clip, with_gain=True)
        student.e.grad = None
        f.sum().backward()
        torch.testing.assert_close(student.e.grad, gain, rtol=1e-10, atol=1e-12)
        if t == 999 and s == F.CLEAN:  # clipped pixels move 1 / (1 - tau_999) = 158 times less
            assert gain.unique().numel() == (2 if clip is not None else 1)


def tiny_student(seed: int = 0):
    model = diffusion.build_unet().eval()
    return model, F.flow_map_student(model, diffusion.denoise_unet).eval()


def randomise_branches(student, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".branch." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_flow_map_to_its_own_time_is_the_identity_bit_for_bit(clip):
    """f(y, t, t) = y + (tau_t - tau_t) v = y exactly, also with a trained (here: random) s-branch."""
    _, student = tiny_student()
    randomise_branches(student)
    ft = F.flow_time(diffusion.reference_scheduler().alphas_cumprod)
    y = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2
    labels = torch.arange(4)
    for t in (999, 749, 250, 0):
        with torch.no_grad():
            assert torch.equal(F.flow_map(student, y, t, t, labels, ft, clip), y)
        with torch.no_grad():  # and the map moves the sample elsewhere
            assert not torch.equal(F.flow_map(student, y, t, max(t - 100, F.CLEAN), labels, ft, clip), y)


def test_the_untrained_student_is_the_reference_and_the_s_branch_conditions_it():
    """At initialisation eps_theta(x, t | s) is the reference's eps(x, t) for every s (bit for bit), so one
    jump is one DDIM step; once the branch moves, s changes the output. The reference is not modified."""
    model, student = tiny_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    t, labels = torch.tensor([999, 500, 3]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        ref = diffusion.denoise_unet(model, x, t, labels, 0)
        for tau_s in (0.0, 0.3, 0.9):
            assert torch.equal(student.eps(x, t, labels, torch.full((3,), tau_s)), ref)
        randomise_branches(student)
        a = student.eps(x, t, labels, torch.full((3,), 0.1))
        b = student.eps(x, t, labels, torch.full((3,), 0.8))
    assert not torch.equal(a, b) and not torch.equal(a, ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    extra = sum(p.numel() for n, p in student.named_parameters() if ".branch." in n)
    assert extra == sum(p.numel() for p in model.time_embedding.parameters())  # one t-MLP's worth


def test_the_dit_student_gets_a_branch_in_every_block():
    from diffusers.models.embeddings import TimestepEmbedding

    model = diffusion.build_dit().eval()
    student = F.flow_map_student(model, diffusion.denoise_dit).eval()
    n = sum(isinstance(m, TimestepEmbedding) for m in model.modules())
    assert n == 4 and sum(type(m).__name__ == "SConditioned" for m in student.modules()) == n
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    t, labels = torch.tensor([900, 100]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(student.eps(x, t, labels, torch.tensor([0.2, 0.0])),
                           diffusion.denoise_dit(model, x, t, labels, 0))


def linear_setup(source="prior", **kw):
    ft = F.flow_time(diffusion.reference_scheduler().alphas_cumprod)
    starts = [999, 749, 499, 249]
    teacher = GaussianStudent()

    def teacher_eps(x, t, labels):
        return teacher.eps(x, t, labels, None)

    return F.Setup(teacher_eps, ft, None, starts, F.path_grid(starts, 50, ft.last), source, 10, (1, 2, 2), **kw)


def test_segments_stay_on_the_grid_below_their_start():
    setup = linear_setup()
    assert setup.grid[:3] == [999, 949, 899] and setup.grid[-2:] == [49, F.CLEAN] and len(setup.grid) == 21
    t, s_plus, s = F.draw_segments(setup, 4000, torch.Generator().manual_seed(0))
    pos = {g: i for i, g in enumerate(setup.grid)}
    assert set(t.tolist()) == set(setup.starts)
    assert all(pos[int(b)] == pos[int(c)] - 1 for b, c in zip(s_plus, s))  # s+ is the grid point above s
    assert bool((s < t).all()) and bool((s_plus <= t).all()) and (s == F.CLEAN).any() and (s_plus == t).any()


def test_prior_start_states_are_the_student_s_own_jumps_and_the_target_is_one_teacher_step_from_its_point():
    """Data-free: no data in the setup; a row starting at t < T starts at f(y_T, T, t). The predictor's target is
    the student's f(y_t, t, s+) moved by one Euler step of the teacher's velocity (= the teacher's DDIM step)."""
    setup = linear_setup()
    student = GaussianStudent()
    gen = torch.Generator().manual_seed(6)
    t = torch.tensor([999, 749, 249, 499])
    y, labels = F.start_states(student, setup, 4, t, gen, "cpu")
    again = torch.Generator().manual_seed(6)
    z = torch.randn((4, 1, 2, 2), generator=again).double()
    assert labels.min() >= 0 and labels.max() < 10
    y_T = z.float().double() / float(setup.ft.scale(torch.tensor(999)))
    for i in range(4):
        want = y_T[i:i + 1] if t[i] == 999 else F.flow_map(student, y_T[i:i + 1], 999, int(t[i]), labels[i:i + 1],
                                                            setup.ft)
        torch.testing.assert_close(y[i:i + 1], want.to(y.dtype), rtol=1e-4, atol=1e-4)  # float32 through 1/(1-tau)
    s_plus, s = torch.tensor([999, 449, 49, 299]), torch.tensor([949, 399, F.CLEAN, 249])
    target = F.predictor_target(student, setup, y, t, s_plus, s, labels)
    abar = diffusion.reference_scheduler().alphas_cumprod.double()
    for i in range(4):
        yi = y[i:i + 1]
        f_plus = yi if s_plus[i] == t[i] else F.flow_map(student, yi, int(t[i]), int(s_plus[i]), labels[i:i + 1],
                                                        setup.ft)
        x = f_plus * setup.ft.scale(s_plus[i:i + 1]).item()
        a_next = abar[int(s[i])] if s[i] != F.CLEAN else torch.tensor(1.0, dtype=torch.float64)
        ddim = F.ddim_step_vp(x, eps_star(x, abar[int(s_plus[i])]), abar[int(s_plus[i])].reshape(1),
                              a_next.reshape(1))
        torch.testing.assert_close(target[i:i + 1], (ddim / setup.ft.scale(s[i:i + 1]).item()).to(target.dtype),
                                   rtol=1e-5, atol=1e-6)  # y is float32


def test_data_start_states_noise_training_images():
    x = torch.full((5, 1, 2, 2), 0.5)
    setup = linear_setup("data", data_x=x, data_y=torch.arange(5))
    t = torch.tensor([F.CLEAN, 249, 999])
    y, labels = F.start_states(None, setup, 3, t, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(y[0], x[0]) and labels.max() < 5  # tau = 0: the image itself
    assert not torch.equal(y[1], x[0])


def test_the_corrector_pushes_generated_images_along_the_teacher_minus_fake_denoised_difference():
    """L_C = 1/2 || x^ - sg[x^ - g] ||^2 (batch and pixel mean) has gradient g / (pixels x rows) at x^: the
    corrector moves each generated image along the DMD direction g and nothing else."""
    gen = torch.Generator().manual_seed(7)
    x_hat = torch.randn(2, 1, 2, 2, generator=gen, requires_grad=True)
    real, fake = torch.randn(2, 1, 2, 2, generator=gen), torch.randn(2, 1, 2, 2, generator=gen)
    g = F.dmd_direction(x_hat.detach(), real, fake)
    norm = (x_hat.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, (fake - real) / norm)
    F.corrector_loss(x_hat, g).backward()
    torch.testing.assert_close(x_hat.grad, g / (4 * 2))
    # a student already at the teacher's law (fake = teacher) gets no push
    assert torch.equal(F.dmd_direction(x_hat.detach(), real, real), torch.zeros_like(g))


def test_config_validation():
    cfg = create_method("freeflow").config
    assert cfg.num_inference_steps in cfg.train_for and cfg.train_for == (1, 2, 4)
    assert create_method("freeflow", {"train_for": "1,8", "num_inference_steps": "8"}).config.train_for == (1, 8)
    with pytest.raises(ConfigError, match="not among the step counts.*train_for=1,2,4"):
        create_method("freeflow", {"num_inference_steps": "3"})
    with pytest.raises(ConfigError, match="'eps', 'eps-row', 'position', 'velocity'"):
        create_method("freeflow", {"weighting": "snr"})
    with pytest.raises(ConfigError, match="end_fraction must be > 0"):
        create_method("freeflow", {"corrector": "1", "end_fraction": "0"})
    for bad in ({"steps": "0"}, {"lr": "0"}, {"batch_size": "0"}, {"skip": "0"}, {"end_fraction": "1.5"},
                {"corrector": "-1"}, {"num_inference_steps": "0"}, {"train_for": "0"}):
        with pytest.raises(ConfigError):
            create_method("freeflow", bad)


SMOKE = {"batch_size": "4", "corrector": "1", "end_fraction": "0.5"}


def test_smoke_apply_is_data_free_deterministic_has_the_with_data_control_and_serves_every_step_count(
        digits_gen, tmp_path, monkeypatch):
    from baselines.distillation import freeflow

    task, ref, ctx = digits_gen
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    read = {"n": 0}
    real_split = type(task).training_split

    def counting(self):
        read["n"] += 1
        return real_split(self)

    monkeypatch.setattr(type(task), "training_split", counting)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "a"))
    applied = create_method("freeflow", SMOKE | {"control": "false"}).apply(ref, task, ctx)
    assert read["n"] == 0  # the method alone never reads the training split
    assert applied.cost.samples_seen == 0 and "0 real training images" in applied.cost.description
    assert applied.controls == []
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "b"))
    again = create_method("freeflow", SMOKE).apply(ref, task, ctx)
    assert read["n"] == 1  # the control reads it
    for k, v in applied.subject.model.state_dict().items():  # trained twice from scratch: bit for bit the same
        assert torch.equal(v, again.subject.model.state_dict()[k])
    assert any(".branch." in k and v.abs().sum() > 0 for k, v in applied.subject.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())  # the reference untouched

    [control] = again.controls
    assert control.name == "distilled_with_data" and control.value == control.value and control.cost_seconds > 0
    noise, labels = diffusion.eval_inputs(4, 7)
    images = diffusion.sample(again.subject, noise, labels)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    stats = again.stats()
    assert stats["nfe"] == 1 and stats["real_samples_seen"] == 0
    assert stats["prior_samples"] == freeflow.SMOKE_TRAIN_STEPS * 4
    assert stats["control_real_samples_seen"] == freeflow.SMOKE_TRAIN_STEPS * 4
    assert again.cost.steps == freeflow.SMOKE_TRAIN_STEPS and again.cost.seconds > 0

    # 2 and 4 steps find both students in the cache (the key has no num_inference_steps): no training, the same
    # weights and the same recorded cost; the images differ from the 1-step ones
    monkeypatch.setattr(freeflow.FreeFlow, "train", lambda *a, **k: pytest.fail("trained again despite the cache"))
    for n in (2, 4):
        cached = create_method("freeflow", SMOKE | {"num_inference_steps": str(n)}).apply(ref, task, ctx)
        assert cached.cost.seconds == again.cost.seconds and cached.controls[0].cost_seconds == control.cost_seconds
        for k, v in cached.subject.model.state_dict().items():
            assert torch.equal(v, again.subject.model.state_dict()[k])
        more = diffusion.sample(cached.subject, noise, labels)
        assert cached.stats()["nfe"] == n and not torch.equal(more, images)
    with pytest.raises(pytest.fail.Exception):  # a training setting is in the key
        create_method("freeflow", SMOKE | {"lr": "2e-4"}).apply(ref, task, ctx)


def test_a_guided_or_non_epsilon_teacher_is_refused(digits_gen):
    import dataclasses

    task, ref, ctx = digits_gen
    with pytest.raises(ConfigError, match="classifier-free guidance"):
        create_method("freeflow").apply(dataclasses.replace(ref, extra=dict(ref.extra, guidance_scale=1.5)), task,
                                        ctx)
    sched = type(ref.extra["scheduler"]).from_config(ref.extra["scheduler"].config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="epsilon"):
        create_method("freeflow").apply(dataclasses.replace(ref, extra=dict(ref.extra, scheduler=sched)), task, ctx)
