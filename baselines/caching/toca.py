"""`toca`: token-wise feature caching for diffusion transformers (Zou et al., 2024, "Accelerating Diffusion
Transformers with Token-wise Feature Caching", arXiv:2410.05317; ICLR 2025).

Every N steps (the "fresh threshold") all tokens of all layers are computed and cached. At the steps in
between, each layer recomputes only the fraction r_l of tokens whose reuse is judged most harmful and takes
the rest from the cache (paper, section 3.2-3.3):

    MLP_l(x)[I_fresh] = MLP_l(x[I_fresh]),   MLP_l(x)[I_cached] = C_l[I_cached],   |I_fresh| = r_l * N_tokens

The tokens are ranked by the score

    s(x_j) = s1(x_j) + lambda3 * s3(x_j),   then the spatial-uniformity bonus s4,
    s1(x_j) = || sum_i A_ij ||-normalised   (self-attention influence: how much the other tokens attend to j,
                                             head-averaged attention map A of the last full step)
    s3(x_j) = (steps since x_j was last computed) / N            (cache frequency)
    s4: in every 2x2 patch neighbourhood the top-scored token gets + 0.6 * its score

(s2, the cross-attention entropy, does not exist in a class-conditional DiT). The per-layer ratios follow the
authors' "ToCa" schedule: r_l = r * (1.8 - 1.6 l / (L-1)) * 2.5 for the MLP (more tokens in shallow layers),
and 0 for attention, which is reused whole on partial steps as in the authors' final DiT version; the
step-wise factor of that schedule (which they report does not matter) is left out. `ratio_schedule=constant`
uses r for every layer instead. The attention map is computed explicitly at full steps (one extra QK^T per
layer; the SDPA kernel does not return it), as the authors do; the MAC count includes it.

Cached MLP outputs are ungated; the adaLN modulation is computed every step (`_dit.py`). Caches per branch,
reset per batch. No maintained library implements ToCa (diffusers does not), hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class TocaConfig:
    interval: int = 3  # N ("fresh threshold"): all tokens recomputed every N steps (paper's DiT runs: 3-4)
    fresh_ratio: float = 0.1  # r: base share of tokens recomputed per layer on partial steps (paper: 0.07-0.1)
    ratio_schedule: Literal["toca", "constant"] = "toca"  # per-layer ratios: authors' layer-wise schedule, or r
    cache_weight: float = 0.25  # lambda3: weight of the cache-frequency score s3 (authors' soft_fresh_weight)
    spatial_bonus: float = 0.6  # s4 bonus for the best token of each 2x2 neighbourhood (authors' value; 0 = off)

    def validate(self) -> None:
        check_range("interval", self.interval, lo=1)
        check_range("fresh_ratio", self.fresh_ratio, lo=0, hi=1)
        check_range("cache_weight", self.cache_weight, lo=0)
        check_range("spatial_bonus", self.spatial_bonus, lo=0)


def layer_ratio(cfg: TocaConfig, layer: int, n_layers: int) -> float:
    """r_l for the MLP of layer `layer`, clipped to [0, 1]."""
    if cfg.ratio_schedule == "constant":
        return cfg.fresh_ratio
    layer_factor = 1.8 - 1.6 * layer / (n_layers - 1) if n_layers > 1 else 1.0
    return min(1.0, cfg.fresh_ratio * layer_factor * 2.5)


def spatial_bonus(score, bonus: float):
    """s4: add `bonus` * score to the top token of every 2x2 neighbourhood of the square token grid."""
    import torch

    b, n = score.shape
    side = int(round(n ** 0.5))
    if bonus == 0 or side * side != n or side % 2:
        return score
    grid = score.view(b, side // 2, 2, side // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, -1, 4)
    top, where = grid.max(dim=-1, keepdim=True)
    grid = grid + torch.zeros_like(grid).scatter_(-1, where, top * bonus)
    return grid.view(b, side // 2, side // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(b, n)


@register_method("toca", family="caching", paper="Zou et al., Accelerating Diffusion Transformers with Token-wise "
                 "Feature Caching", year=2024, url="https://arxiv.org/abs/2410.05317",
                 modalities=("image-generation",),
                 summary="DiT: between full steps, recompute only the highest-scoring tokens of each layer's MLP "
                         "(attention-influence + cache-age score), reuse the rest")
class Toca(Method):
    Config = TocaConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch
        import torch.nn.functional as F

        from baselines.caching._common import Tracker, cached_subject, full_step, require_backbone, \
            require_diffusion_subject
        from baselines.caching._dit import attention_probs, check_dit_blocks, dit_forward, make_dit_call

        require_diffusion_subject(subject, "toca")
        require_backbone(subject.model, "dit", "toca")
        check_dit_blocks(subject.model, "toca")
        cfg = self.config
        n_layers = len(subject.model.transformer_blocks)
        caches: dict[int, dict] = {}
        tracker = Tracker(caches.clear)

        def make_call(model, step, branch):
            full = full_step(step, cfg.interval)
            cache = caches.setdefault(branch, {})

            def branch_fn(layer, module, compute, inputs):
                if full:
                    out = compute(inputs)
                    cache[layer, module] = out
                    if module == "attn":  # s1 from this step's attention map; every token fresh
                        probs = attention_probs(model.transformer_blocks[layer].attn1, inputs)
                        cache[layer, "s1"] = F.normalize(probs.sum(dim=1), dim=-1)
                        cache[layer, "age"] = torch.zeros(inputs.shape[:2], device=inputs.device)
                    return out
                if module == "attn":
                    return cache[layer, "attn"]
                stored = cache[layer, "mlp"]
                n_tokens = inputs.shape[1]
                k = int(layer_ratio(cfg, layer, n_layers) * n_tokens)
                age = cache[layer, "age"] + 1
                if k > 0:
                    score = spatial_bonus(cache[layer, "s1"] + cfg.cache_weight * age / cfg.interval,
                                          cfg.spatial_bonus)
                    idx = score.topk(k, dim=-1).indices  # (B, k)
                    age = age.scatter(1, idx, 0.0)
                    gather = idx.unsqueeze(-1).expand(-1, -1, inputs.shape[-1])
                    fresh = compute(torch.gather(inputs, 1, gather))
                    stored = stored.scatter(1, idx.unsqueeze(-1).expand(-1, -1, stored.shape[-1]), fresh)
                    cache[layer, "mlp"] = stored
                    tracker.count("tokens_recomputed", k * inputs.shape[0])
                tracker.count("tokens_reused", (n_tokens - k) * inputs.shape[0])
                cache[layer, "age"] = age
                return stored

            def forward(x, t, y):
                if not full and not cache:
                    raise RuntimeError("toca: a partial step came before any full step (the cache is empty)")
                tracker.count("nfe_full" if full else "nfe_partial")
                return dit_forward(model, x, t, y, branch_fn)

            return make_dit_call(model, forward)

        def stats():
            s = tracker.stats()
            done = s.get("tokens_recomputed", 0) + s.get("tokens_reused", 0)
            if done:
                s["mlp_token_fresh_share"] = s.get("tokens_recomputed", 0) / done
            return s

        return Applied(cached_subject(subject, tracker, make_call), Cost(description="training-free"),
                       stats=stats)
