"""`lcm`: the consistency function's boundary condition and its agreement with diffusers' `LCMScheduler`, the
DDIM solver step, distillation towards the teacher on a hand-made case, deterministic few-step sampling, and end
to end runs on the full tasks' tiny random pipelines, offline (coco through a tiny LCM-LoRA written here in the
format `load_lora_weights` reads; imagenet-fid through the training path)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.distillation import _lcm
from bench.config import ConfigError
from bench.profiles import load_profile
from bench.progress import Reporter
from bench.registry import create_method, get_task_spec
from tasks._kit import diffusion
from tasks.base import RunContext

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # latent_fixtures, under --import-mode=importlib too

import latent_fixtures  # noqa: E402


def lcm_scheduler(**kw):
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(diffusion.reference_scheduler().config, **kw)


# ---- the consistency function ----------------------------------------------------------------------------------

def test_the_boundary_condition_holds_exactly_and_the_scalings_are_the_schedulers():
    c_skip, c_out = _lcm.boundary_scalings(torch.tensor(0))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    x, eps = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16) * 100
    abar = diffusion.reference_scheduler().alphas_cumprod
    assert torch.equal(_lcm.consistency(x, torch.zeros(3, dtype=torch.long), eps, abar), x)  # f(x, 0) = x, bit for bit
    assert torch.equal(_lcm.consistency(x, torch.tensor(0), eps, abar, clip=lambda v: v.clamp(-1, 1)), x)
    sched = lcm_scheduler()
    for t in (1, 19, 259, 999):
        want = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        got = _lcm.boundary_scalings(torch.tensor(t))
        assert got[0].item() == pytest.approx(float(want[0]), rel=1e-6)
        assert got[1].item() == pytest.approx(float(want[1]), rel=1e-6)
    # away from 0 the output is (almost) the x0 estimate, not the input
    assert not torch.allclose(_lcm.consistency(x, torch.tensor(999), eps, abar), x)


def test_lcm_schedulers_step_is_the_trained_consistency_function():
    """The last LCMScheduler step returns c_skip x + c_out clip(x0): the function the student was trained as."""
    sched = lcm_scheduler(original_inference_steps=50)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    x, eps = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    out = sched.step(eps, t, x).prev_sample
    want = _lcm.consistency(x, t, eps, sched.alphas_cumprod, clip=_lcm.x0_clip(diffusion.reference_scheduler()))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_the_solver_is_one_ddim_step_of_the_reference_sampler():
    ddim = diffusion.reference_scheduler()
    ddim.set_timesteps(diffusion.REFERENCE_STEPS)
    grid = _lcm.solver_grid(1000, 20)
    assert sorted(ddim.timesteps.tolist()) == grid.tolist()  # k = 20: the reference's own DDIM-50 grid
    x, eps = torch.randn(2, 1, 16, 16) * 3, torch.randn(2, 1, 16, 16)
    t, s = ddim.timesteps[10], ddim.timesteps[11]
    want = ddim.step(eps, t, x).prev_sample
    got = _lcm.ddim_solver_step(x, eps, ddim.alphas_cumprod[t], ddim.alphas_cumprod[s], _lcm.x0_clip(ddim))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- distillation ---------------------------------------------------------------------------------------------

class ConvEps(torch.nn.Module):
    """eps(x, t, y) = conv(x): a hand-made denoiser that ignores t and y."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_distillation_moves_the_student_to_the_teacher():
    """With k = 1000 the grid is {999} and every target sits at s = 0, where f(x, 0) = x: the target is the
    teacher's own DDIM step 999 -> 0, so the student must become the teacher (a conv learns a conv)."""
    teacher, student = ConvEps(0), ConvEps(1)
    abar = diffusion.reference_scheduler().alphas_cumprod
    data = torch.rand(64, 1, 8, 8) * 2 - 1
    setup = _lcm.Distillation(lambda x, t, c: teacher(x), lambda m, x, t, c: m(x), data, torch.zeros(64),
                              abar, None, per_row_t=True)
    gap = lambda: float(sum((a - b).detach().pow(2).sum() for a, b in zip(student.parameters(), teacher.parameters())))  # noqa: E731
    before = gap()
    log = _lcm.distil(student, setup, steps=150, batch_size=16, lr=1e-2, skip=1000, ema_decay=0.95, loss="l2",
                      huber_c=0.001, seed=0)
    assert gap() < 0.05 * before
    assert log["loss_last"] < 0.05 * log["loss_first"]
    # same seed, same student: the loop is deterministic
    again = ConvEps(1)
    _lcm.distil(again, setup, steps=150, batch_size=16, lr=1e-2, skip=1000, ema_decay=0.95, loss="l2",
                huber_c=0.001, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), student.parameters()))


# ---- the method on digits-gen ----------------------------------------------------------------------------------

def smoke_ctx() -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=4, budget="smoke")


