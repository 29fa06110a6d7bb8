"""`fastv`: attention-ranked visual token pruning after layer K (Chen, Zhao, Liu, Wang, Qiu, Wu & Chang, 2024, "An
Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large Vision-Language
Models", ECCV 2024, arXiv:2403.06764).

The paper finds the visual tokens' attention in the deep layers of a VLM to be very inefficient, and prunes them
once, at layer K, by the attention they received in the layer before: with a^{(K)}_{h,i,j} the attention
probability of query i on key j in head h of layer K (1-based: the K-th layer, the last one to see every token),
T the text positions and V the visual ones,

    s_j = 1 / (H |T|) sum_h sum_{i in T} a^{(K)}_{h,i,j},        j in V,

and layers K+1 onwards (and their KV cache, so the decoding too) keep the text positions and the
ceil-free round(R |V|) visual positions with the largest s_j, in their original order and at their original
positions (FastV's code passes the kept indices on as position ids). R = 1 keeps everything (the reference, bit
for bit); the paper's headline setting is K = 2 with half the visual tokens dropped.

The ranking queries are the text tokens, as the issue asks and as the paper's section 4 describes the score
(FastV's in-place code ranks by the last prompt token alone: one of the same T rows). The probabilities are
recomputed for the text rows from the layer's cached keys (`_visual.text_to_visual_attention`): the fused
attention kernel returns none, and the remaining n - |T| rows are never needed.

Written by hand (with `_visual`'s loop over transformers' own layers): transformers has no FastV, and the
authors' code patches the `LlamaModel.forward` of transformers 4.31.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.registry import register_method

METHOD = "fastv"


@dataclass(frozen=True)
class FastVConfig:
    layer: int = 2  # K: the layer whose attention ranks the visual tokens; layers after it see the kept ones
    # R: share of the visual tokens kept after layer K (the paper's "R = 50%" drops half: keep_ratio 0.5)
    keep_ratio: float = 0.5

    def validate(self) -> None:
        check_range("layer", self.layer, lo=1)
        if not 0.0 <= self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio={self.keep_ratio}: the share of visual tokens kept after the layer; "
                              f"valid range: 0 <= keep_ratio <= 1 (1 keeps them all)")


def prune_after(k: int, keep_ratio: float):
    """The `_visual.Select` of FastV at layer `k` (1-based): remember layer k's input, and before layer k + 1
    (0-based index k) keep the text positions and the top round(R |V|) visual ones by `s_j`."""
    from baselines.pruning import _visual

    seen: dict = {}

    def select(i, h, visual, state):
        import torch

        if i == k - 1:
            seen["h"] = h
            return None
        if i != k:
            return None
        layer = _visual.decoder(state.model).layers[k - 1]
        scores = _visual.text_to_visual_attention(layer, seen.pop("h"), visual, state, state.cache.layers[k - 1].keys)
        where = visual.nonzero().flatten()
        kept = where[scores.topk(int(round(keep_ratio * where.numel()))).indices]
        return torch.cat([(~visual).nonzero().flatten(), kept]).sort().values

    return select


@register_method(METHOD, family="pruning", paper="Chen et al., An Image is Worth 1/2 Tokens After Layer 2: "
                 "Plug-and-Play Inference Acceleration for Large Vision-Language Models", year=2024,
                 url="https://arxiv.org/abs/2403.06764", modalities=("vision-language",),
                 summary="after layer K, keep the R share of visual tokens that the text attends to most; the later "
                         "layers and the KV cache hold only those")
class FastV(Method):
    Config = FastVConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.pruning import _visual
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        n = len(_visual.decoder(subject.model).layers)
        if cfg.layer > n:
            raise ConfigError(f"layer={cfg.layer}: this model has {n} decoder layers; valid: 1 <= layer <= {n} "
                              f"({n} prunes nothing)")
        counts = _visual.VisualCounts()

        def generate(subj, input_ids, pixel_values, max_new_tokens):
            select = prune_after(cfg.layer, cfg.keep_ratio)  # one per question: it holds layer K's input
            return _visual.generate(subj.model, input_ids, pixel_values, max_new_tokens, subj.extra["stop"].eos_ids,
                                    subj.extra["image_token_id"], select, counts)

        return Applied(Subject(subject.model, subject.kind, {**subject.extra, "generate": generate}),
                       Cost(description="none: the ranking is computed in each question's own prefill"),
                       stats=lambda: {**counts.as_dict(), "layer": cfg.layer, "keep_ratio": cfg.keep_ratio})
