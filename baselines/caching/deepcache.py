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


_NO_DOWNSAMPLE_OK = ("DownBlock2D", "AttnDownBlock2D")


def _embedding(model, sample, timestep, class_labels):
    """The time (+ class) embedding, as UNet2DModel.forward computes it."""
    import torch

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


def _down(block, h, emb, keep_downsample: bool):
    if keep_downsample or getattr(block, "downsamplers", None) is None:
        return block(hidden_states=h, temb=emb)
    if type(block).__name__ not in _NO_DOWNSAMPLE_OK:
        h, res = block(hidden_states=h, temb=emb)
        return h, res[:-1]
    res = ()
    for i, resnet in enumerate(block.resnets):
        h = resnet(h, emb)
        if hasattr(block, "attentions"):
            h = block.attentions[i](h)
        res += (h,)
    return h, res


def unet_forward(model, sample, timestep, class_labels, branch: int, cache: dict, full: bool):
    """UNet2DModel's output; a full pass stores the up-path feature of `branch`, a partial one reuses it."""
    if model.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb, t = _embedding(model, sample, timestep, class_labels)
    h = model.conv_in(sample)
    res = (h,)
    n = len(model.down_blocks)
    depth = n if full else branch + 1
    for k, block in enumerate(model.down_blocks[:depth]):
        h, r = _down(block, h, emb, keep_downsample=full or k < branch)
        res += r
    first_up = n - 1 - branch
    if full:
        if model.mid_block is not None:
            h = model.mid_block(h, emb)
        ups = list(enumerate(model.up_blocks))
    else:
        h = cache["feature"]
        ups = list(enumerate(model.up_blocks))[first_up:]
    for j, up in ups:
        if j == first_up:
            cache["feature"] = h
        m = len(up.resnets)
        r, res = res[-m:], res[:-m]
        h = up(h, r, emb)
    if res:
        raise RuntimeError(f"deepcache: {len(res)} skip features were left unused; the UNet's blocks do not pair up")
    h = model.conv_out(model.conv_act(model.conv_norm_out(h)))
    if model.config.time_embedding_type == "fourier":
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
        caches: dict[int, dict] = {}
        tracker = Tracker(caches.clear)

        def make_call(model, step, branch_call):
            full = full_step(step, cfg.interval)
            cache = caches.setdefault(branch_call, {})

            def call(*args, **kwargs):
                x, t, y, return_dict = split_call(args, kwargs, "sample")
                if not full and "feature" not in cache:
                    raise RuntimeError("deepcache: a partial step came before any full step (the cache is empty)")
                tracker.count("nfe_full" if full else "nfe_partial")
                return wrap_output(model, unet_forward(model, x, t, y, cfg.branch, cache, full), return_dict)

            return call

        return Applied(cached_subject(subject, tracker, make_call), Cost(description="training-free"),
                       stats=tracker.stats)
