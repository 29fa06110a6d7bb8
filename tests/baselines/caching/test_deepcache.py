"""deepcache on the digits-gen UNet: exact at interval 1, the shallow path reproduces the full pass from a fresh
cache, caches reset per batch, config and backbone checks."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def test_interval_one_reproduces_the_uncached_sampler(unet_subject, inputs, helpers):
    ref = helpers.sample(unet_subject, inputs[0])
    applied = helpers.apply("deepcache", unet_subject, interval=1)
    out = helpers.sample(applied.subject, inputs[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert applied.stats() == {"nfe_full": helpers.steps, "nfe_partial": 0}


@pytest.mark.parametrize("branch", range(6))
def test_partial_pass_on_a_fresh_cache_equals_the_full_pass(unet_subject, branch):
    """Run the shallow path right after a full pass on the same input: the cached feature is exact, so the
    output must be too (checks the skip-feature bookkeeping and the skipped downsampler of every branch)."""
    from baselines.caching.deepcache import unet_forward

    model = unet_subject.model
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([600, 600]), torch.tensor([3, 7])
    with torch.inference_mode():
        ref = model(x, t, class_labels=y).sample
        cache = {}
        full = unet_forward(model, x, t, y, branch, cache, full=True)
        partial = unet_forward(model, x, t, y, branch, cache, full=False)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial, ref, rtol=1e-5, atol=1e-5)


def test_caching_changes_the_output_and_counts_partial_steps(unet_subject, inputs, helpers):
    ref = helpers.sample(unet_subject, inputs[0])
    applied = helpers.apply("deepcache", unet_subject, interval=3)
    out = helpers.sample(applied.subject, inputs[0])
    assert not torch.allclose(out, ref, atol=1e-4)
    assert applied.stats() == {"nfe_full": 3, "nfe_partial": helpers.steps - 3}  # steps 0, 3, 6 of 7


def test_caches_reset_between_batches(unet_subject, inputs, helpers):
    a = helpers.apply("deepcache", unet_subject, interval=3).subject
    helpers.sample(a, inputs[0])
    second = helpers.sample(a, inputs[1])
    alone = helpers.sample(helpers.apply("deepcache", unet_subject, interval=3).subject, inputs[1])
    assert torch.equal(second, alone)


def test_the_model_is_left_untouched(unet_subject, inputs, helpers):
    before = helpers.sample(unet_subject, inputs[0])
    applied = helpers.apply("deepcache", unet_subject, interval=2)
    helpers.sample(applied.subject, inputs[0])
    assert applied.subject.model is unet_subject.model
    assert torch.equal(helpers.sample(unet_subject, inputs[0]), before)


def test_config_validation(unet_subject, helpers):
    with pytest.raises(ConfigError, match="interval"):
        helpers.apply("deepcache", unet_subject, interval=0)
    with pytest.raises(ConfigError, match="valid branches are 0..5"):  # 3 down blocks x (1 pair + downsampler)
        helpers.apply("deepcache", unet_subject, branch=6)


def test_refuses_a_dit(dit_subject, helpers):
    with pytest.raises(ValueError, match="needs a UNet"):
        helpers.apply("deepcache", dit_subject)


# ---- the authors' branch ids, against an independent reading of their skip rule ----------------------------------

def replayed(model, branch: int):
    """`model` with the DeepCache package's rule (DeepCacheSDHelper, 0.1.1) read independently: every down/up
    block, resnet, attention, down/upsampler and the mid block answers a partial step with its own output of
    the last full step when the rule says skip. Ids: down block B's layer l is b = L B + l (L = pairs + 1, the
    downsampler being layer `pairs`); up blocks and their pairs are counted from the shallow end. Skip on a
    partial step: anything in a deeper block, the mid block; in block B a down layer >= l, an up pair > l."""
    state = {"full": True}
    blk, layer = divmod(branch, len(model.down_blocks[0].resnets) + 1)
    saved = {}

    def wrap(module, key, skip: bool):
        inner = module.forward

        def forward(*args, **kwargs):
            if skip and not state["full"]:
                return saved[key]
            out = inner(*args, **kwargs)
            saved[key] = out
            return out

        module.forward = forward

    for b, block in enumerate(model.down_blocks):
        wrap(block, ("down", b), b > blk or (b == blk and layer == 0))
        for i, r in enumerate(block.resnets):
            wrap(r, ("down", b, "resnet", i), b > blk or (b == blk and i >= layer))
        for i, a in enumerate(getattr(block, "attentions", None) or ()):
            wrap(a, ("down", b, "attn", i), b > blk or (b == blk and i >= layer))
        for d in block.downsamplers or ():
            wrap(d, ("down", b, "ds"), b >= blk)
    wrap(model.mid_block, ("mid",), True)
    n = len(model.up_blocks)
    for j, block in enumerate(model.up_blocks):
        b, m = n - 1 - j, len(block.resnets)
        wrap(block, ("up", b), b > blk)
        for i, r in enumerate(block.resnets):
            wrap(r, ("up", b, "resnet", i), b > blk or (b == blk and m - 1 - i > layer))
        for i, a in enumerate(getattr(block, "attentions", None) or ()):
            wrap(a, ("up", b, "attn", i), b > blk or (b == blk and m - 1 - i > layer))
        for u in block.upsamplers or ():
            wrap(u, ("up", b, "us"), b > blk)
    return state


def tiny_sd_unet():
    """A Stable-Diffusion-shaped UNet2DConditionModel (2 pairs per block, cross-attention), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                                        "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()


