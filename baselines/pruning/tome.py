"""`tome`: Token Merging in the self-attention layers of a diffusion denoiser (Bolya et al., 2023, "Token Merging:
Your ViT But Faster", arXiv:2210.09461; for diffusion, Bolya & Hoffman, 2023, "Token Merging for Fast Stable
Diffusion", arXiv:2303.17604).

In every self-attention layer, r = floor(ratio * N) of its N tokens are merged away before the attention and
copied back after it, so the rest of the network sees all N tokens (ToMe-SD's merge / unmerge):

1. Bipartite soft matching on the keys (ToMe, section 3): split the tokens alternately into A (even positions)
   and B (odd positions); with k_i the layer's key of token i averaged over heads,

       sim(a, b) = k_a . k_b / (||k_a|| ||k_b||),      each a in A keeps its best edge  e_a = max_b sim(a, b),

   and the r A-tokens with the largest e_a are merged into their best B-token (several may share one).
2. Merge by size-weighted average, tracking sizes s (every token starts at size 1 in each layer, since the
   previous layer unmerged): for a B-token b receiving the set S_b,

       x_b' = (s_b x_b + sum_{a in S_b} s_a x_a) / s_b',        s_b' = s_b + sum_{a in S_b} s_a,

   so sum_i s_i x_i is conserved (`Matching.merge`). Kept tokens keep their order, so at r = 0 the layer
   computes exactly what diffusers' `AttnProcessor2_0` computes, bit for bit.
3. Attention over the N - r merged tokens. The keys are merged from the full-resolution keys the matching
   already computed (merging is a weighted mean, and to_k is affine, so merge(to_k(x)) = to_k(merge(x)): no
   second key projection). With `proportional_attention`, log s is added to every key's logit
   (softmax(QK^T / sqrt(d) + log s), ToMe eq. 1), as if each merged token were still s tokens.
4. Unmerge (ToMe-SD): every position takes the output of the merged token it went into, y_a := y'_{dst(a)}
   (`Matching.unmerge`); the residual stream stays at full resolution.

With `merge_mlp`, a transformer block's feed-forward input is merged with the same block's matching and its
output unmerged (ToMe-SD's merge_mlp; ToMe-SD merges the self-attention only by default). Applies to every
self-attention `Attention` of the denoiser: a DiT's `transformer_blocks` (digits-gen-dit, imagenet-fid), Stable
Diffusion's `BasicTransformerBlock.attn1` (coco), and a `UNet2DModel`'s AttnDown/AttnUp/mid-block attention
(digits-gen). Cross-attention is left alone (its keys are text tokens). Differences from ToMe-SD: A/B is the
alternate split of the ToMe paper, not ToMe-SD's random 2x2-stride destination choice (deterministic here, no
generator to seed), matching is on the keys (ToMe) rather than on the layer input, and every self-attention
layer is merged (ToMe-SD's max_downsample = 8; its default 1 would touch no layer of the digits UNet, whose
only attention is at 8x8).

Written by hand: the PyPI package named `tome` is unrelated, the authors' `tomesd` (0.1.3, 2023) is
unmaintained and patches diffusers' block classes of its time, and diffusers has no token-merging hook. Here it
is a diffusers attention processor (and a feed-forward wrapper), installed on a copy of the module tree that
shares the reference's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class ToMeConfig:
    ratio: float = 0.5  # fraction of each self-attention layer's tokens merged away, r = floor(ratio * N)
    # (ToMe-SD's default and upper end 0.5; bipartite matching merges at most |A| = N/2)
    merge_mlp: bool = False  # also merge transformer blocks' feed-forward input with the block's matching
    # (ToMe-SD's merge_mlp, off there too; the MLP is two thirds of a DiT block's MACs, so attention alone saves
    # little, but on the digits DiT's 64 tokens merging the MLP at 0.25 took FID from 10.6 to 38 (attention
    # only: 23), measured on seed 1's 500 images)
    proportional_attention: bool = False  # add log(size) to the attention logits (ToMe); ToMe-SD leaves it out

    def validate(self) -> None:
        check_range("ratio", self.ratio, lo=0, hi=0.5)


@dataclass
class Matching:
    """One layer's bipartite matching: which positions stay, which merge into which. Shapes are per batch row:
    keep (B, N - r) ascending, src / dst (B, r), where (B, N) the merged index every position reads back."""

    keep: Any
    src: Any
    dst: Any
    where: Any
    n: int

    @property
    def r(self) -> int:
        return int(self.src.shape[1])

    def _flat(self, idx):
        """Per-row positions -> row-major positions in the (B * N) flattened token axis."""
        import torch

        return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * self.n).reshape(-1)

    def merge(self, x, size=None):
        """(merged tokens, their sizes): x (B, N, C) -> (B, N - r, C), size (B, N, 1) -> (B, N - r, 1).

        Row indexing of the flattened tokens (aten::index / index_add) rather than gather / scatter_add with
        expanded indices, which on the CPU cost more than the MACs merging saves."""
        import torch

        b, n, c = x.shape
        ones = size is None
        if ones:
            size = torch.ones(b, n, 1, dtype=x.dtype, device=x.device)
        weighted = (x if ones else x * size).reshape(b * n, c)
        flat_size = size.reshape(b * n, 1)
        if self.r:
            src, dst = self._flat(self.src), self._flat(self.dst)
            weighted = weighted.index_add(0, dst, weighted[src])
            flat_size = flat_size.index_add(0, dst, flat_size[src])
        keep = self._flat(self.keep)
        kept_size = flat_size[keep]
        return (weighted[keep] / kept_size).view(b, n - self.r, c), kept_size.view(b, n - self.r, 1)

    def unmerge(self, y):
        """(B, N - r, C) -> (B, N, C): every position gets the output of the token it was merged into."""
        b, m, c = y.shape
        where = (self.where + m * __import__("torch").arange(b, device=y.device)[:, None]).reshape(-1)
        return y.reshape(b * m, c)[where].view(b, self.n, c)


def bipartite_soft_matching(metric, r: int) -> Matching:
    """ToMe's matching of `metric` (B, N, C; here the head-averaged keys): A = even positions, B = odd; the r
    A-tokens with the most similar (cosine) B-token merge into it. r is capped at |A| (every A-token merged;
    ToMe-SD's cap) and is 0 when there is no B-token."""
    import torch

    b, n, _ = metric.shape
    dev = metric.device
    a_pos, b_pos = torch.arange(0, n, 2, device=dev), torch.arange(1, n, 2, device=dev)
    r = max(0, min(int(r), len(a_pos) if len(b_pos) else 0))
    if r:
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, a_pos] @ m[:, b_pos].transpose(-1, -2)  # (B, |A|, |B|) cosine similarities
        best, best_b = scores.max(dim=-1)
        src_a = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]
        src, dst = a_pos[src_a], b_pos[best_b.gather(1, src_a)]
    else:
        src = dst = torch.zeros(b, 0, dtype=torch.long, device=dev)
    mask = torch.ones(b, n, dtype=torch.bool, device=dev)
    mask.scatter_(1, src, False)
    keep = mask.nonzero()[:, 1].view(b, n - r)  # row-major: ascending positions within each row
    where = torch.zeros(b, n, dtype=torch.long, device=dev)
    where.scatter_(1, keep, torch.arange(n - r, device=dev).expand(b, -1))
    where.scatter_(1, src, where.gather(1, dst))
    return Matching(keep, src, dst, where, n)


