"""snapfusion (Li et al. 2023): with nothing removed and no training the student is the reference bit for bit; a
block skipped for one forward is block-drop's removal and is put back after; robust training skips blocks; the
evolution removes blocks by quality per latency (a hand-made cost table) and falls back to MACs where a latency
measurement is not resolved; the config's validation names the valid values; and the method end to end on
digits-gen at the smoke budget (cached, deterministic with MAC latencies). The published digits-gen references
(UNet and DiT) and the smoke budget (20 steps, 40 evaluation images) keep each test to seconds."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.distillation import _snapfusion as S
from baselines.pruning import block_drop as bd
from bench.config import ConfigError
from bench.registry import create_method
from tasks._kit import diffusion


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))


TASKS: dict = {}


def loaded(name: str):
    """(task, published reference subject, smoke-budget context) of a digits-gen task, loaded once per session."""
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from bench.registry import get_task_spec
    from tasks.base import RunContext

    if name not in TASKS:
        ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=4, budget="smoke")
        task = get_task_spec(name).cls()
        task.load(ctx)
        TASKS[name] = task, task.subject_from_state(task.reference_weights(ctx).state, ctx), ctx
    return TASKS[name]


def reference(backbone: str):
    task, subject, ctx = loaded("digits-gen" if backbone == "unet" else "digits-gen-dit")
    return task, subject


def snapfusion(subject, task, ctx, **overrides):
    return create_method("snapfusion", {k: str(v) for k, v in overrides.items()}).apply(subject, task, ctx)


def images(subject, n: int = 3):
    noise, labels = diffusion.eval_inputs(n, 0)
    return diffusion.sample(subject, noise, labels)


def ddim(subject, steps: int):
    from diffusers import DDIMScheduler

    from baselines.decoding._samplers import with_scheduler

    return with_scheduler(subject, DDIMScheduler, steps, "ddim", eta=0.0).subject


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_nothing_removed_and_no_training_is_the_reference_bit_for_bit(backbone):
    """The issue's identity: no block removed (latency target 1) and zero robust and distillation steps."""
    task, subject = reference(backbone)
    ctx = loaded(task.spec.name)[2]
    applied = snapfusion(subject, task, ctx, latency_target=1, robust_steps=0, distill_steps=0)
    student = applied.subject.model
    ref_state = subject.model.state_dict()
    assert student is not subject.model and student.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in student.state_dict().items())
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor(500), torch.tensor([1, 2, 3, 4])
    denoise = subject.extra["denoise"]
    with torch.inference_mode():
        assert torch.equal(denoise(student, x, t, y, 0), denoise(subject.model, x, t, y, 0))
    assert applied.subject.extra["num_inference_steps"] == 8
    assert torch.equal(images(applied.subject), images(ddim(subject, 8)))
    stats = applied.stats()
    assert stats["removed_blocks"] == 0 and stats["parameter_fraction_removed"] == 0 and applied.cost.steps == 0
    assert stats["round1_mse_student"] == stats["round1_mse_naive"]  # no training: the same network
    # the controls: the same network at the same steps, so the same evaluation
    assert [c.name for c in applied.controls] == ["slim_ddim_same_steps", "teacher_ddim_same_steps"]
    assert applied.controls[0].value == applied.controls[1].value


@pytest.mark.parametrize("backbone,names", [("unet", ["mid", "up1.1"]), ("unet", ["down0.0", "up2.1"]),
                                            ("dit", ["block0", "block2"])])
def test_a_block_removed_for_one_forward_is_block_drop_s_removal_and_comes_back(backbone, names):
    _, subject = reference(backbone)
    model = subject.model
    before = [id(m) for m in model.modules()]
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 7])
    denoise = subject.extra["denoise"]
    with torch.inference_mode():
        full = denoise(model, x, t, y, 0)
        slim = denoise(bd.build_student(model, names).eval(), x, t, y, 0)
        with S.removed(model, names):
            skipped = denoise(model, x, t, y, 0)
        again = denoise(model, x, t, y, 0)
    assert torch.equal(skipped, slim) and not torch.equal(skipped, full)
    assert torch.equal(again, full) and [id(m) for m in model.modules()] == before


