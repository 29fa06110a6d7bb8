"""`vtw`: Visual Tokens Withdrawal (Lin, Lin, Lin & Ji, 2024, "Boosting Multimodal Large Language Models with
Visual Tokens Withdrawal for Rapid Inference", AAAI 2025, arXiv:2405.05803).

The paper's two observations: deep layers give the visual tokens almost no attention (the attention sinks and
the nearest tokens take it), and the visual information has migrated into the text tokens within the first
layers. So after layer K every visual token is withdrawn: with V the visual positions and T the text ones,

    x^{(l+1)} = Layer_l( x^{(l)} )            over V u T    for l < K,
    x^{(l+1)} = Layer_l( x^{(l)}_T )          over T only   for l >= K,

and the KV cache of layers l >= K holds the text tokens only, so the decoding after the prompt attends to
|T| + t keys there instead of |V| + |T| + t. The text tokens keep their positions (rotary angles). K = 0 shows
the decoder no image at all; K = number of layers withdraws nothing (the reference, bit for bit).

Choosing K (the paper's criterion, section 4.2): on a few calibration examples, the output distribution with
withdrawal at layer K is compared with the full model's, and the first (shallowest) K whose Kullback-Leibler
divergence meets the threshold is taken,

    K* = min { K : (1/N) sum_n KL( p(y | x_n) || p_K(y | x_n) ) <= eta },

with p the next-token distributions over the answer: the full model's own greedy answer to each calibration
question, read teacher-forced by both models, KL averaged over its tokens (end-of-text included). Only the answer
tokens say what the image meant: the first token after "Answer:" is often a space whatever the image (KL about
1e-4 at every K on digits-vlm). The calibration examples are training questions (`extra["calibration"]`), never
test ones.

Written by hand (with `_visual`'s loop over transformers' own layers): transformers has no token withdrawal, and
the authors' code patches LLaVA's repository's `LlamaModel.forward` of its time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.registry import register_method

METHOD = "vtw"


@dataclass(frozen=True)
class VTWConfig:
    # withdraw the visual tokens before decoder layer `layer` (0-based; layers 0..K-1 see them). None: chosen by
    # the KL criterion on the calibration questions
    layer: int | None = None
    # eta of the criterion, in nats: the mean KL of the first answer token's distribution that the chosen layer
    # may cost. Ours (the paper does not give one number for all models): 0.01 nats moves a greedy answer only
    # where the top two tokens are within about 0.1 of each other in probability
    kl_threshold: float = 0.01
    calibration_samples: int = 32  # training questions the KL is averaged over (the paper: "a few" examples)
    max_new_tokens: int = 8  # longest calibration answer read (the task stops its answers at end-of-text)

    def validate(self) -> None:
        if self.layer is not None:
            check_range("layer", self.layer, lo=0)
        check_range("kl_threshold", self.kl_threshold, lo=0.0)
        check_range("calibration_samples", self.calibration_samples, lo=1)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


def withdraw_at(k: int):
    """The `_visual.Select` of withdrawal before layer `k`: keep the text positions only."""

    def select(i, h, visual, state):
        return (~visual).nonzero().flatten() if i == k else None

    return select


def kl_by_layer(model, examples, image_token_id: int, eos_ids, max_new_tokens: int) -> list[float]:
    """Mean KL( p || p_K ) over `examples` ((input_ids, pixel_values) pairs) and over the tokens of each example's
    answer, for K = 0 .. number of layers. The answer is the full model's own greedy one (up to `max_new_tokens`
    tokens, end-of-text included); each K reads it teacher-forced, so every position compares the same context."""
    import torch

    from baselines.pruning import _visual

    n = len(_visual.decoder(model).layers)
    forced, full = [], []
    with torch.no_grad():
        for ids, pix in examples:
            out = _visual.generate(model, ids, pix, max_new_tokens, eos_ids, image_token_id, withdraw_at(n),
                                   _visual.VisualCounts())
            m = out.shape[1] - ids.shape[1]  # answer tokens; the prompt's last position predicts the first
            forced.append((out[:, :-1], pix, m))
            full.append(answer_log_probs(model, forced[-1], image_token_id, withdraw_at(n)))
        out = []
        for k in range(n + 1):
            total, count = 0.0, 0
            for example, logp in zip(forced, full):
                logq = answer_log_probs(model, example, image_token_id, withdraw_at(k))
                total += float((logp.exp() * (logp - logq)).sum())
                count += logp.shape[0]
            out.append(total / count)
    return out


def answer_log_probs(model, example, image_token_id: int, select) -> "torch.Tensor":
    """log p(. | prompt, answer so far) at each of the `m` answer positions of a teacher-forced example
    (input_ids: prompt + answer minus its last token), float64, m x vocabulary."""
    import torch

    from baselines.pruning import _visual

    ids, pix, m = example
    h, _ = _visual.prefill(model, ids, pix, image_token_id, select, _visual.VisualCounts())
    lm = model.model.language_model
    return torch.log_softmax(model.lm_head(lm.norm(h[:, -m:]))[0].double(), -1)


def choose_layer(kls: list[float], threshold: float) -> int:
    """The paper's K*: the shallowest layer whose mean KL is within the threshold (the last, K = number of layers,
    has KL 0 and always is)."""
    return next(k for k, v in enumerate(kls) if v <= threshold)


@register_method(METHOD, family="pruning", paper="Lin et al., Boosting Multimodal Large Language Models with Visual "
                 "Tokens Withdrawal for Rapid Inference", year=2024, url="https://arxiv.org/abs/2405.05803",
                 modalities=("vision-language",),
                 summary="all visual tokens withdrawn from the sequence and the KV cache after layer K, K the "
                         "shallowest layer within a KL threshold on calibration questions")
class VTW(Method):
    Config = VTWConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.pruning import _visual
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        extra = subject.extra
        n = len(_visual.decoder(subject.model).layers)
        if cfg.layer is not None and cfg.layer > n:
            raise ConfigError(f"layer={cfg.layer}: this model has {n} decoder layers; valid: 0 <= layer <= {n} "
                              f"({n} withdraws nothing)")
        t0 = time.perf_counter()
        kls, samples = None, 0
        if cfg.layer is None:
            examples = extra["calibration"](cfg.calibration_samples, ctx.seed)
            kls = kl_by_layer(subject.model, examples, extra["image_token_id"], extra["stop"].eos_ids,
                              cfg.max_new_tokens)
            layer, samples = choose_layer(kls, cfg.kl_threshold), len(examples)
            ctx.progress.log(f"vtw: KL by layer {[round(v, 4) for v in kls]}; withdrawing after layer {layer}")
        else:
            layer = cfg.layer
        seconds = time.perf_counter() - t0
        counts = _visual.VisualCounts()
        select = withdraw_at(layer)

        def generate(subj, input_ids, pixel_values, max_new_tokens):
            return _visual.generate(subj.model, input_ids, pixel_values, max_new_tokens, subj.extra["stop"].eos_ids,
                                    subj.extra["image_token_id"], select, counts)

        def stats() -> dict[str, float]:
            out = {**counts.as_dict(), "layer": layer}
            if kls is not None:
                out.update({f"kl_layer_{k}": v for k, v in enumerate(kls)})
            return out

        cost = (Cost(seconds=seconds, steps=samples * (n + 2), samples_seen=samples,
                     description=f"KL criterion on {samples} training questions: one teacher-forced prefill per "
                          f"layer K and question")
                if kls is not None else Cost(description="none: the layer is given, no calibration"))
        return Applied(Subject(subject.model, subject.kind, {**extra, "generate": generate}), cost, stats=stats)
