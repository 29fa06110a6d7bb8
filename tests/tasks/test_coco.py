"""The `coco` full task, offline: COCO-layout fixture captions and images, a tiny random Stable Diffusion pipeline
and a tiny CLIP written by the tests, and a tiny registered torch-fidelity extractor in place of Inception."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from bench.registry import RegistryError, create_method
from tasks import coco
from tasks._kit import fid_stats
from tasks.base import RunContext
from tasks.coco import Coco, CocoDataError, CocoDataNotFound
from tasks._kit.pretrained import PretrainedNotFound

sys.path.insert(0, str(Path(__file__).parent))  # for latent_fixtures, under --import-mode=importlib too

from latent_fixtures import EXTRACTOR, STEPS, register_extractor, save_tiny_clip, save_tiny_sd, write_coco  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("coco")
    return {"data": write_coco(root / "data"), "sd": save_tiny_sd(root / "sd"), "clip": save_tiny_clip(root / "clip")}


@pytest.fixture
def env(files, monkeypatch, tmp_path):
    torch.set_num_threads(1)
    register_extractor()
    monkeypatch.setenv(coco.DATA_ENV, str(files["data"]))
    monkeypatch.setenv(coco.REFERENCE_ENV, str(files["sd"]))
    monkeypatch.setenv(coco.CLIP_ENV, str(files["clip"]))
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, EXTRACTOR)
    for var in (coco.SPLIT_ENV, fid_stats.LAYER_ENV, fid_stats.WEIGHTS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Coco, "num_inference_steps", STEPS)
    return files


def context(budget: str = "smoke", eval_size: int | None = None, batch_size: int = 3) -> RunContext:
    profile = load_profile("cpu")
    if eval_size is not None:
        profile = profile.model_copy(update={"eval_size": {"coco": eval_size}})
    return RunContext(profile=profile, seed=0, progress=Reporter(), batch_size=batch_size, budget=budget)


def reference(ctx: RunContext):
    task = Coco()
    task.load(ctx)
    return task, task.subject_from_state(task.reference_weights(ctx).state, ctx)


# ---- data ---------------------------------------------------------------------------------------------------

def test_captions_are_read_in_cocos_layout_and_the_subset_is_fixed_and_nested(env):
    records = coco.read_captions(env["data"], "val2014")
    assert len(records) == 10 and [r[0] for r in records] == sorted(r[0] for r in records)
    assert all(c == " ".join(c.split()) and c for _, _, caps in records for c in caps)  # whitespace normalised
    small, large = coco.select(records, 4), coco.select(records, 8)
    assert large[:4] == small and len({i for i, _, _ in large}) == 8
    by_id = {i: caps for i, _, caps in records}
    assert all(caption in by_id[i] for i, _, caption in large)
    assert coco.select(records, 8) == large  # fixed by DATA_SEED, not by anything else


def test_missing_or_malformed_data_is_named_with_how_to_get_it(env, tmp_path, monkeypatch):
    monkeypatch.setenv(coco.DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(CocoDataNotFound) as err:
        Coco().load(context())
    msg = str(err.value)
    assert coco.DATA_ENV in msg and "captions_val2014.json" in msg and "images.cocodataset.org/zips/val2014.zip" in msg
    monkeypatch.setenv(coco.SPLIT_ENV, "test2015")
    with pytest.raises(CocoDataError, match="val2014, val2017"):
        Coco().load(context())
    monkeypatch.setenv(coco.SPLIT_ENV, "val2017")
    (tmp_path / "bad" / "annotations").mkdir(parents=True)
    (tmp_path / "bad" / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": []}))
    monkeypatch.setenv(coco.DATA_ENV, str(tmp_path / "bad"))
    with pytest.raises(CocoDataError, match="not a COCO captions file"):
        Coco().load(context())


def test_the_evaluation_size_comes_from_the_profile(env):
    assert load_profile("h100-bf16").eval_size_for("coco") == 30000
    assert load_profile("a100-bf16").eval_size_for("coco") == 5000
    with pytest.raises(RegistryError, match=r"\[eval_size\]"):
        Coco().load(context(budget="full"))  # the cpu profile sets none
    with pytest.raises(CocoDataError, match="asks for 11 COCO images"):
        Coco().load(context(budget="full", eval_size=11))
    task = Coco()
    task.load(context(budget="full", eval_size=5))
    assert task.n == 5 and len(task.items) == 5


def test_a_bad_reference_folder_names_the_variable(env, tmp_path, monkeypatch):
    (tmp_path / "nothing").mkdir()
    monkeypatch.setenv(coco.REFERENCE_ENV, str(tmp_path / "nothing"))
    with pytest.raises(PretrainedNotFound, match=coco.REFERENCE_ENV):
        Coco().load(context())
    monkeypatch.setenv(coco.REFERENCE_ENV, str(tmp_path / "absent" / "folder"))
    with pytest.raises(PretrainedNotFound, match="model_index.json"):
        Coco().load(context())


# ---- the subject ---------------------------------------------------------------------------------------------

def test_the_tasks_loop_reproduces_the_stable_diffusion_pipeline(env):
    """Same initial latents and prompts: the subject's sampling (DDIM, guidance 7.5, VAE decode) gives the images
    of diffusers' StableDiffusionPipeline with a DDIM scheduler from the same config."""
    from diffusers import DDIMScheduler

    from tasks._kit.diffusion import sample

    ctx = context()
    task, subject = reference(ctx)
    pipe = task.pipeline(ctx)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = task.noise(subject, [0, 1], 0, ctx)
    prompts = [task.items[0][2], task.items[1][2]]
    ours = sample(subject, noise, task.conditioning(subject, [0, 1], ctx)())
    theirs = pipe(prompts, latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=coco.GUIDANCE,
                  output_type="np").images
    torch.testing.assert_close((ours.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1), torch.from_numpy(theirs),
                               rtol=1e-4, atol=1e-4)
    assert subject.extra["backbone"] == "unet" and subject.extra["guidance_scale"] == coco.GUIDANCE


