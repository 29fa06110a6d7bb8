"""`block-drop`: with nothing removed (or no recovery steps) the student is the reference; a removed DiT block is
the same network as the reference with that block's adaLN-zero gates set to zero; removed UNet blocks really
leave (parameters, MACs) and the up path still pairs its skips; the KD terms compare the right things; validation
names the valid blocks; the trained student is cached. Random-weight digits denoisers and a stub task with a few
training images keep every test to seconds."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.api import TrainingSplit

from baselines.pruning import block_drop as bd
from bench.config import ConfigError
from bench.registry import create_method

STEPS = 3


class StubTask(TrainingSplit):
    """What block-drop uses of a digits-gen task: its training split, prepare and evaluate (counted)."""

    def training_split(self):
        return self.train

    def __init__(self, backbone: str):
        from tasks._kit.classification import Split

        self.backbone, self.evaluated = backbone, 0
        self.spec = SimpleNamespace(name=f"stub-{backbone}", version="1")
        gen = torch.Generator().manual_seed(0)
        self.train = Split(torch.rand(24, 1, 16, 16, generator=gen) * 2 - 1, torch.arange(24) % 10)

    def prepare(self, model, ctx):
        from tasks._kit import diffusion
        from tasks.base import Subject

        return Subject(model.eval(), "image-generation",
                       dict(diffusion.sampling_extra(self.backbone), num_inference_steps=STEPS))

    def evaluate(self, subject, ctx):
        from tasks.base import Evaluation

        self.evaluated += 1
        return Evaluation(1.0, np.ones(2), np.zeros((2, 16, 16)))


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks.base import RunContext

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=2)


def reference(backbone: str):
    from tasks._kit import diffusion

    task = StubTask(backbone)
    model = diffusion.build_unet() if backbone == "unet" else diffusion.build_dit()
    return task, task.prepare(model, None)


def block_drop(subject, task, ctx, **overrides):
    return create_method("block-drop", {k: str(v) for k, v in overrides.items()}).apply(subject, task, ctx)


def images(subject):
    from tasks._kit.diffusion import eval_inputs, sample

    noise, labels = eval_inputs(3, 0)
    return sample(subject, noise, labels)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_nothing_removed_is_the_reference(backbone, ctx):
    task, subject = reference(backbone)
    applied = block_drop(subject, task, ctx, drop="none")
    assert torch.equal(images(applied.subject), images(subject))
    assert applied.cost.steps == 0 and applied.controls == [] and task.evaluated == 0
    assert applied.stats()["parameters_removed"] == 0
    # blocks removed but zero recovery steps: the pruned reference, untrained (and no control to compare it with)
    pruned = block_drop(subject, task, ctx, steps=0)
    assert pruned.cost.steps == 0 and pruned.stats()["removed_blocks"] > 0


def test_a_removed_dit_block_is_the_block_with_zero_gates(ctx):
    """adaLN-zero: a block whose attention and MLP gates are 0 adds nothing to the residual stream, so the
    reference with block 2's gates zeroed must equal the student without block 2."""
    task, subject = reference("dit")
    student = block_drop(subject, task, ctx, drop="block2", steps=0).subject
    assert len(student.model.transformer_blocks) == 3
    gated = bd.build_student(subject.model, [])
    lin = gated.transformer_blocks[2].norm1.linear  # 6 chunks: shift, scale, gate (msa); shift, scale, gate (mlp)
    width = lin.out_features // 6
    with torch.no_grad():
        for chunk in (2, 5):
            lin.weight[chunk * width:(chunk + 1) * width] = 0
            lin.bias[chunk * width:(chunk + 1) * width] = 0
    torch.testing.assert_close(images(student), images(task.prepare(gated, ctx)), rtol=1e-4, atol=1e-4)