def test_robust_training_skips_blocks_and_leaves_the_architecture_whole():
    """p close to 1 with the mid-block the only candidate: the mid-block is never run, so its weights never move,
    while the rest of the network trains; a draw never removes every DiT block."""
    task, subject = reference("unet")
    student = bd.build_student(subject.model, [])
    mid = {k: v.clone() for k, v in student.mid_block.state_dict().items()}
    other = student.conv_in.weight.detach().clone()
    data = task.training_split()
    rec = S.robust_train(student, subject.model, subject.extra["denoise"], data.x[:24], data.y[:24],
                         subject.extra["scheduler"].alphas_cumprod, ["mid"], False, p=0.999999, steps=3, batch_size=4,
                         lr=1e-3, lambda_out=1.0, gen=torch.Generator().manual_seed(0))
    assert rec["steps"] == 3 and rec["mean_skipped"] == 1.0 and rec["loss_first"] > 0
    assert student.mid_block is not None
    assert all(torch.equal(v, mid[k]) for k, v in student.mid_block.state_dict().items())
    assert not torch.equal(student.conv_in.weight, other)
    gen = torch.Generator().manual_seed(1)
    draws = [S.skip_set(["block0", "block1"], 0.9, gen, keep_one=True) for _ in range(200)]
    assert all(len(d) < 2 for d in draws) and any(len(d) == 1 for d in draws)


