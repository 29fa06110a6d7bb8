"""The `imagenet-fid` full task, offline: a tiny random DiT pipeline written by the tests, reference statistics
from a fixture file, a fixture image folder or a (local, file://) download, and a tiny registered torch-fidelity
extractor in place of Inception. Also the FID helpers of `tasks._kit.fid_stats` against independent computations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from bench.registry import create_method
from tasks import imagenet_fid
from tasks._kit import fid_stats
from tasks.base import RunContext
from tasks.imagenet_fid import ImagenetFid, ImagenetStatsNotFound

sys.path.insert(0, str(Path(__file__).parent))  # for latent_fixtures, under --import-mode=importlib too

from latent_fixtures import EXTRACTOR, LAYER, STEPS, register_extractor, save_tiny_dit  # noqa: E402

DIM = 24  # the tiny extractor's features


def fixture_stats(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.4, 0.1, size=(200, DIM))
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("imagenet-fid")
    stats = root / "ref.npz"
    np.savez(stats, mu=fixture_stats()["mu"], sigma=fixture_stats()["sigma"], arr_0=np.zeros((2, 4, 4, 3)))
    return {"dit": save_tiny_dit(root / "dit"), "stats": stats, "root": root}


@pytest.fixture
def env(files, monkeypatch):
    torch.set_num_threads(1)
    register_extractor()
    monkeypatch.setenv(imagenet_fid.REFERENCE_ENV, str(files["dit"]))
    monkeypatch.setenv(imagenet_fid.STATS_ENV, str(files["stats"]))
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, EXTRACTOR)
    for var in (imagenet_fid.VAL_ENV, fid_stats.LAYER_ENV, fid_stats.WEIGHTS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ImagenetFid, "num_inference_steps", STEPS)
    return files


def context(budget: str = "smoke", eval_size: int | None = None, batch_size: int = 3) -> RunContext:
    profile = load_profile("cpu")
    if eval_size is not None:
        profile = profile.model_copy(update={"eval_size": {"imagenet-fid": eval_size}})
    return RunContext(profile=profile, seed=0, progress=Reporter(), batch_size=batch_size, budget=budget)


def reference(ctx: RunContext):
    task = ImagenetFid()
    task.load(ctx)
    return task, task.subject_from_state(task.reference_weights(ctx).state, ctx)


def batch(task, subject, ctx, indices=(0, 1)):
    return task.noise(subject, list(indices), 0, ctx), task.conditioning(subject, list(indices), ctx)()


# ---- FID helpers -----------------------------------------------------------------------------------------------

def test_fid_is_torch_fidelitys_and_agrees_with_scipy():
    from tasks._kit.fid import frechet_distance

    rng = np.random.default_rng(1)
    gen, real = rng.normal(size=(300, 6)), rng.normal(0.3, 1.2, size=(400, 6))
    g, r = fid_stats.statistics(gen), fid_stats.statistics(real)
    assert fid_stats.fid_value(g, r) == pytest.approx(frechet_distance(g["mu"], g["sigma"], r["mu"], r["sigma"]),
                                                      abs=1e-6)
    with pytest.raises(fid_stats.StatisticsError, match="same feature extractor"):
        fid_stats.fid_value(g, fid_stats.statistics(real[:, :5]))


@pytest.mark.parametrize("n", [60, 400])
def test_pseudo_values_agree_with_the_exact_jackknife(n):
    """The infinitesimal jackknife (one eigendecomposition) against `tasks._kit.fid.jackknife` (exact leave-one-out,
    one sqrtm per image): the same per-image pseudo-values up to the first-order error."""
    from tasks._kit.fid import jackknife

    rng = np.random.default_rng(n)
    gen, real = rng.normal(size=(n, 5)) * [1, 2, 1, 0.5, 1], rng.normal(0.5, 1.0, size=(500, 5))
    r = fid_stats.statistics(real)
    value = fid_stats.fid_value(fid_stats.statistics(gen), r)
    fast, exact = fid_stats.pseudo_values(gen, r, value), jackknife(gen, r["mu"], r["sigma"], value)
    assert fast.mean() == pytest.approx(value) and exact.mean() == pytest.approx(value)
    assert np.corrcoef(fast, exact)[0, 1] > 0.995
    assert np.std(fast) == pytest.approx(np.std(exact), rel=0.05)


def test_the_extractor_is_configured_by_name_and_checked():
    register_extractor()
    assert fid_stats.fid_config() == fid_stats.FidConfig("inception-v3-compat", "2048", None)  # the production path
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fid_stats.EXTRACTOR_ENV, "inception-v4")
        with pytest.raises(ValueError, match="registered: .*inception-v3-compat"):
            fid_stats.fid_config()
        mp.setenv(fid_stats.EXTRACTOR_ENV, EXTRACTOR)
        mp.setenv(fid_stats.LAYER_ENV, "2048")
        with pytest.raises(ValueError, match=f"provides the layers {LAYER}"):
            fid_stats.fid_config()


# ---- reference statistics ---------------------------------------------------------------------------------------

def test_statistics_from_a_file_a_folder_or_the_adm_download(env, files, tmp_path, monkeypatch):
    task = ImagenetFid()
    task.load(context())
    np.testing.assert_array_equal(task.reference_stats["mu"], fixture_stats()["mu"])
    # a folder of images: resized and centre-cropped to the generated size, through the extractor, cached
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "val" / "n01440764"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20 + i, 18, 3), dtype=np.uint8)).save(folder / f"ILSVRC_{i}.JPEG")
    monkeypatch.delenv(imagenet_fid.STATS_ENV)
    monkeypatch.setenv(imagenet_fid.VAL_ENV, str(tmp_path / "val"))
    from_folder = ImagenetFid()
    from_folder.load(context())
    ext = fid_stats.create_extractor(fid_stats.fid_config(), "cpu")
    images = torch.stack([fid_stats.load_image(p, 16) for p in sorted(folder.iterdir())])
    expected = fid_stats.statistics(fid_stats.extract(ext, images, LAYER))
    np.testing.assert_allclose(from_folder.reference_stats["sigma"], expected["sigma"], atol=1e-12)
    assert from_folder.data_fingerprint() != task.data_fingerprint()
    # neither set: ADM's reference batch, downloaded once into BENCH_DATA
    monkeypatch.delenv(imagenet_fid.VAL_ENV)
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setitem(imagenet_fid.ADM_REFERENCE, 16, files["stats"].as_uri())
    adm = ImagenetFid()
    adm.load(context())
    assert (tmp_path / "data" / "imagenet-fid" / "ref.npz").is_file()
    np.testing.assert_array_equal(adm.reference_stats["sigma"], fixture_stats()["sigma"])


def test_missing_statistics_name_the_variables(env, tmp_path, monkeypatch):
    monkeypatch.setenv(imagenet_fid.STATS_ENV, str(tmp_path / "absent.npz"))
    with pytest.raises(ImagenetStatsNotFound, match=imagenet_fid.STATS_ENV):
        ImagenetFid().load(context())
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    monkeypatch.setenv(imagenet_fid.STATS_ENV, str(tmp_path / "bad.npz"))
    with pytest.raises(fid_stats.StatisticsError, match="not a readable"):
        ImagenetFid().load(context())
    monkeypatch.delenv(imagenet_fid.STATS_ENV)
    monkeypatch.setenv(imagenet_fid.VAL_ENV, str(tmp_path))
    with pytest.raises(ImagenetStatsNotFound, match="no images in"):
        ImagenetFid().load(context())
    monkeypatch.delenv(imagenet_fid.VAL_ENV)
    with pytest.raises(ImagenetStatsNotFound, match=f"{imagenet_fid.STATS_ENV}.*{imagenet_fid.VAL_ENV}"):
        ImagenetFid().load(context())  # 16x16 images: ADM publishes no statistics at that size


# ---- the subject and its evaluation ---------------------------------------------------------------------------

def test_the_tasks_loop_reproduces_the_dit_pipeline(env):
    """Same initial latents and classes: DDIM with guidance 1.5 and the VAE decode give DiTPipeline's images."""
    from diffusers import DDIMScheduler

    from tasks._kit.diffusion import sample

    ctx = context()
    task, subject = reference(ctx)
    pipe = task.pipeline(ctx)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise, labels = batch(task, subject, ctx, (3, 7))
    ours = sample(subject, noise, labels)
    gen = torch.Generator().manual_seed(0)
    expected_noise = noise.clone()

    def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return expected_noise.to(device=device, dtype=dtype)

    import diffusers.pipelines.dit.pipeline_dit as dit_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dit_module, "randn_tensor", fixed_noise)
        theirs = pipe(class_labels=labels.tolist(), guidance_scale=imagenet_fid.GUIDANCE, generator=gen,
                      num_inference_steps=STEPS, output_type="np").images
    assert labels.tolist() == [3, 7]
    torch.testing.assert_close((ours.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1), torch.from_numpy(theirs),
                               rtol=1e-4, atol=1e-4)