class ToMeProcessor:
    """A diffusers attention processor for self-attention: `AttnProcessor2_0` with merge before and unmerge after
    the attention (see the module docstring). Keeps the latest matching for the block's feed-forward."""

    def __init__(self, ratio: float, proportional: bool, counts: dict):
        self.ratio, self.proportional, self.counts = ratio, proportional, counts
        self.last: Matching | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        import torch.nn.functional as F

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("tome: the merging processor is for unmasked self-attention; got "
                             + ("encoder_hidden_states" if encoder_hidden_states is not None else "a mask"))
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        b, n, _ = hidden_states.shape
        key_full = attn.to_k(hidden_states)
        heads = attn.heads
        head_dim = key_full.shape[-1] // heads
        match = bipartite_soft_matching(key_full.view(b, n, heads, head_dim).mean(dim=2), int(self.ratio * n))
        self.last = match
        self.counts["tokens_in"] += n
        self.counts["tokens_merged"] += match.r
        x, size = match.merge(hidden_states)
        query = attn.to_q(x)
        key = match.merge(key_full)[0]
        value = attn.to_v(x)
        query = query.view(b, -1, heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = size.log().view(b, 1, 1, -1).to(query.dtype) if self.proportional and match.r else None
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = match.unmerge(out)
        if four_d:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _feed_forward_wrapper():
    import torch.nn as nn

    class MergedFeedForward(nn.Module):
        """A transformer block's feed-forward run on the tokens its block's self-attention merged."""

        def __init__(self, ff, processor: ToMeProcessor):
            super().__init__()
            self.ff, self.processor = ff, processor

        def forward(self, hidden_states, *args, **kwargs):
            m = self.processor.last
            if m is None or m.n != hidden_states.shape[1] or m.keep.shape[0] != hidden_states.shape[0]:
                raise RuntimeError("tome: the feed-forward ran without its block's self-attention matching")
            merged, _ = m.merge(hidden_states)
            return m.unmerge(self.ff(merged, *args, **kwargs))

    return MergedFeedForward


def install(model, cfg: ToMeConfig, counts: dict) -> dict[str, int]:
    """Put the merging processor on every self-attention of `model` (in place), and with `merge_mlp` wrap the
    feed-forward of every transformer block whose attn1 got it. Returns how many of each were changed."""
    from diffusers.models.attention_processor import Attention

    wrapper = _feed_forward_wrapper()
    procs: dict[int, ToMeProcessor] = {}
    for module in model.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            if getattr(module, "only_cross_attention", False) or getattr(module, "added_kv_proj_dim", None):
                continue
            procs[id(module)] = ToMeProcessor(cfg.ratio, cfg.proportional_attention, counts)
            module.set_processor(procs[id(module)])
    mlps = 0
    if cfg.merge_mlp:
        for module in list(model.modules()):
            attn1, ff = getattr(module, "attn1", None), getattr(module, "ff", None)
            if attn1 is None or ff is None or id(attn1) not in procs or getattr(module, "_chunk_size", None):
                continue
            module.ff = wrapper(ff, procs[id(attn1)])
            mlps += 1
    return {"attention_layers": len(procs), "mlp_layers": mlps}


def shared_weight_copy(model):
    """A copy of the module tree whose parameters and buffers are the original's tensors (no weight memory)."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


@register_method("tome", family="pruning", paper="Bolya & Hoffman, Token Merging for Fast Stable Diffusion "
                 "(after Bolya et al., Token Merging: Your ViT But Faster)", year=2023,
                 url="https://arxiv.org/abs/2303.17604", modalities=("image-generation",),
                 summary="merge a ratio of each self-attention layer's tokens by bipartite matching on the keys "
                         "(size-weighted average), attend over the rest, copy the outputs back (unmerge)")
class ToMe(Method):
    Config = ToMeConfig

    def apply(self, subject, task, ctx) -> Applied:
        import dataclasses

        from baselines.caching._common import require_diffusion_subject

        require_diffusion_subject(subject, "tome")
        counts = {"tokens_in": 0, "tokens_merged": 0}
        model = shared_weight_copy(subject.model)
        changed = install(model, self.config, counts)
        if not changed["attention_layers"]:
            raise ValueError(f"tome: the denoiser ({type(subject.model).__name__}) has no self-attention layer "
                             f"(diffusers Attention) to merge tokens in")

        def stats() -> dict[str, float]:
            seen = counts["tokens_in"]
            out = {k: float(v) for k, v in changed.items()}
            out["merged_token_fraction"] = counts["tokens_merged"] / seen if seen else 0.0
            counts.update(tokens_in=0, tokens_merged=0)
            return out

        return Applied(dataclasses.replace(subject, model=model), Cost(description="training-free"), stats=stats)