@pytest.fixture(scope="module", params=["digits-gen", "digits-gen-dit"])
def digits(request):
    """(task, subject): the task with its data, and a random (seeded) reference of its backbone."""
    task = get_task_spec(request.param).cls()
    task.load()
    return task, task.prepare(task.build_reference(), smoke_ctx())


def test_lcm_on_digits_gen_trains_caches_and_samples_deterministically(digits):
    task, subject = digits
    ctx = smoke_ctx()
    before = {k: v.clone() for k, v in subject.model.state_dict().items()}
    applied = create_method("lcm", {"batch_size": "4"}).apply(subject, task, ctx)
    assert all(torch.equal(v, subject.model.state_dict()[k]) for k, v in before.items())  # the reference is untouched
    assert applied.cost.steps == 20 and applied.cost.seconds > 0 and applied.cost.samples_seen == 80  # smoke: 20 steps
    assert type(applied.subject.extra["scheduler"]).__name__ == "SeededLCMScheduler"
    assert applied.subject.extra["scheduler"].config.original_inference_steps == 1000 // 50  # k = 50
    student = applied.subject.model.state_dict()
    assert any(not torch.equal(v, student[k]) for k, v in before.items())  # it trained

    noise, labels = diffusion.eval_inputs(4, 3)
    torch.manual_seed(1)
    a = diffusion.sample(applied.subject, noise, labels)
    torch.manual_seed(2)  # the global RNG plays no part
    b = diffusion.sample(applied.subject, noise, labels)
    assert torch.equal(a, b)
    # an image depends on its own noise and label, not on its batch
    torch.testing.assert_close(diffusion.sample(applied.subject, noise[1:3], labels[1:3]), a[1:3], rtol=0, atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    assert applied.stats()["nfe"] == 4

    again = create_method("lcm", {"batch_size": "4", "num_inference_steps": "2"}).apply(subject, task, ctx)
    assert again.cost == applied.cost  # loaded from the bench cache with the cost it had
    assert all(torch.equal(v, again.subject.model.state_dict()[k]) for k, v in student.items())
    diffusion.sample(again.subject, noise, labels)
    assert again.stats()["nfe"] == 2


def test_guidance_and_grid_are_checked(digits):
    task, subject = digits
    with pytest.raises(ConfigError, match="no classifier-free guidance"):
        create_method("lcm", {"guidance_scale": "2"}).apply(subject, task, smoke_ctx())
    with pytest.raises(ConfigError, match="grid"):
        create_method("lcm", {"skip": "250", "num_inference_steps": "8"})


# ---- full tasks, offline -----------------------------------------------------------------------------------------

def save_tiny_lcm_lora(sd_folder: Path, folder: Path) -> dict:
    """A random LoRA (rank 2) on the tiny SD UNet's attention projections, saved by the pipeline's
    `save_lora_weights` (pytorch_lora_weights.safetensors, diffusers' key format). Returns its tensors."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lcm-full")
    sd = latent_fixtures.save_tiny_sd(root / "sd")
    return {"sd": sd, "lora": root / "lora", "lora_state": save_tiny_lcm_lora(sd, root / "lora"),
            "data": latent_fixtures.write_coco(root / "data"), "clip": latent_fixtures.save_tiny_clip(root / "clip"),
            "dit": latent_fixtures.save_tiny_dit(root / "dit"), "root": root}


@pytest.fixture
def full_env(files, monkeypatch):
    from tasks import coco, imagenet_fid
    from tasks._kit import fid_stats

    latent_fixtures.register_extractor()
    stats = files["root"] / "ref.npz"
    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.1, size=(200, 24))
    np.savez(stats, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    for k, v in {coco.DATA_ENV: files["data"], coco.REFERENCE_ENV: files["sd"], coco.CLIP_ENV: files["clip"],
                 imagenet_fid.REFERENCE_ENV: files["dit"], imagenet_fid.STATS_ENV: stats,
                 fid_stats.EXTRACTOR_ENV: latent_fixtures.EXTRACTOR}.items():
        monkeypatch.setenv(k, str(v))
    for var in (coco.SPLIT_ENV, imagenet_fid.VAL_ENV, fid_stats.LAYER_ENV, fid_stats.WEIGHTS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(coco.Coco, "num_inference_steps", latent_fixtures.STEPS)
    monkeypatch.setattr(imagenet_fid.ImagenetFid, "num_inference_steps", latent_fixtures.STEPS)
    return files


def test_the_lcm_lora_is_fused_into_a_copy_of_the_unet(full_env):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from baselines.distillation.lcm import load_lcm_lora

    unet = UNet2DConditionModel.from_pretrained(full_env["sd"], subfolder="unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fused = load_lcm_lora(unet, StableDiffusionPipeline, str(full_env["lora"]))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # the reference is untouched
    assert set(fused.state_dict()) == set(before)  # fused: no adapter layers left
    lora = full_env["lora_state"]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    delta = lora[f"{name}.lora.up.weight"] @ lora[f"{name}.lora.down.weight"]  # alpha / r = 1
    torch.testing.assert_close(fused.state_dict()[f"{name}.weight"], before[f"{name}.weight"] + delta)
    changed = {k for k in before if not torch.equal(before[k], fused.state_dict()[k])}
    assert len(changed) == len(lora) // 2  # one weight per adapted layer (up and down per layer)


@pytest.mark.parametrize("task, overrides", [
    # the published-LCM-LoRA path, here the local tiny LoRA (slow: ~25-45 s, most of it the runner's CLIP score,
    # FID and timing; the path itself is covered directly by the next test)
    pytest.param("coco", {}, marks=pytest.mark.slow),
    ("imagenet-fid", {"batch_size": "2", "teacher_samples": "4"}),  # the training path, data-free
])
def test_lcm_runs_on_the_full_tasks_through_the_runner(full_env, results_root, task, overrides):
    from bench.runner import run
    from bench.store import load_result

    overrides = {**overrides, "lora": str(full_env["lora"]), "num_inference_steps": "2"}
    out = run(task, "lcm", overrides=overrides, budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and np.isfinite(r.quality.value)
    assert r.method_stats["nfe"] == 2 and r.speed.speedup > 0
    if task == "coco":
        assert r.cost.steps == 0 and "LCM-LoRA" in r.cost.description
    else:
        assert r.cost.steps == 20 and r.cost.seconds > 0 and "data-free" in r.cost.description


def test_lcm_lora_path_on_coco_samples_deterministically_in_few_steps(full_env):
    from tasks.coco import Coco

    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=2, budget="smoke")
    task = Coco()
    task.load(ctx)
    subject = task.subject_from_state(task.reference_weights(ctx).state, ctx)
    applied = create_method("lcm", {"lora": str(full_env["lora"]), "num_inference_steps": "3"}).apply(subject, task,
                                                                                                     ctx)
    assert applied.cost.steps == 0 and "LCM-LoRA" in applied.cost.description
    assert applied.subject.extra["scheduler"].config.original_inference_steps == 50  # LCM-LoRA's k = 20
    assert applied.subject.model is not subject.model
    noise, cond = task.noise(subject, [0, 1], 0, ctx), task.conditioning(subject, [0, 1], ctx)()
    torch.manual_seed(5)
    a = diffusion.sample(applied.subject, noise, cond)
    b = diffusion.sample(applied.subject, noise, cond)
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert applied.stats()["nfe"] == 3  # guidance 1: the conditional branch only, one call per step
    guided = create_method("lcm", {"lora": str(full_env["lora"]), "num_inference_steps": "3",
                                   "guidance_scale": "1.5"}).apply(subject, task, ctx)
    assert not torch.allclose(diffusion.sample(guided.subject, noise, cond), a)


@pytest.mark.slow  # ~20-50 s: the teacher's latents, 20 distillation steps of the SD UNet, sampling
def test_lcm_training_path_on_coco_uses_captions_outside_the_evaluation(full_env, monkeypatch):
    from tasks import coco
    from tasks.coco import Coco

    encoded = []
    real_encode = coco.encode_prompts
    monkeypatch.setattr(coco, "encode_prompts", lambda pipe, prompts, device: (encoded.append(list(prompts)),
                                                                               real_encode(pipe, prompts, device))[1])

    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=2, budget="smoke")
    task = Coco()
    task.load(ctx)
    subject = task.subject_from_state(task.reference_weights(ctx).state, ctx)
    before = {k: v.clone() for k, v in subject.model.state_dict().items()}
    applied = create_method("lcm", {"published": "false", "batch_size": "2", "teacher_samples": "2",
                                    "num_inference_steps": "2"}).apply(subject, task, ctx)
    assert applied.cost.steps == 20 and "data-free" in applied.cost.description
    chosen = {image_id for image_id, _, _ in task.items}
    outside = [caps[0] for image_id, _, caps in coco.read_captions(*coco.data_folder()) if image_id not in chosen]
    assert outside and [outside[0], outside[1 % len(outside)]] in encoded
    assert all(torch.equal(v, subject.model.state_dict()[k]) for k, v in before.items())
    noise = task.noise(subject, [0], 0, ctx)
    cond = task.conditioning(subject, [0], ctx)()
    one = diffusion.sample(applied.subject, noise, cond)
    assert torch.equal(one, diffusion.sample(dataclasses.replace(applied.subject), noise, cond))
    assert applied.stats()["nfe"] == 2


@pytest.mark.slow  # ~1-2 min: evaluates the published reference (DDIM-50) and trains 20 steps at batch 64
def test_smoke_run_on_digits_gen(results_root):
    from bench.runner import run
    from bench.store import load_result

    out = run("digits-gen", "lcm", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.method_stats["nfe"] == 4 and r.cost.steps == 20 and r.cost.seconds > 0
    assert r.compute.method < r.compute.reference  # 4 network evaluations instead of 50
    assert "class_accuracy" in r.quality.secondary