def trajectories(model, branch: int, conditional: bool, interval: int = 3, steps: int = 7):
    """(ours, replayed): the outputs along one fixed-update loop x <- x - 0.1 eps, each fed its own outputs."""
    import copy

    from baselines.caching.deepcache import unet_forward

    twin = copy.deepcopy(model)
    state = replayed(twin, branch)
    g = torch.Generator().manual_seed(branch)
    x0 = torch.randn(2, model.config.in_channels, 8 if conditional else 16, 8 if conditional else 16, generator=g)
    cond = torch.randn(2, 3, 8, generator=g) if conditional else torch.tensor([3, 7])
    xs, xr, cache, outs = x0.clone(), x0.clone(), {}, ([], [])
    with torch.inference_mode():
        for k in range(steps):
            t, full = torch.tensor(900 - 120 * k), k % interval == 0
            state["full"] = full
            if conditional:
                a = unet_forward(model, xs, t, None, branch, cache, full, encoder_hidden_states=cond)
                b = twin(xr, t, encoder_hidden_states=cond).sample
            else:
                a = unet_forward(model, xs, t, cond, branch, cache, full)
                b = twin(xr, t, class_labels=cond).sample
            outs[0].append(a)
            outs[1].append(b)
            xs, xr = xs - 0.1 * a, xr - 0.1 * b
    return torch.stack(outs[0]), torch.stack(outs[1])


@pytest.mark.parametrize("branch", range(6))
def test_every_branch_matches_the_authors_skip_rule_on_the_digits_unet(unet_subject, branch):
    ours, theirs = trajectories(unet_subject.model, branch, conditional=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("branch", range(9))
def test_every_branch_matches_the_authors_skip_rule_on_an_sd_unet(branch):
    """On SD's layout (2 pairs per block: L = 3) the ids are the package's cache_branch_id exactly."""
    ours, theirs = trajectories(tiny_sd_unet(), branch, conditional=True)
    assert torch.equal(ours, theirs)


def test_branches_cost_what_they_recompute(unet_subject):
    """Deeper branches recompute more: the partial pass's MACs grow with the id and stay below the full pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from baselines.caching.deepcache import unet_forward

    model = unet_subject.model
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor(500), torch.tensor([1])

    def flops(branch, full):
        cache = {}
        with torch.inference_mode():
            unet_forward(model, x, t, y, branch, cache, True)
            with FlopCounterMode(display=False) as counter:
                unet_forward(model, x, t, y, branch, cache, full)
        return counter.get_total_flops()

    partial = [flops(b, False) for b in range(6)]
    assert partial == sorted(partial) and len(set(partial)) == 6
    assert partial[-1] < flops(0, True)
