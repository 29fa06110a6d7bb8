"""`dllm-cache`: adaptive feature caching for diffusion LMs (Liu et al., 2025, "dLLM-Cache: Accelerating Diffusion
Large Language Models with Adaptive Caching", arXiv:2506.06295).

A masked diffusion LM re-runs its bidirectional transformer over prompt and response at every sampler step. The
paper's observations: the prompt's features barely move across steps (it is never masked; it only sees the
response through attention), and of the response, only a few tokens' features change much from one step to the
next. So, per layer l, it caches the attention output AttnOut_l and the FFN output FFNOut_l of every position
(and the keys and values) and refreshes them on two schedules (step counter s over the whole sampling):

    prompt:   s mod K_p = 0  ->  recompute every prompt position            (long interval K_p, `prompt_interval`)
    response: s mod K_r = 0  ->  recompute every response position          (short interval K_r, `response_interval`)
              otherwise      ->  adaptive partial update (V-verify):

    V_new = W_v RMSNorm(h_l[y])                 for every response position y (one projection, cheap)
    s_j   = cos(V_new_j, V_cache_j)             (cosine similarity over the concatenated heads)
    U     = the floor(rho |y|) response positions with the lowest s_j        (rho: `update_ratio`)

and only the positions U (plus the prompt, on its refresh steps) go through the layer: their q, k, v, attention
over *all* keys (the cached keys and values with U's replaced), W_o, FFN; everything else is read from the cache
(`_dllm` has the layer's equations). The paper's reason for V: a token's value-vector change tracks the change
of its attention and FFN outputs, and V costs one projection of the layer's input.

Here the step counter runs over the whole response (all semi-autoregressive blocks), as the authors' counter does;
s = 0 is a full pass. The cache holds K, V, AttnOut, FFNOut per layer and position, each from the step it was
last computed at (`LayerCache.step`); the cached V the next V-verify compares with is that of the token's last
recomputation (only U's V is written: the d2Cache re-implementation writes every response token's fresh V, we
follow the paper's algorithm, which updates the selected tokens' features). Logits are computed for the current
block only (the sampler reads nothing else; with the model's logit shift, from the rows one to the left, the
first of them the last position before the block, as read from the cache); the reference computes them
everywhere.

Left out: the paper's classifier-free-guidance cache (`cfg_interval`: the references here sample without guidance)
and its Dream-specific hooks; batch rows share one schedule, as in the authors' code.

Control: the reference sampler with fewer steps, as many as give the same share of recomputed response features
(1/K_r + (1 - 1/K_r) rho of the steps, rounded to a multiple of the blocks): a cache must beat simply doing less.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.config import ConfigError, check_range
from bench.registry import register_method

METHOD = "dllm-cache"


@dataclass(frozen=True)
class DLLMCacheConfig:
    # K_p: steps between full prompt refreshes. The authors' LLaDA scripts and the d2Cache re-implementation use
    # long prompt intervals (d2Cache's default 50); arith-dllm's reference samples 112 steps
    prompt_interval: int = 50
    # K_r: steps between full response refreshes (the authors' demos and d2Cache's default use 2; 4 halves the
    # full passes again on this small model, where a partial step is cheap)
    response_interval: int = 4
    # rho: share of the response recomputed at the steps in between (0.25: the authors' demo and d2Cache's
    # default); the lowest V cosine similarities are chosen
    update_ratio: float = 0.25
    control: bool = True  # evaluate the fewer-steps control (one more evaluation of the task)

    def validate(self) -> None:
        for name in ("prompt_interval", "response_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value} must be an integer >= 1 (1 recomputes at every step)")
        if not 0.0 <= self.update_ratio <= 1.0:
            raise ConfigError(f"update_ratio={self.update_ratio} must be in [0, 1] (the share of response tokens "
                              f"recomputed between refreshes)")


class CachedForward:
    """The sampler's `forward` under dLLM-Cache: a full pass on refresh steps, the partial layer walk otherwise.

    `gen_length`: the response length (the last gen_length positions of x are the response). `on_call(caches,
    s)`, when given, sees the caches after every call (tests)."""

    def __init__(self, cfg: DLLMCacheConfig, gen_length: int, on_call=None):
        from baselines.caching._dllm import Caches, Counts

        self.cfg, self.gen_length, self.on_call = cfg, gen_length, on_call
        self.caches, self.counts = Caches(), Counts(extra={"v_verify_rows": 0})
        self.s = -1
        self.layers = 0

    def __call__(self, model, x, attention_mask, step: dict):
        from baselines.caching import _dllm

        if step["block"] == 0 and step["index"] == 0:  # a new sequence: nothing cached applies
            self.s = -1
            self.counts.sequences += 1
        self.s += 1
        s, cfg = self.s, self.cfg
        lp, n = x.shape[1] - self.gen_length, x.shape[1]
        refresh_prompt = s % cfg.prompt_interval == 0
        refresh_response = s % cfg.response_interval == 0
        decoder, _ = _dllm.llama_parts(model)
        self.layers = layers = len(decoder.layers)
        if refresh_prompt and refresh_response:
            out = _dllm.full_pass(model, x, attention_mask, self.caches, s, rows=_dllm.logit_rows(step))
            self.counts.add(n * layers, n * layers, full=True)
        else:
            out = self.partial(model, x, attention_mask, s, lp, refresh_prompt, refresh_response, step)
        if self.on_call is not None:
            self.on_call(self.caches, s)
        return _dllm.padded_logits(out, n, step["lo"])

    def partial(self, model, x, attention_mask, s, lp, refresh_prompt, refresh_response, step):
        import torch

        from baselines.caching import _dllm

        decoder, _ = _dllm.llama_parts(model)
        b, n = x.shape
        frame = _dllm.Frame.of(model, x, attention_mask)
        h = decoder.embed_tokens(x)
        prompt = torch.arange(lp, device=x.device).expand(b, -1) if refresh_prompt else None
        keep = int(self.cfg.update_ratio * (n - lp))
        recomputed = 0
        for layer, c in zip(decoder.layers, self.caches.layers):
            if refresh_response:
                response = torch.arange(lp, n, device=x.device).expand(b, -1)
            elif keep:
                v_new = _dllm.values_of(layer, h[:, lp:])  # V-verify: (B, kv heads, |y|, d)
                sim = torch.nn.functional.cosine_similarity(v_new.transpose(1, 2).flatten(2),
                                                            c.v[:, :, lp:].transpose(1, 2).flatten(2), dim=-1)
                response = sim.topk(keep, dim=-1, largest=False).indices + lp
                self.counts.extra["v_verify_rows"] += n - lp
            else:
                response = None
            parts = [p for p in (prompt, response) if p is not None]
            if not parts:  # every feature of this layer from the cache
                h = h + c.attn
                h = h + c.ffn
                continue
            idx = torch.cat(parts, dim=1)
            q, k, v = _dllm.project(layer, _dllm.gather_rows(h, idx), _dllm.gather_rows(frame.cos, idx),
                                    _dllm.gather_rows(frame.sin, idx))
            c.k = _dllm.scatter_rows(c.k, idx, k, dim=2)
            c.v = _dllm.scatter_rows(c.v, idx, v, dim=2)
            c.attn = _dllm.scatter_rows(c.attn, idx, _dllm.attend(layer, q, c.k, c.v, frame.keys))
            h1 = h + c.attn
            c.ffn = _dllm.scatter_rows(c.ffn, idx, _dllm.ffn(layer, _dllm.gather_rows(h1, idx)))
            h = h1 + c.ffn
            c.step = c.step.scatter(1, idx, torch.full_like(idx, s))
            recomputed += idx.shape[1]
        self.counts.add(recomputed, n * len(self.caches.layers), full=False)
        lo, hi = _dllm.logit_rows(step)
        return _dllm.head(model, h[:, lo:hi])

    def stats(self) -> dict[str, float]:
        out = self.counts.as_dict(self.layers)
        out["v_verify_rows"] = self.counts.extra["v_verify_rows"] / max(self.counts.calls, 1) / max(self.layers, 1)
        return out


def matched_steps(sampling, cfg: DLLMCacheConfig) -> int:
    """Fewer steps with the share of recomputed response features dLLM-Cache keeps (1/K_r + (1 - 1/K_r) rho),
    as a multiple of the blocks, between one step per block and the reference's steps."""
    blocks = sampling.gen_length // sampling.block_length
    share = 1 / cfg.response_interval + (1 - 1 / cfg.response_interval) * cfg.update_ratio
    per_block = max(1, min(sampling.steps // blocks, round(share * sampling.steps / blocks)))
    return per_block * blocks


@register_method(METHOD, family="caching", paper="Liu et al., dLLM-Cache: Accelerating Diffusion Large Language "
                 "Models with Adaptive Caching", year=2025, url="https://arxiv.org/abs/2506.06295",
                 modalities=("diffusion-lm",),
                 summary="per layer, prompt features refreshed at a long interval, response features at a short "
                         "one; in between only the response tokens whose values changed most (V-verify) recomputed")
class DLLMCache(Method):
    Config = DLLMCacheConfig

    def apply(self, subject, task, ctx) -> Applied:
        import dataclasses

        from baselines.caching._dllm import llama_parts
        from baselines.decoding.dllm_steps import with_steps

        cfg = self.config
        cfg.validate()
        llama_parts(subject.model)
        sampling = subject.extra["sampling"]
        forward = CachedForward(cfg, sampling.gen_length)
        new = dataclasses.replace(subject, extra={**subject.extra, "forward": forward})
        controls = []
        if cfg.control:
            steps = matched_steps(sampling, cfg)
            ev = task.evaluate(with_steps(subject, steps)[0], ctx)
            controls.append(ControlResult("fewer_steps_same_share", f"the reference sampler with {steps} of "
                                          f"{sampling.steps} steps (the share of response features dLLM-Cache "
                                          f"recomputes), no cache", ev.value, ev.per_example, 0.0))
        return Applied(new, Cost(description="training-free; a sampling-time feature cache"), controls,
                       stats=forward.stats)