def test_evaluation_fid_clip_score_and_fidelity(env):
    """FID is torch-fidelity's own number on these images; CLIP score is torchmetrics' own; the reference's
    fidelity to itself is 1; the pseudo-values average to the FID."""
    import torch_fidelity
    from transformers import CLIPModel, CLIPProcessor

    from tasks._kit.latent_diffusion import load_images

    ctx = context(budget="full", eval_size=5)
    task, subject = reference(ctx)
    ev = task.evaluate(subject, ctx)
    assert ev.per_example.shape == (5,) and ev.per_example.mean() == pytest.approx(ev.value)
    assert ev.metrics == {"clip_score": task.last_metrics["clip_score"]}
    images = load_images(str(ev.outputs[0]))
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    paths = [env["data"] / "val2014" / f for _, f, _ in task.items]
    real = torch.stack([fid_stats.load_image(p, 16) for p in paths])

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    expected = torch_fidelity.calculate_metrics(input1=Images(images), input2=Images(real), fid=True,
                                                feature_extractor=EXTRACTOR, cuda=False, cache=False, verbose=False)
    assert ev.value == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    model, processor = CLIPModel.from_pretrained(env["clip"]).eval(), CLIPProcessor.from_pretrained(env["clip"])
    with torch.no_grad():  # CLIP score by hand: max(mean of 100 cos(E_image, E_caption), 0), as torchmetrics
        inputs = processor(text=[c for _, _, c in task.items], images=list(images), return_tensors="pt", padding=True)
        e_i = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        e_t = model.get_text_features(input_ids=inputs["input_ids"],
                                      attention_mask=inputs["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(e_i, e_t)
    assert task.last_metrics["clip_score"] == pytest.approx(max(float((100 * cos).mean()), 0.0), rel=1e-4, abs=1e-4)
    assert task.fidelity(ev, ev) == ("ssim_to_reference", pytest.approx(1.0))
    again = task.evaluate(subject, ctx)  # deterministic, and the kept images are the same file
    assert again.value == ev.value and again.outputs[0] == ev.outputs[0]


def test_deepcache_on_the_sd_unet(env):
    """interval 1 reproduces the reference; the shallow path from a fresh cache equals the full pass on the
    cross-attention UNet, for both branches; interval 3 caches."""
    from baselines.caching.deepcache import unet_forward
    from tasks._kit.diffusion import sample

    ctx = context()
    task, subject = reference(ctx)
    noise, labels = task.noise(subject, [0, 1], 0, ctx), task.conditioning(subject, [0, 1], ctx)()
    ref = sample(subject, noise, labels)
    same = create_method("deepcache", {"interval": "1"}).apply(subject, task, ctx)
    torch.testing.assert_close(sample(same.subject, noise, labels), ref, rtol=1e-5, atol=1e-5)
    assert same.stats() == {"nfe_full": STEPS, "nfe_partial": 0}
    cached = create_method("deepcache", {"interval": "3"}).apply(subject, task, ctx)
    assert not torch.allclose(sample(cached.subject, noise, labels), ref, atol=1e-4)
    assert cached.stats() == {"nfe_full": 2, "nfe_partial": STEPS - 2}
    model, text = subject.model, torch.cat([labels, labels])
    x, t = torch.randn(4, 4, 8, 8), torch.tensor(500)
    with torch.inference_mode():
        full_ref = model(x, t, encoder_hidden_states=text).sample
        for branch in (0, 1):
            cache = {}
            torch.testing.assert_close(unet_forward(model, x, t, None, branch, cache, True, text), full_ref,
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(unet_forward(model, x, t, None, branch, cache, False, text), full_ref,
                                       rtol=1e-5, atol=1e-5)


def test_the_samplers_on_the_sd_unet(env):
    """ddim at the reference's steps reproduces the reference; dpm-solver and unipc run at fewer steps."""
    from tasks._kit.diffusion import sample

    ctx = context()
    task, subject = reference(ctx)
    noise, labels = task.noise(subject, [0, 1], 0, ctx), task.conditioning(subject, [0, 1], ctx)()
    ref = sample(subject, noise, labels)
    ddim = create_method("ddim", {"num_inference_steps": str(STEPS)}).apply(subject, task, ctx)
    torch.testing.assert_close(sample(ddim.subject, noise, labels), ref, rtol=1e-5, atol=1e-5)
    for name in ("dpm-solver", "unipc"):
        applied = create_method(name, {"num_inference_steps": "3"}).apply(subject, task, ctx)
        images = sample(applied.subject, noise, labels)
        assert images.shape == ref.shape and torch.isfinite(images).all()
        assert applied.stats()["nfe"] == 3


# ---- through the runner ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, overrides", [
    ("deepcache", {}),
    pytest.param("ddim", {"num_inference_steps": str(STEPS)}, marks=pytest.mark.slow),  # direct test above
    pytest.param("dpm-solver", {"num_inference_steps": "3"}, marks=pytest.mark.slow),
    pytest.param("unipc", {"num_inference_steps": "3"}, marks=pytest.mark.slow),
])
def test_methods_run_on_coco_through_the_runner(env, results_root, method, overrides):
    from bench.runner import run
    from bench.store import load_result

    out = run("coco", method, overrides=overrides, budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.task.modality == "image-generation"
    assert r.quality.metric == "fid" and not r.quality.higher_is_better and r.quality.n == 4
    assert len(r.task.reference_sha256) == 64 and not r.task.reference_canonical
    assert r.fidelity.metric == "ssim_to_reference" and r.speed.items_per_call == 2 and r.speed.speedup > 0
    if method == "ddim":  # the reference's own scheduler and steps: the reference's images
        assert r.quality.delta == 0 and r.fidelity.value == pytest.approx(1.0)
    if method == "deepcache":
        assert r.method_stats["nfe_partial"] > 0 and r.compute.method < r.compute.reference
    clip = r.quality.secondary["clip_score"]  # the CLIP score, recorded beside FID for both arms
    assert 0 <= clip.value <= 100 and 0 <= clip.reference_value <= 100
    assert np.isfinite(r.quality.value)