def test_evaluation_uses_the_profiles_size_and_is_repeatable(env):
    assert load_profile("h100-bf16").eval_size_for("imagenet-fid") == 50000
    ctx = context(budget="full", eval_size=5, batch_size=2)
    task, subject = reference(ctx)
    ev = task.evaluate(subject, ctx)
    assert task.n == 5 and ev.per_example.shape == (5,) and ev.per_example.mean() == pytest.approx(ev.value)
    assert np.isfinite(ev.value) and ev.value > 0
    again = task.evaluate(subject, context(budget="full", eval_size=5, batch_size=5))  # batch size changes nothing
    assert again.value == pytest.approx(ev.value, rel=1e-5)
    assert task.fidelity(ev, again)[1] == pytest.approx(1.0, abs=1e-4)


def test_wrong_statistics_dimensions_are_an_error_at_evaluation(env, tmp_path, monkeypatch):
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setenv(imagenet_fid.STATS_ENV, str(tmp_path / "inception.npz"))
    task, subject = reference(context())
    with pytest.raises(fid_stats.StatisticsError, match="24 dimensions"):
        task.evaluate(subject, context())


# ---- methods on the DiT ------------------------------------------------------------------------------------------

def test_samplers_and_caches_on_the_dit(env):
    """ddim at the reference's steps and fora at interval 1 reproduce the reference; taylorseer of order 0 is
    fora; dpm-solver and unipc run; diffusers' hooks attach to the DiT blocks and fire; teacache fits its
    polynomial on the task's calibration samples (guided: two branches per step)."""
    from tasks._kit.diffusion import sample

    ctx = context()
    task, subject = reference(ctx)
    noise, labels = batch(task, subject, ctx)
    ref = sample(subject, noise, labels)

    def run(name, **overrides):
        applied = create_method(name, {k: str(v) for k, v in overrides.items()}).apply(subject, task, ctx)
        return sample(applied.subject, noise, labels), applied

    torch.testing.assert_close(run("ddim", num_inference_steps=STEPS)[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("fora", interval=1)[0], ref, rtol=1e-5, atol=1e-5)
    fora, _ = run("fora", interval=3)
    torch.testing.assert_close(run("taylorseer", interval=3, order=0)[0], fora, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fora, ref, atol=1e-4)
    for name, kw in [("dpm-solver", {"num_inference_steps": 3}), ("unipc", {"num_inference_steps": 3}),
                     ("toca", {}), ("taylorseer", {}), ("first-block-cache", {"threshold": 0.5}), ("pab", {}),
                     ("fastercache", {}), ("diffusers-taylorseer", {}),
                     ("teacache", {"calibration_samples": 3, "degree": 1})]:  # calibrates via the task's sampler
        images, applied = run(name, **kw)
        assert images.shape == ref.shape and torch.isfinite(images).all(), name
        stats = applied.stats()
        assert stats.get("hook_calls", 1) > 0 and stats.get("nfe", 1) > 0, name


# ---- through the runner ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, overrides", [
    ("taylorseer", {}),
    pytest.param("fora", {"interval": "1"}, marks=pytest.mark.slow),  # what test_samplers_and_caches_on_the_dit shows
])
def test_caching_runs_on_imagenet_fid_through_the_runner(env, results_root, method, overrides):
    from bench.runner import run
    from bench.store import load_result

    out = run("imagenet-fid", method, overrides=overrides, budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.quality.metric == "fid" and r.quality.n == 4
    assert r.fidelity.metric == "ssim_to_reference" and r.speed.items_per_call == 2
    if method == "fora":  # a full computation every step: the reference's images
        assert r.quality.delta == pytest.approx(0, abs=1e-6) and r.fidelity.value == pytest.approx(1.0, abs=1e-4)
    else:
        assert r.method_stats["nfe_partial"] > 0 and r.compute.method < r.compute.reference