def test_the_evolution_removes_blocks_in_order_of_quality_per_latency():
    """A hand-made cost table. Scores (cost / latency saving) a: 0.10/0.10 = 1, b: 0.02/0.05 = 0.4,
    c: 0.30/0.20 = 1.5, d: -0.01/0.05 < 0 (removing it helps): d, b, a, then c; the quality cost of a block is
    re-read after each removal (here c gets cheaper once b is gone: 0.05/0.2 = 0.25, so c goes before a)."""
    latency = {"a": 0.10, "b": 0.05, "c": 0.20, "d": 0.05}
    macs = {"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.1}
    base = {"a": 0.10, "b": 0.02, "c": 0.30, "d": -0.01}
    calls = []

    def cost(removed, block):
        calls.append((tuple(removed), block))
        return 0.05 if block == "c" and "b" in removed else base[block]

    steps = S.evolve(list("abcd"), latency, macs, cost, target=0.0)
    assert [s.name for s in steps] == ["d", "b", "c", "a"]
    assert [s.quality_cost for s in steps] == [-0.01, 0.02, 0.05, 0.10]
    assert [round(s.predicted_ratio, 10) for s in steps] == [0.95, 0.9, 0.7, 0.6]
    assert calls[:4] == [((), "a"), ((), "b"), ((), "c"), ((), "d")]  # every remaining block, every round
    assert calls[4:7] == [(("d",), "a"), (("d",), "b"), (("d",), "c")]
    # it stops as soon as the predicted ratio meets the target
    assert [s.name for s in S.evolve(list("abcd"), latency, macs, cost, target=0.9)] == ["d", "b"]
    assert [s.name for s in S.evolve(list("abcd"), latency, macs, cost, target=0.91)] == ["d", "b"]
    assert S.evolve(list("abcd"), latency, macs, cost, target=1.0) == []
    # the same score: the larger MAC saving first, then the candidates' order
    even = {"a": 0.1, "b": 0.1}
    assert [s.name for s in S.evolve(["a", "b"], even, {"a": 0.1, "b": 0.2}, lambda r, b: 0.1, 0.8)] == ["b", "a"]
    assert [s.name for s in S.evolve(["a", "b"], even, {"a": 0.1, "b": 0.1}, lambda r, b: 0.1, 0.8)] == ["a", "b"]
    # a forbidden set is never tried (a DiT keeps a block): the evolution stops short of the target
    keep = S.evolve(list("abcd"), latency, macs, cost, target=0.0, allowed=lambda names: len(names) < 4)
    assert [s.name for s in keep] == ["d", "b", "c"]


def test_a_latency_measurement_that_is_not_resolved_falls_back_to_macs():
    sure = S.BlockLatency(measured=0.12, low=0.08, high=0.15, macs=0.2, pairs=9)
    noise = S.BlockLatency(measured=0.01, low=-0.03, high=0.09, macs=0.2, pairs=9)
    assert sure.resolved and sure.used == 0.12
    assert not noise.resolved and noise.used == 0.2
    assert not S.BlockLatency(0.0, 0.0, 0.0, 0.05, 0).resolved  # not timed (latency="macs")


def test_the_latency_table_times_each_block_and_counts_its_macs():
    _, subject = reference("unet")
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor(500), torch.arange(4)
    table = S.latency_table(subject.model, lambda m: subject.extra["denoise"](m, x, t, y, 0), ["mid", "up2.1"], 3)
    assert set(table) == {"mid", "up2.1"} and all(r.pairs == 3 for r in table.values())
    assert 0 < table["mid"].macs < table["up2.1"].macs < 0.3  # up2.1 runs at 16x16, the mid-block at 4x4
    assert all(r.low <= r.measured <= r.high and math.isfinite(r.measured) for r in table.values())
    assert all(r.pairs == 0 for r in S.latency_table(subject.model, lambda m: subject.extra["denoise"](m, x, t, y, 0),
                                                      ["mid"], 0).values())


def test_config_validation_names_the_valid_values():
    assert create_method("snapfusion").config.rounds() == [(16, 8)]
    assert create_method("snapfusion", {"teacher_steps": "32"}).config.rounds() == [(32, 16), (16, 8)]
    with pytest.raises(ConfigError, match="valid teacher_steps for this target: 16, 32, 64"):
        create_method("snapfusion", {"teacher_steps": "24"})
    with pytest.raises(ConfigError, match="measured.*macs"):
        create_method("snapfusion", {"latency": "flops"})
    with pytest.raises(ConfigError, match="sampler.*truncated-snr.*snr"):
        create_method("snapfusion", {"weighting": "min-snr"})
    for bad in ({"latency_target": "0"}, {"latency_target": "1.5"}, {"skip_probability": "1"},
                {"robust_steps": "-1"}, {"latency_repeats": "2"}, {"calibration_size": "0"}, {"batch_size": "0"},
                {"lr": "0"}, {"cfg_probability": "1.5"}, {"candidates": " "}):
        with pytest.raises(ConfigError):
            create_method("snapfusion", bad)
    task, subject = reference("unet")
    ctx = loaded("digits-gen")[2]
    with pytest.raises(ConfigError, match="valid: mid, down0.0, up0.1, up1.1, up2.1"):
        snapfusion(subject, task, ctx, candidates="mid,up3.1")
    with pytest.raises(ConfigError, match="block-drop's preset"):
        snapfusion(subject, task, ctx, candidates="bk-sdm")
    with pytest.raises(ConfigError, match="purely conditional.*valid: cfg_probability=0"):
        snapfusion(subject, task, ctx, cfg_probability=0.5)
    with pytest.raises(ValueError, match="training images"):
        create_method("snapfusion").apply(subject, object(), ctx)


def test_the_evolution_on_a_dit_keeps_a_block_and_records_what_it_measured():
    task, subject = reference("dit")
    ctx = loaded("digits-gen-dit")[2]
    applied = snapfusion(subject, task, ctx, latency_target=0.01, latency="macs", robust_steps=0, distill_steps=0,
                         calibration_size=2)
    stats = applied.stats()
    assert len(applied.subject.model.transformer_blocks) == 1 and stats["removed_blocks"] == 3
    assert stats["target_met"] == 0 and sorted(stats[f"block_block{i}_removed_order"] for i in range(4)) == [0, 1, 2, 3]
    assert "latency_ratio_measured" not in stats and "block_block0_latency_measured" not in stats  # MACs only
    gone = [i for i in range(4) if stats[f"block_block{i}_removed_order"]]
    predicted = 1 - sum(stats[f"block_block{i}_macs_saving"] for i in gone)
    assert stats["latency_ratio_predicted"] == pytest.approx(predicted)


def test_smoke_apply_on_digits_gen_is_cached_deterministic_and_slim(tmp_path, monkeypatch):
    task, ref, ctx = loaded("digits-gen")
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    settings = {"latency": "macs"}  # measured latencies differ run to run; MACs make the evolution deterministic
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "a"))
    applied = create_method("snapfusion", settings).apply(ref, task, ctx)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "b"))
    again = create_method("snapfusion", settings).apply(ref, task, ctx)
    state = applied.subject.model.state_dict()
    assert state.keys() == again.subject.model.state_dict().keys()
    assert all(torch.equal(v, again.subject.model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())  # the reference untouched
    noise, labels = diffusion.eval_inputs(4, 7)
    out = diffusion.sample(applied.subject, noise, labels)  # the runner reads the stats after sampling
    assert out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()
    stats = applied.stats()
    assert stats["removed_blocks"] >= 1 and stats["latency_ratio_predicted"] <= 0.7 and stats["target_met"] == 1
    assert sum(p.numel() for p in applied.subject.model.parameters()) < sum(p.numel() for p in ref.model.parameters())
    assert stats["nfe"] == 8 and stats["robust_steps"] == 20 and stats["round1_steps"] == 20
    assert stats["mac_ratio"] < 0.8 and stats["round1_mse_student"] >= 0 and stats["calibration_mse_full"] >= 0
    assert applied.cost.steps == 40 and applied.cost.samples_seen == 40 * 32 and applied.cost.seconds > 0
    assert [c.name for c in applied.controls] == ["slim_ddim_same_steps", "teacher_ddim_same_steps"]
    assert all(math.isfinite(v) for v in stats.values())

    # a third apply finds the student in the cache: nothing is trained or measured again
    monkeypatch.setattr(S, "build", lambda *a, **k: pytest.fail("built again despite the cache"))
    cached = create_method("snapfusion", settings).apply(ref, task, ctx)
    assert cached.cost.seconds == again.cost.seconds and cached.stats()["removed_blocks"] == stats["removed_blocks"]
