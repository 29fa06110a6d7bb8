"""`tome`: exact reproduction at r = 0 (DiT, UNet, Stable Diffusion UNet), the matching against a brute-force
reading of the rule, conservation of the size-weighted sum by the merge, the unmerge's shape and copies, fewer
MACs at r > 0, and the coco task's tiny random SD pipeline (built from configs, offline) end to end."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from baselines.pruning.tome import bipartite_soft_matching
from bench.config import ConfigError
from bench.registry import create_method

STEPS = 4


def subject(backbone: str):
    from tasks._kit import diffusion
    from tasks.base import Subject

    model = (diffusion.build_unet() if backbone == "unet" else diffusion.build_dit()).eval()
    return Subject(model, "image-generation", dict(diffusion.sampling_extra(backbone), num_inference_steps=STEPS))


def tome(s, **overrides):
    return create_method("tome", {k: str(v) for k, v in overrides.items()}).apply(s, None, None)


def eps_trace(s, noise, labels):
    """Every step's denoiser output from the task's loop (random weights make the final images huge)."""
    from tasks._kit.diffusion import sample

    out, inner = [], s.extra["denoise"]

    def record(*args):
        out.append(inner(*args).clone())
        return out[-1]

    images = sample(dataclasses.replace(s, extra=dict(s.extra, denoise=record)), noise, labels)
    return torch.stack(out), images


@pytest.mark.parametrize("backbone", ["dit", "unet"])
def test_ratio_zero_reproduces_the_reference_bit_for_bit(backbone):
    from tasks._kit.diffusion import eval_inputs

    s = subject(backbone)
    noise, labels = eval_inputs(3, 0)
    ref_eps, ref_images = eps_trace(s, noise, labels)
    applied = tome(s, ratio=0, merge_mlp=True)
    eps, images = eps_trace(applied.subject, noise, labels)
    assert torch.equal(eps, ref_eps) and torch.equal(images, ref_images)
    stats = applied.stats()
    assert stats["attention_layers"] == (4 if backbone == "dit" else 4)  # DiT blocks / UNet down, 2 up, mid
    assert stats["mlp_layers"] == (4 if backbone == "dit" else 0) and stats["merged_token_fraction"] == 0
    # the merging processor ran (it is not the stock one), and the reference model was left alone
    procs = {type(m.processor).__name__ for m in applied.subject.model.modules() if hasattr(m, "processor")}
    assert procs == {"ToMeProcessor"}
    assert {type(m.processor).__name__ for m in s.model.modules() if hasattr(m, "processor")} == {"AttnProcessor2_0"}


@pytest.mark.parametrize("backbone", ["dit", "unet"])
def test_merging_changes_the_output_and_removes_macs(backbone):
    from bench.measure import count_macs
    from tasks._kit.diffusion import eval_inputs

    s = subject(backbone)
    noise, labels = eval_inputs(2, 0)
    ref_eps, _ = eps_trace(s, noise, labels)
    applied = tome(s, ratio=0.5, merge_mlp=True)
    eps, _ = eps_trace(applied.subject, noise, labels)
    assert torch.isfinite(eps).all() and not torch.allclose(eps, ref_eps, atol=1e-4)
    assert applied.stats()["merged_token_fraction"] == pytest.approx(0.5)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(500)
    with torch.inference_mode():
        ref_macs = count_macs(lambda: s.extra["denoise"](s.model, x, t, labels, 0))
        macs = count_macs(lambda: s.extra["denoise"](applied.subject.model, x, t, labels, 0))
    assert macs < (0.7 if backbone == "dit" else 1.0) * ref_macs  # the DiT's MLPs merge too
    assert tome(s).stats()["mlp_layers"] == 0  # ToMe-SD's default: the self-attention only
    prop = tome(s, ratio=0.5, merge_mlp=True, proportional_attention=True)
    assert not torch.allclose(eps_trace(prop.subject, noise, labels)[0], eps, atol=1e-6)


def brute_force(metric, r):
    """The rule read literally: A = even, B = odd positions; each a's most similar b; the r best a's merge."""
    a_pos, b_pos = list(range(0, metric.shape[0], 2)), list(range(1, metric.shape[0], 2))
    cos = torch.nn.functional.cosine_similarity(metric[:, None], metric[None], dim=-1)
    best = {a: max(b_pos, key=lambda b: cos[a, b].item()) for a in a_pos}
    chosen = sorted(a_pos, key=lambda a: -cos[a, best[a]].item())[:r]
    return {a: best[a] for a in chosen}


def test_matching_follows_the_rule():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 11, 5, generator=gen, dtype=torch.float64)
    for r in (0, 1, 3, 5):
        m = bipartite_soft_matching(metric, r)
        assert m.r == r and m.keep.shape == (3, 11 - r)
        for row in range(3):
            want = brute_force(metric[row], r)
            assert dict(zip(m.src[row].tolist(), m.dst[row].tolist())) == want
            assert m.keep[row].tolist() == [i for i in range(11) if i not in want]  # order kept
    assert bipartite_soft_matching(metric, 99).r == 6  # capped at |A| = 6: every A-token may merge
    assert bipartite_soft_matching(metric[:, :1], 3).r == 0


def test_merge_conserves_the_size_weighted_sum_and_unmerge_restores_the_shape():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 16, 1), generator=gen).to(torch.float64)
    metric = torch.randn(2, 16, 4, generator=gen, dtype=torch.float64)
    metric[:, 1] = metric[:, 0] + 1e-3  # a near-duplicate: 0 must merge into 1
    m = bipartite_soft_matching(metric, 6)
    merged, merged_size = m.merge(x, size)
    assert merged.shape == (2, 10, 6) and merged_size.shape == (2, 10, 1)
    torch.testing.assert_close((merged * merged_size).sum(1), (x * size).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged_size.sum(1), size.sum(1), rtol=0, atol=0)
    assert 0 in m.src[0].tolist() and m.dst[0][m.src[0].tolist().index(0)] == 1
    # the merged token of 0 and 1 is their size-weighted mean
    pos = m.keep[0].tolist().index(1)
    group = [1] + [a for a, b in zip(m.src[0].tolist(), m.dst[0].tolist()) if b == 1]
    want = sum(size[0, i] * x[0, i] for i in group) / sum(size[0, i] for i in group)
    torch.testing.assert_close(merged[0, pos], want)
    back = m.unmerge(merged)
    assert back.shape == x.shape
    for row in range(2):
        for a, b in zip(m.src[row].tolist(), m.dst[row].tolist()):
            assert torch.equal(back[row, a], back[row, b])  # a merged token's output is copied to its sources
        unmerged = [i for i in m.keep[row].tolist() if i not in m.dst[row].tolist()]
        torch.testing.assert_close(back[row, unmerged], x[row, unmerged], rtol=1e-15, atol=0)  # (s x) / s


def test_config_validation():
    with pytest.raises(ConfigError, match="ratio"):
        create_method("tome", {"ratio": "0.6"})
    with pytest.raises(ConfigError, match="ratio"):
        create_method("tome", {"ratio": "-0.1"})


def test_refuses_a_denoiser_without_self_attention():
    from diffusers import UNet2DModel

    from tasks.base import Subject

    plain = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                        norm_num_groups=4, add_attention=False)
    with pytest.raises(ValueError, match="no self-attention"):
        tome(Subject(plain, "image-generation", {"denoise": None}), ratio=0.5)


def test_on_the_coco_tasks_stable_diffusion_unet(tmp_path, monkeypatch):
    """The coco task with its tiny random SD pipeline (written from configs, offline): r = 0 gives the
    reference's images exactly; r = 0.5 merges in every self-attention (attn1), leaves cross-attention alone,
    and samples finite images."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))
    from latent_fixtures import STEPS as SD_STEPS
    from latent_fixtures import EXTRACTOR, register_extractor, save_tiny_sd, write_coco

    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks import coco
    from tasks._kit import fid_stats
    from tasks.base import RunContext
    from tasks._kit.diffusion import sample

    monkeypatch.setenv(coco.DATA_ENV, str(write_coco(tmp_path / "data")))
    monkeypatch.setenv(coco.REFERENCE_ENV, str(save_tiny_sd(tmp_path / "sd")))
    register_extractor()  # a tiny registered extractor in place of Inception (a download)
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, EXTRACTOR)
    for var in (coco.SPLIT_ENV, coco.CLIP_ENV, fid_stats.LAYER_ENV, fid_stats.WEIGHTS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(coco.Coco, "num_inference_steps", SD_STEPS)
    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=2, budget="smoke")
    task = coco.Coco()
    task.load(ctx)
    s = task.subject_from_state(task.reference_weights(ctx).state, ctx)
    noise, text = task.noise(s, [0, 1], 0, ctx), task.conditioning(s, [0, 1], ctx)()
    ref = sample(s, noise, text)
    same = create_method("tome", {"ratio": "0"}).apply(s, task, ctx)
    assert torch.equal(sample(same.subject, noise, text), ref)
    merged = create_method("tome", {"ratio": "0.5", "merge_mlp": "true"}).apply(s, task, ctx)
    images = sample(merged.subject, noise, text)
    assert images.shape == ref.shape and torch.isfinite(images).all() and not torch.equal(images, ref)
    stats = merged.stats()
    n_self = sum(1 for n, _ in s.model.named_modules() if n.endswith("attn1"))
    assert stats["attention_layers"] == n_self > 0 and stats["mlp_layers"] == n_self
    assert stats["merged_token_fraction"] == pytest.approx(0.5)
    attn2 = [m for n, m in merged.subject.model.named_modules() if n.endswith("attn2")]
    assert attn2 and all(type(m.processor).__name__ != "ToMeProcessor" for m in attn2)