def test_unet_blocks_really_leave_and_the_skips_still_pair(ctx):
    from bench.measure import count_macs

    task, subject = reference("unet")
    model = subject.model
    names = bd.resolve(model, "bk-sdm")
    assert names == ["mid", "up0.1", "up1.1", "up2.1"]
    applied = block_drop(subject, task, ctx, steps=0)
    student = applied.subject.model
    gone = [model.mid_block, *(m for j in range(3) for m in (model.up_blocks[j].resnets[1],))]
    gone.append(model.up_blocks[1].attentions[1])
    n_gone = sum(p.numel() for m in gone for p in m.parameters())
    assert applied.stats()["parameters_removed"] == n_gone
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in model.parameters()) - n_gone
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 7])
    with torch.inference_mode():
        assert count_macs(lambda: student(x, t, class_labels=y)) < 0.8 * count_macs(lambda: model(x, t, class_labels=y))
        feats = {}
        handles = bd._record(bd.stage_modules(student), feats)
        out = student(x, t, class_labels=y).sample
        ref_feats = {}
        handles += bd._record(bd.stage_modules(model), ref_feats)
        model(x, t, class_labels=y)
    for h in handles:
        h.remove()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert "mid" not in feats and "mid" in ref_feats
    for k in ("down0", "down1", "down2"):  # the down path is untouched
        assert torch.equal(feats[k], ref_feats[k])
    # a width-keeping down pair (down0: 32 -> 32) becomes the identity: its skip output is its input
    down = bd.build_student(model, ["down0.0"])
    h = torch.randn(2, 32, 16, 16)
    _, skips = down.down_blocks[0](h, torch.randn(2, down.config.block_out_channels[0] * 4))
    assert torch.equal(skips[0], h)


def test_kd_terms_vanish_for_a_student_equal_to_the_teacher(ctx):
    """L_outKD and L_featKD compare the student with the teacher on the same z_t: zero for an unchanged copy;
    with the mid-block removed the feature term covers the stages both have."""
    task, subject = reference("unet")
    cfg = bd.BlockDropConfig(steps=1, batch_size=4, lr=1e-12)
    same = bd.build_student(subject.model, [])
    _, steps, losses = bd.distill(same, subject.model, task.train, cfg, ctx, "test")
    assert steps == 1 and losses["out_kd"] < 1e-10 and losses["feat_kd"] < 1e-10 and losses["task"] > 0.1
    pruned = bd.build_student(subject.model, ["mid"])
    _, _, losses = bd.distill(pruned, subject.model, task.train, cfg, ctx, "test")
    assert losses["out_kd"] > 1e-6 and losses["feat_kd"] > 1e-6


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_recovery_trains_caches_and_reports_the_untrained_control(backbone, ctx, monkeypatch):
    task, subject = reference(backbone)
    first = block_drop(subject, task, ctx, steps=3, batch_size=4)
    assert first.cost.steps == 3 and first.cost.samples_seen == 12 and first.cost.seconds > 0
    assert [c.name for c in first.controls] == ["removed_without_recovery"] and task.evaluated == 1
    untrained = block_drop(subject, task, ctx, steps=0).subject.model.state_dict()
    trained = first.subject.model.state_dict()
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)
    calls = []
    monkeypatch.setattr(bd, "distill", lambda *a, **k: calls.append(1))
    again = block_drop(subject, task, ctx, steps=3, batch_size=4)  # cached: no training, same weights and cost
    assert calls == [] and again.cost.seconds == first.cost.seconds
    assert all(torch.equal(v, again.subject.model.state_dict()[k]) for k, v in trained.items())


def test_validation_names_the_valid_blocks(ctx):
    task, unet = reference("unet")
    with pytest.raises(ConfigError, match=r"up1\.0.*valid: mid, down0\.0, up0\.1, up1\.1, up2\.1"):
        block_drop(unet, task, ctx, drop="mid,up1.0")
    task, dit = reference("dit")
    with pytest.raises(ConfigError, match="valid: block0, block1, block2, block3"):
        block_drop(dit, task, ctx, drop="block4")
    with pytest.raises(ConfigError, match="all 4 DiT blocks"):
        block_drop(dit, task, ctx, drop="block0,block1,block2,block3")
    for bad in ({"steps": "-1"}, {"lr": "0"}, {"drop": " "}, {"lambda_feat": "-1"}):
        with pytest.raises(ConfigError):
            create_method("block-drop", bad)


def test_refuses_a_task_without_training_data(ctx):
    task, subject = reference("unet")
    bare = dataclasses.replace(subject)
    with pytest.raises(ValueError, match="training split"):
        block_drop(bare, SimpleNamespace(spec=task.spec), ctx)


@pytest.mark.slow
@pytest.mark.parametrize("task, method", [("digits-gen", "block-drop"), ("digits-gen-dit", "block-drop"),
                                          ("digits-gen-dit", "tome")])
def test_smoke_run(tmp_path, monkeypatch, task, method):
    """Whole runs through the runner (smoke budget: a smoke reference, 20 recovery steps): fewer MACs recorded."""
    from bench.runner import run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    result = run(task, method, budget="smoke", results_root=tmp_path).result
    assert result.status == "ok" and result.compute.method < result.compute.reference
    if method == "block-drop":
        assert result.size.method.parameters < result.size.reference.parameters and result.cost.steps > 0
        assert [c.name for c in result.controls] == ["removed_without_recovery"]
