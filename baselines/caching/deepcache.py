"""`deepcache`: reuse a UNet's high-level features across denoising steps (Ma, Fang & Wang, 2024, "DeepCache:
Accelerating Diffusion Models for Free", arXiv:2312.00858; CVPR 2024).

A UNet's up-block U_m takes the concatenation of the up-path feature from below and the skip feature of the
down-block D_m. The up-path feature changes little between adjacent steps, so at a full step t the whole
network runs and the input of the up-block on the chosen skip branch m is cached,

    F_cache^t = U_{m+1}^t( . )                                              (paper, eq. 4)

and at the next N-1 steps only the shallow part is recomputed, with the cached feature in place of the deep
path:

    x^{t-k} -> D_1 .. D_m  (skip features)  ->  U_m( Concat(D_m(.), F_cache^t) ) -> .. -> U_1    (eq. 5)

with uniform 1:N refresh (a full pass at steps 0, N, 2N, ...). The branch m is counted in the code from the
shallowest block (branch=0: conv_in, down_blocks[0], up_blocks[-1] and conv_out are recomputed; the paper's
default shallowest branch). The downsampler of the last recomputed down-block feeds only the cached deep path,
so it is skipped on partial steps (for diffusers' DownBlock2D / AttnDownBlock2D; other block types run whole
and the output is dropped). `unet_forward` below is `UNet2DModel.forward` opened up at the blocks; with
interval 1 it reproduces the model to float tolerance (tested).

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
    branch: int = 0  # skip branch whose up-block input is cached, 0 = shallowest (cheapest, paper's default)

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        check_range("branch", self.branch, lo=0)


_NO_DOWNSAMPLE_OK = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")


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


def _down(block, h, emb, keep_downsample: bool, encoder_hidden_states=None):
    xattn = _xattn(block, encoder_hidden_states)
    if keep_downsample or getattr(block, "downsamplers", None) is None:
        return block(hidden_states=h, temb=emb, **xattn)
    if type(block).__name__ not in _NO_DOWNSAMPLE_OK:
        h, res = block(hidden_states=h, temb=emb, **xattn)
        return h, res[:-1]
    res = ()
    for i, resnet in enumerate(block.resnets):
        h = resnet(h, emb)
        if hasattr(block, "attentions"):
            h = block.attentions[i](h, **xattn, return_dict=False)[0] if xattn else block.attentions[i](h)
        res += (h,)
    return h, res


def unet_forward(model, sample, timestep, class_labels, branch: int, cache: dict, full: bool,
                 encoder_hidden_states=None):
    """The UNet's output; a full pass stores the up-path feature of `branch`, a partial one reuses it.
    `encoder_hidden_states`: the text embeddings of a `UNet2DConditionModel` (None for a `UNet2DModel`)."""
    if model.config.center_input_sample:
        sample = 2 * sample - 1.0
    # UNet2DConditionModel.forward passes an explicit upsample size when the input is not a multiple of 2^depth
    odd_size = any(d % (2 ** getattr(model, "num_upsamplers", 0)) for d in sample.shape[-2:])
    emb, t = _embedding(model, sample, timestep, class_labels)
    h = model.conv_in(sample)
    res = (h,)
    n = len(model.down_blocks)
    depth = n if full else branch + 1
    for k, block in enumerate(model.down_blocks[:depth]):
        h, r = _down(block, h, emb, full or k < branch, encoder_hidden_states)
        res += r
    first_up = n - 1 - branch
    if full:
        if model.mid_block is not None:
            h = model.mid_block(h, emb, **_xattn(model.mid_block, encoder_hidden_states))
        ups = list(enumerate(model.up_blocks))
    else:
        h = cache["feature"]
        ups = list(enumerate(model.up_blocks))[first_up:]
    for j, up in ups:
        if j == first_up:
            cache["feature"] = h
        m = len(up.resnets)
        r, res = res[-m:], res[:-m]
        size = res[-1].shape[2:] if odd_size and j < n - 1 else None
        h = up(hidden_states=h, res_hidden_states_tuple=r, temb=emb, upsample_size=size,
               **_xattn(up, encoder_hidden_states))
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
                 summary="UNet: full pass every N steps; in between reuse the cached high-level up-path feature "
                         "and recompute only the shallow down/up blocks of one skip branch")
class DeepCache(Method):
    Config = DeepCacheConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.caching._common import Tracker, cached_subject, full_step, require_backbone, \
            require_diffusion_subject, split_call, wrap_output

        require_diffusion_subject(subject, "deepcache")
        require_backbone(subject.model, "unet", "deepcache")
        cfg = self.config
        model = subject.model
        n = len(model.down_blocks)
        if cfg.branch >= n:
            from bench.config import ConfigError

            raise ConfigError(f"deepcache: branch={cfg.branch} but the UNet has {n} down blocks; "
                              f"valid branches are 0..{n - 1}")
        if any(hasattr(b, "skip_conv") for b in (*model.down_blocks, *model.up_blocks)):
            raise ValueError("deepcache: UNets with skip-sample blocks (SkipDownBlock2D, NCSN++) are not supported")
        if is_conditional_unet(model):
            added = {k: model.config.get(k) for k in ("addition_embed_type", "encoder_hid_dim_type")
                     if model.config.get(k) is not None}
            if added:
                raise ValueError(f"deepcache: this UNet2DConditionModel takes added conditions {added} (SDXL-style "
                                 f"added_cond_kwargs), which the cached call does not pass; supported: "
                                 f"UNet2DModel and UNet2DConditionModel without them (Stable Diffusion 1.x/2.x)")
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
