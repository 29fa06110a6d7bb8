"""`deepcache`: reuse a UNet's high-level features across denoising steps (Ma, Fang & Wang, 2024, "DeepCache:
Accelerating Diffusion Models for Free", arXiv:2312.00858; CVPR 2024).

A UNet's up-block U_m takes the concatenation of the up-path feature from below and the skip feature of the
down-block D_m. The up-path feature changes little between adjacent steps, so at a full step t the whole
network runs and the input of the up-block on the chosen skip branch m is cached,

    F_cache^t = U_{m+1}^t( . )                                              (paper, eq. 4)

and at the next N-1 steps only the shallow part is recomputed, with the cached feature in place of the deep
path:

    x^{t-k} -> D_1 .. D_m  (skip features)  ->  U_m( Concat(D_m(.), F_cache^t) ) -> .. -> U_1    (eq. 5)

with uniform 1:N refresh (a full pass at steps 0, N, 2N, ...).

Branches are numbered as the authors' package numbers them (`DeepCacheSDHelper.set_params(cache_branch_id=b)`,
DeepCache 0.1.1): with L = layers_per_block + 1 "layers" per down block (its resnet/attention pairs, then its
downsampler), b = L B + l names down block B's layer l, and a partial step recomputes

    conv_in;  down blocks 0 .. B-1 whole;  the first l resnet/attention pairs of down block B (not its
    downsampler);  the last l + 1 resnet/attention pairs of up block B (counted from the shallow end, so
    up_blocks[-1 - B]) and its upsampler;  up blocks B-1 .. 0 whole;  conv_out

with everything deeper (the rest of down block B, the deeper down blocks, the mid block, the first pairs of up
block B) taken from the last full step: F_cache is the input of up block B's first recomputed pair. The skip
features those recomputed pairs concatenate are exactly the ones recomputed on the way down, so nothing stale
enters the shallow path but F_cache. The default b = 0 is the authors' (and the paper's cheapest branch): conv_in,
the last resnet (and attention) of up_blocks[-1], conv_out. On Stable Diffusion (2 pairs per block, L = 3) the
ids are the package's exactly; the package hard-codes L = 3, so on the digits UNet (1 pair per block) its ids
would skip some branches and name others twice, and here L = layers_per_block + 1 keeps one id per branch
(0 .. 5 on digits-gen, 0 .. 11 on SD). Before 2026-12-07 `branch` k named the whole-block branch, b = L k + L - 1
(the package's 2, 5, 8 on SD); the committed record was re-run.

`unet_forward` below is `UNet2DModel.forward` (and `UNet2DConditionModel.forward`) opened up at the blocks and,
on the cached up block, at its pairs; with interval 1 it reproduces the model to float tolerance, and a test
drives a literal reading of the package's skip rule (module outputs replayed from the last full step) against
it bit for bit on every branch.

The authors' `DeepCache` package (0.1.1) ships `DeepCacheSDHelper`, which swaps the `forward` of every
resnet/attention/block of a `UNet2DConditionModel` inside a Stable Diffusion pipeline and reads the step from
the pipeline's scheduler. It does not take a bare `UNet2DModel` (no cross-attention blocks, no pipeline), so
the same rule is hand-written here at block granularity; the cached feature and the refresh rule are the
same. Caches per branch (conditional / unconditional call), reset per batch.

Backbones: a class-conditional `UNet2DModel` (digits-gen) and a text-conditional `UNet2DConditionModel`
without added conditions (Stable Diffusion 1.x/2.x, the `coco` task): its cross-attention blocks get the
call's `encoder_hidden_states`, the rest of the rule is the same. With classifier-free guidance batched into
one call (conditional and unconditional rows, as diffusers' pipelines do), the cached feature holds both rows'
features, each row reusing its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class DeepCacheConfig:
    interval: int = 3  # N: a full UNet pass every N steps, partial passes in between (paper: 3-5 on 50 steps)
    # the authors' cache_branch_id: L B + l is down block B's layer l (L = layers_per_block + 1); 0, their
    # default and the cheapest, recomputes conv_in, the last pair of up_blocks[-1] and conv_out
    branch: int = 0

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        check_range("branch", self.branch, lo=0)


def is_conditional_unet(model) -> bool:
    """A `UNet2DConditionModel` (text-conditional, cross-attention); else a `UNet2DModel`."""
    return hasattr(model, "get_time_embed")


def _embedding(model, sample, timestep, class_labels):
    """The time (+ class) embedding, as UNet2DModel.forward / UNet2DConditionModel.forward compute it."""
    import torch

    if is_conditional_unet(model):
        emb = model.time_embedding(model.get_time_embed(sample=sample, timestep=timestep), None)
        class_emb = model.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if model.config.class_embeddings_concat else emb + class_emb
        if model.time_embed_act is not None:
            emb = model.time_embed_act(emb)
        return emb, None
    t = timestep
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.long, device=sample.device)
    elif t.ndim == 0:
        t = t[None].to(sample.device)
    t = t * torch.ones(sample.shape[0], dtype=t.dtype, device=t.device)
    emb = model.time_embedding(model.time_proj(t).to(dtype=model.dtype))
    if model.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        if model.config.class_embed_type == "timestep":
            class_labels = model.time_proj(class_labels)
        emb = emb + model.class_embedding(class_labels).to(dtype=model.dtype)
    return emb, t


def _xattn(block, encoder_hidden_states) -> dict:
    """The cross-attention argument for a block that has cross-attention (Stable Diffusion's), else nothing."""
    return {"encoder_hidden_states": encoder_hidden_states} if getattr(block, "has_cross_attention", False) else {}


_PAIRED_DOWN = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")
_PAIRED_UP = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")


def layers_per_down_block(model) -> int:
    """L of the branch ids: a down block's resnet/attention pairs plus its downsampler's slot."""
    return len(model.down_blocks[0].resnets) + 1


def branch_position(model, branch: int) -> tuple[int, int]:
    """(B, l) of branch id b = L B + l: down block B, its layer l (the authors' block and layer ids)."""
    return divmod(branch, layers_per_down_block(model))


def check_branch(model, branch: int) -> None:
    """Raise unless the UNet's blocks pair up as the id arithmetic assumes and the two blocks the branch cuts
    through are ones whose pairs can be run one by one."""
    from bench.config import ConfigError

    pairs = {len(b.resnets) for b in model.down_blocks}
    if len(pairs) != 1 or any(len(u.resnets) != len(model.down_blocks[0].resnets) + 1 for u in model.up_blocks):
        raise ValueError("deepcache: the UNet's down blocks must share one layers_per_block, each up block having "
                         "one resnet more (diffusers' UNet2DModel / UNet2DConditionModel layout)")
    n_ids = len(model.down_blocks) * layers_per_down_block(model)
    if not 0 <= branch < n_ids:
        raise ConfigError(f"deepcache: branch={branch} but this UNet has {len(model.down_blocks)} down blocks of "
                          f"{layers_per_down_block(model)} layers; valid branches are 0..{n_ids - 1}")
    blk, _ = branch_position(model, branch)
    down, up = model.down_blocks[blk], model.up_blocks[len(model.up_blocks) - 1 - blk]
    if type(down).__name__ not in _PAIRED_DOWN or type(up).__name__ not in _PAIRED_UP:
        raise ValueError(f"deepcache: branch {branch} cuts through {type(down).__name__} / {type(up).__name__}; "
                         f"supported block types: {', '.join(_PAIRED_DOWN + _PAIRED_UP)}")
    if all(getattr(up, k, None) for k in ("s1", "s2", "b1", "b2")):
        raise ValueError("deepcache: FreeU is enabled on the cached up block; disable it (unet.disable_freeu())")


def _attend(block, i: int, h, xattn: dict):
    """Pair i's attention (if the block has one), called as the block's own forward calls it."""
    if not hasattr(block, "attentions"):
        return h
    return block.attentions[i](h, **xattn, return_dict=False)[0] if xattn else block.attentions[i](h)


def _down_pairs(block, h, emb, count: int, xattn: dict) -> tuple:
    """The skip features of the first `count` resnet/attention pairs of a down block (its downsampler not run)."""
    res = ()
    for i in range(count):
        h = _attend(block, i, block.resnets[i](h, emb), xattn)
        res += (h,)
    return res


def _up_pairs(block, h, feats: list, emb, pairs: range, xattn: dict):
    """An up block's resnet/attention pairs `pairs`, each concatenating the skip feature popped from `feats`."""
    import torch

    for i in pairs:
        h = _attend(block, i, block.resnets[i](torch.cat([h, feats.pop()], dim=1), emb), xattn)
    return h


def _upsample(block, h, emb, size):
    for upsampler in block.upsamplers or ():
        h = upsampler(h, temb=emb) if getattr(block, "upsample_type", None) == "resnet" else upsampler(h, size)
    return h


def unet_forward(model, sample, timestep, class_labels, branch: int, cache: dict, full: bool,
                 encoder_hidden_states=None):
    """The UNet's output; a full pass stores F_cache of `branch` (an id of the authors'), a partial one reuses
    it and recomputes only the shallow path. `encoder_hidden_states`: the text embeddings of a
    `UNet2DConditionModel` (None for a `UNet2DModel`)."""
    if model.config.center_input_sample:
        sample = 2 * sample - 1.0
    # UNet2DConditionModel.forward passes an explicit upsample size when the input is not a multiple of 2^depth
    odd_size = any(d % (2 ** getattr(model, "num_upsamplers", 0)) for d in sample.shape[-2:])
    emb, t = _embedding(model, sample, timestep, class_labels)
    blk, layer = branch_position(model, branch)
    n = len(model.down_blocks)
    cut = n - 1 - blk  # the up block F_cache enters
    h = model.conv_in(sample)
    res = (h,)
    for block in model.down_blocks if full else model.down_blocks[:blk]:
        h, r = block(hidden_states=h, temb=emb, **_xattn(block, encoder_hidden_states))
        res += r
    if full:
        if model.mid_block is not None:
            h = model.mid_block(h, emb, **_xattn(model.mid_block, encoder_hidden_states))
    else:
        res += _down_pairs(model.down_blocks[blk], h, emb, layer, _xattn(model.down_blocks[blk], encoder_hidden_states))
    for j, up in enumerate(model.up_blocks):
        if j < cut and not full:
            continue
        xattn = _xattn(up, encoder_hidden_states)
        m = len(up.resnets)
        if j == cut:  # pairs start .. m - 1 are recomputed; F_cache is the input of pair `start`
            start = m - 1 - layer
            feats, res = list(res[-(m if full else layer + 1):]), res[:-(m if full else layer + 1)]
            size = res[-1].shape[2:] if odd_size and j < n - 1 else None
            if full:
                cache["feature"] = h = _up_pairs(up, h, feats, emb, range(start), xattn)
            h = _up_pairs(up, cache["feature"], feats, emb, range(start, m), xattn)
            h = _upsample(up, h, emb, size)
            continue
        r, res = res[-m:], res[:-m]
        size = res[-1].shape[2:] if odd_size and j < n - 1 else None
        h = up(hidden_states=h, res_hidden_states_tuple=r, temb=emb, upsample_size=size, **xattn)
    if res:
        raise RuntimeError(f"deepcache: {len(res)} skip features were left unused; the UNet's blocks do not pair up")
    if model.conv_norm_out is not None:
        h = model.conv_act(model.conv_norm_out(h))
    h = model.conv_out(h)
    if not is_conditional_unet(model) and model.config.time_embedding_type == "fourier":
        h = h / t.reshape((h.shape[0], *([1] * len(h.shape[1:]))))
    return h


@register_method("deepcache", family="caching", paper="Ma et al., DeepCache: Accelerating Diffusion Models for "
                 "Free", year=2024, url="https://arxiv.org/abs/2312.00858", modalities=("image-generation",),
                 version="2",  # 2: `branch` is the authors' cache_branch_id (1 named whole-block branches)
                 summary="UNet: full pass every N steps; in between reuse the cached high-level up-path feature "
                         "and recompute only the shallow path of one skip branch (the authors' branch ids)")
class DeepCache(Method):
    Config = DeepCacheConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import Tracker, cached_subject, full_step, require_backbone, \
            require_diffusion_subject, split_call, wrap_output

        require_diffusion_subject(subject, "deepcache")
        require_backbone(subject.model, "unet", "deepcache")
        cfg = self.config
        model = subject.model
        if any(hasattr(b, "skip_conv") for b in (*model.down_blocks, *model.up_blocks)):
            raise ValueError("deepcache: UNets with skip-sample blocks (SkipDownBlock2D, NCSN++) are not supported")
        if is_conditional_unet(model):
            added = {k: model.config.get(k) for k in ("addition_embed_type", "encoder_hid_dim_type")
                     if model.config.get(k) is not None}
            if added:
                raise ValueError(f"deepcache: this UNet2DConditionModel takes added conditions {added} (SDXL-style "
                                 f"added_cond_kwargs), which the cached call does not pass; supported: "
                                 f"UNet2DModel and UNet2DConditionModel without them (Stable Diffusion 1.x/2.x)")
        check_branch(model, cfg.branch)
        caches: dict[int, dict] = {}
        tracker = Tracker(caches.clear)

        def make_call(model, step, branch_call):
            full = full_step(step, cfg.interval)
            cache = caches.setdefault(branch_call, {})

            def call(*args, **kwargs):
                x, t, y, return_dict, text = split_call(args, kwargs, "sample", text=is_conditional_unet(model))
                if not full and "feature" not in cache:
                    raise RuntimeError("deepcache: a partial step came before any full step (the cache is empty)")
                tracker.count("nfe_full" if full else "nfe_partial")
                out = unet_forward(model, x, t, y, cfg.branch, cache, full, encoder_hidden_states=text)
                return wrap_output(model, out, return_dict)

            return call

        return Applied(cached_subject(subject, tracker, make_call), Cost(description="training-free"),
                       stats=tracker.stats)
