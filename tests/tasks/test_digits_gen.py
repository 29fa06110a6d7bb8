"""digits-gen / digits-gen-dit: data, the FID machinery, determinism, the published artifacts, a whole run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from bench.registry import get_task_spec
from tasks._kit import diffusion, fid
from tasks.base import RunContext

TASKS = ("digits-gen", "digits-gen-dit")


def make_ctx(budget: str = "smoke", seed: int = 0) -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=seed, progress=Reporter(), batch_size=4, budget=budget)


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    t = get_task_spec("digits-gen").cls()
    t.load(make_ctx())
    return t


@pytest.fixture(scope="module")
def classifier(task):
    """The published feature classifier (or, where it is missing, a smoke-budget build)."""
    return task.classifier_path(make_ctx())


def test_data_is_16x16_digits_in_the_digits_split(task):
    assert task.train.x.shape == (1347, 1, 16, 16) and task.test.x.shape == (450, 1, 16, 16)
    assert float(task.train.x.min()) >= -1 and float(task.train.x.max()) <= 1
    assert np.bincount(task.test.y.numpy(), minlength=10).min() >= 43  # stratified: 43-46 per class
    # the test split is the `digits` task's test split, upsampled: 2x2 pooling gives back about the 8x8 image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, idx_te = train_test_split(np.arange(len(d.target)), test_size=0.25, random_state=0, stratify=d.target)
    assert np.array_equal(task.test.y.numpy(), d.target[idx_te])
    small = torch.nn.functional.avg_pool2d(task.test.x, 2).squeeze(1).numpy()
    assert np.abs(small - (d.images[idx_te] / 16.0 - 0.5) / 0.5).mean() < 0.2


def test_real_digits_fid_is_far_below_noise(task, classifier):
    real = diffusion.to_uint8(torch.cat([task.train.x, task.test.x]))
    gen = torch.Generator().manual_seed(0)
    half_a, half_b = real[0::2], real[1::2]  # disjoint halves
    noise = torch.randint(0, 256, half_b.shape, generator=gen, dtype=torch.uint8)
    real_vs_real = fid.torch_fidelity_fid(half_a, half_b, classifier)
    real_vs_noise = fid.torch_fidelity_fid(half_a, noise, classifier)
    assert real_vs_real < 0.05 * real_vs_noise, (real_vs_real, real_vs_noise)


def test_torch_fidelity_fid_equals_an_independent_frechet_distance(task, classifier):
    a = diffusion.to_uint8(task.train.x[:600])
    b = diffusion.to_uint8(task.test.x)
    ours = fid.torch_fidelity_fid(a, b, classifier)
    fa, fb = fid.features(a, classifier), fid.features(b, classifier)
    assert fa.shape == (600, 64)
    mu_a, s_a = fa.mean(0), np.cov(fa, rowvar=False)
    mu_b, s_b = fb.mean(0), np.cov(fb, rowvar=False)
    assert ours == pytest.approx(fid.frechet_distance(mu_a, s_a, mu_b, s_b), abs=1e-3)


def test_jackknife_pseudo_values_average_to_the_fid_and_spread_with_it(task, classifier):
    feats = fid.features(diffusion.to_uint8(task.train.x[:120]), classifier)
    mu, s = fid.gaussian(fid.features(diffusion.to_uint8(task.test.x), classifier))
    value = fid.frechet_distance(*fid.gaussian(feats), mu, s)
    pseudo = fid.jackknife(feats, mu, s, value)
    assert pseudo.shape == (120,) and pseudo.mean() == pytest.approx(value, abs=1e-9)
    assert pseudo.std() > 0
    # the rank-one downdates equal recomputing without the image
    loo = fid.leave_one_out(feats, mu, s)
    for i in (0, 7, 119):
        assert loo[i] == pytest.approx(fid.frechet_distance(*fid.gaussian(np.delete(feats, i, axis=0)), mu, s),
                                       rel=1e-9)


@pytest.mark.parametrize("name", TASKS)
def test_workload_is_deterministic_for_fixed_noise_and_labels(name):
    t = get_task_spec(name).cls()
    t.load(make_ctx())
    ctx = make_ctx()
    state = t.build_reference().state_dict()  # untrained: determinism does not need a trained model
    a, b = t.subject_from_state(state, ctx), t.subject_from_state(state, ctx)
    a.extra["num_inference_steps"] = b.extra["num_inference_steps"] = 5
    fn_a, items, unit = t.workload(a, ctx)
    fn_b, _, _ = t.workload(b, ctx)
    x1, x2, x3 = fn_a(), fn_a(), fn_b()
    assert items == 4 and x1.shape == (4, 1, 16, 16) and "4 images" in unit
    assert torch.equal(x1, x2) and torch.equal(x1, x3)
    noise, labels = diffusion.eval_inputs(4, 1)
    assert not torch.equal(diffusion.sample(a, noise, labels), x1)  # another seed, other images


def test_on_batch_start_runs_once_per_batch_and_denoise_sees_step_indices(task):
    ctx = make_ctx()
    subject = task.subject_from_state(task.build_reference().state_dict(), ctx)
    seen, starts = [], []
    inner = subject.extra["denoise"]

    def denoise(model, x, t, labels, step_index):
        seen.append((int(t), step_index))
        return inner(model, x, t, labels, step_index)

    subject.extra.update(denoise=denoise, on_batch_start=lambda: starts.append(len(seen)), num_inference_steps=4)
    noise, labels = diffusion.eval_inputs(6, 0)
    diffusion.generate(subject, noise, labels, batch_size=3)
    assert starts == [0, 4]
    assert seen == [(999, 0), (749, 1), (499, 2), (249, 3)] * 2


def test_image_fidelity_identical_and_different():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 16, 16)).astype(np.uint8)
    from tasks.digits_gen import image_fidelity

    same = image_fidelity(a, a)
    assert same["psnr_db"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    diff = image_fidelity(a, b)
    assert 10 < diff["psnr_db"] < 40 and diff["ssim"] < 0.99


@pytest.mark.parametrize("name", TASKS)
def test_published_artifacts_load_with_their_sha256(name):
    from bench import cache
    from tasks import digits_gen

    t = get_task_spec(name).cls()
    if not (t.reference_sha256 and digits_gen.CLASSIFIER_SHA256):
        pytest.skip(f"{name}: no published reference recorded yet (`bench reference build {name} --publish`)")
    t.load(make_ctx())
    w = t.reference_weights(make_ctx())
    assert w.canonical and w.sha256 == t.reference_sha256 and w.source.endswith("reference.safetensors")
    t.build_reference().load_state_dict(w.state)
    assert cache.load_weights(digits_gen.CLASSIFIER_ART, digits_gen.CLASSIFIER_SHA256) is not None
    assert t.classifier_path(make_ctx()) == digits_gen.CLASSIFIER_ART


@pytest.mark.parametrize("name", TASKS)
def test_the_published_reference_draws_digits_the_classifier_recognises(name):
    """Catches a sampler that diverges (e.g. a schedule whose first step amplifies the x0 error): such
    samples are saturated noise and the classifier's accuracy on them is near chance."""
    from safetensors.torch import load_file

    t = get_task_spec(name).cls()
    if not t.reference_sha256:
        pytest.skip(f"{name}: no published reference recorded yet")
    ctx = make_ctx()
    t.load(ctx)
    subject = t.subject_from_state(t.reference_weights(ctx).state, ctx)
    noise, labels = diffusion.eval_inputs(30, 0)
    images = diffusion.to_uint8(diffusion.sample(subject, noise, labels))
    clf = fid.build_classifier()
    clf.load_state_dict(load_file(str(t.classifier_path(ctx))))
    with torch.inference_mode():
        pred = clf.eval()(fid.uint8_to_input(images)).argmax(1)
    assert float((pred == labels).float().mean()) >= 0.8


def test_a_whole_smoke_run_is_ok(tmp_path):
    from bench.runner import run

    out = run("digits-gen", "ddim", budget="smoke", results_root=tmp_path)
    r = out.result
    assert r.status == "ok" and out.path.is_file()
    assert r.quality.metric == "fid" and not r.quality.higher_is_better and r.quality.n == 40
    assert r.fidelity.metric == "ssim_to_reference" and r.method_stats["nfe"] == 20
    assert r.compute.reference > r.compute.method > 0  # 50 against 20 network evaluations
    acc = r.quality.secondary["class_accuracy"]  # recorded beside FID for both arms
    assert 0 <= acc.value <= 1 and 0 <= acc.reference_value <= 1
