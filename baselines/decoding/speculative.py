"""`speculative`: speculative decoding with exact rejection sampling (Leviathan, Kalman and Matias, 2023, "Fast
Inference from Transformers via Speculative Decoding", arXiv:2211.17192; Chen et al., 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling", arXiv:2302.01318).

A small draft model M_q proposes gamma tokens; the target M_p scores all of them in one forward pass; a
rejection-sampling rule keeps a prefix of them and corrects the first rejected one, so that the output is
distributed exactly as sampling from M_p alone (Leviathan et al., appendix A.1; Chen et al., Theorem 1). One iteration,
from the prefix x_{<t} (`SpeculativeDecoder.generate`):

    draft      q_i = M_q( . | x_{<t}, x~_1 .. x~_{i-1}),  x~_i ~ q_i,  i = 1..gamma      (`_draft`, KV-cached)
    verify     p_i = M_p( . | x_{<t}, x~_1 .. x~_{i-1}),  i = 1..gamma+1, in ONE pass   (`_forward` on the target)
    accept     r_i ~ U(0, 1);  keep x~_i while  r_i < min(1, p_i(x~_i) / q_i(x~_i))        (`accept_drafts`)
    correct    first rejection at i = n+1:  y ~ p'(x) = max(0, p_{n+1}(x) - q_{n+1}(x)) / sum_x max(0, ...)
                                                                                        (`residual_distribution`)
               all gamma accepted (n = gamma):  y ~ p_{gamma+1}   (the bonus token)
    emit       x~_1 .. x~_n, y   (n + 1 tokens for one target pass)
    roll back  both KV caches are cut to the accepted prefix x_{<t}, x~_1..x~_n        (`_rollback`)

With a per-token acceptance rate alpha, the expected number of tokens per target pass is
(1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al., section 3); `mean_accepted_length` in the stats measures it.

p and q are the *same processing* of each model's logits (`processed_probs`: temperature, then top-k), or the
output follows the processed target only approximately. Temperature 0 is greedy decoding: p and q are one-hot
at their argmaxes, so `accept` keeps x~_i iff x~_i == argmax p_i and the residual is one-hot at argmax p_{n+1}
(`accept_greedy`): the output is the target's greedy output, token for token (up to floating-point ties between
a one-token and a multi-token forward pass).

Why hand-written: transformers' `generate(assistant_model=...)` (the `assisted` baseline) runs a whole
`generate()` call of the draft per round, adapts the draft length by default, and reports no acceptance
statistics. Here the loop calls the models' forward directly on DynamicCache KV caches and counts what it does.
The caches are transformers' own (`DynamicCache`; its `crop(-n)` removes the last n positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.api import Draft
from bench.registry import register_method
from tasks._kit.lm import cache_kwargs, stop_rule

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SpeculativeConfig:
    # gamma, the drafts per target pass: with alpha ~ 0.6-0.8, (1 - alpha^(gamma+1)) / (1 - alpha) is within
    # ~10-20% of its limit at gamma = 4, while each extra draft costs one more draft forward pass
    num_draft_tokens: int = 4
    temperature: float = 0.0  # 0 = greedy (the arith/GSM8K metric is greedy exact match); > 0 samples
    top_k: int = 0  # when sampling, keep the k most likely tokens of both p and q; 0 = the whole vocabulary

    def validate(self) -> None:
        check_range("num_draft_tokens", self.num_draft_tokens, lo=1)
        check_range("temperature", self.temperature, lo=0)
        check_range("top_k", self.top_k, lo=0)


# ---- the acceptance rule ------------------------------------------------------------------------------------

def processed_probs(logits: "torch.Tensor", temperature: float, top_k: int = 0) -> "torch.Tensor":
    """softmax(logits / T) restricted to the top-k logits (0 = all): the one processing applied to p and q."""
    import torch

    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def residual_distribution(p: "torch.Tensor", q: "torch.Tensor") -> "torch.Tensor":
    """p'(x) = max(0, p(x) - q(x)) / sum_x max(0, p(x) - q(x)), over the last dimension. When p == q (the
    residual is all zero) a rejection has probability 0; p itself is returned so rounding cannot divide by 0."""
    import torch

    r = (p - q).clamp_min(0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(torch.finfo(r.dtype).tiny), p)


def accept_drafts(p: "torch.Tensor", q: "torch.Tensor", drafts: "torch.Tensor",
                  generator: "torch.Generator | None" = None) -> tuple[int, int]:
    """The rejection-sampling rule. p: (gamma+1, V) target probabilities, q: (gamma, V) draft probabilities,
    drafts: (gamma,) tokens drawn from q. Returns (n accepted drafts, the token y emitted after them)."""
    import torch

    g = drafts.shape[0]
    rows = torch.arange(g, device=p.device)
    px, qx = p[rows, drafts], q[rows, drafts]
    r = torch.rand(g, generator=generator, device=p.device, dtype=p.dtype)
    ok = (r * qx < px).tolist()  # r < p/q (q(x~) > 0: x~ was drawn from q), i.e. r < min(1, p/q)
    n = ok.index(False) if False in ok else g
    dist = p[g] if n == g else residual_distribution(p[n], q[n])
    return n, int(torch.multinomial(dist, 1, generator=generator))


def accept_greedy(target_logits: "torch.Tensor", drafts: "torch.Tensor") -> tuple[int, int]:
    """`accept_drafts` with one-hot p and q: keep drafts while they equal the target's argmax; y = that argmax."""
    a = target_logits.argmax(-1).tolist()
    d = drafts.tolist()
    n = next((i for i, t in enumerate(d) if t != a[i]), len(d))
    return n, a[n]


# ---- the decoding loop --------------------------------------------------------------------------------------

@dataclass
class SpeculativeStats:
    target_forward_passes: int = 0
    draft_forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # drafts kept by the acceptance rule
    emitted_tokens: int = 0  # tokens appended to the output (EOS and the length limit can cut an iteration)

    def as_dict(self) -> dict[str, float]:
        return {"acceptance_rate": self.accepted_tokens / max(1, self.drafted_tokens),
                "mean_accepted_length": self.emitted_tokens / max(1, self.target_forward_passes),
                "target_forward_passes": self.target_forward_passes,
                "draft_forward_passes": self.draft_forward_passes,
                "drafted_tokens": self.drafted_tokens, "emitted_tokens": self.emitted_tokens}


def _forward(model, ids: "torch.Tensor", cache, keep: int) -> "torch.Tensor":
    """Logits of the last `keep` positions of `ids` (1, L), appended to the KV cache."""
    return model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=keep).logits[0]


def _rollback(cache, length: int) -> None:
    """Cut the cache to its first `length` positions (DynamicCache.crop takes the count to remove, negative)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class SpeculativeDecoder:
    """Draft-and-verify decoding of one sequence with `target` and `draft` (same vocabulary).

    `eos_id` is one end-of-sequence id, several (a checkpoint may declare more than one: Qwen2.5-Instruct's
    `<|im_end|>` and `<|endoftext|>`), or None. Host syncs: the greedy loop keeps the sequence on the device as
    well and reads the device once per verification pass (drafts and target argmaxes in one transfer), so the
    acceptance, the end-of-sequence test and the stop rule run on that one copy; the draft proposes all its
    tokens without looking at them (a draft EOS cuts the drafts after the fact, at the same place as before,
    for the price of draft passes after it that are never verified). Sampling reads each draft token (an EOS
    ends the drafts before another draw, which keeps the random stream, and so the samples, as they were)."""

    def __init__(self, target, draft, config: SpeculativeConfig, eos_id: "int | Iterable[int] | None",
                 generator: "torch.Generator | None" = None):
        self.target, self.draft, self.cfg = target, draft, config
        ids = () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
        self.eos_ids = frozenset(int(i) for i in ids)
        self.eos = ids[0] if ids else None  # the first id (kept for callers that read one)
        self.generator = generator
        self.stats = SpeculativeStats()

    def _sample(self, logits: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """(token, q) from the draft's logits: argmax when greedy, else a draw from the processed q."""
        import torch

        if self.cfg.temperature == 0:
            return logits.argmax(-1, keepdim=True), None
        q = processed_probs(logits, self.cfg.temperature, self.cfg.top_k)
        return torch.multinomial(q, 1, generator=self.generator), q

    def _draft(self, pending: "torch.Tensor", cache, gamma: int) -> tuple["torch.Tensor", list]:
        """gamma drafts x~_1.. after the tokens `pending` (1-D, on the device) that the draft's cache lacks, and
        their q rows when sampling. Greedy drafts are not read here (no host sync; `generate` cuts them at a
        draft EOS); sampled ones stop at an EOS. The cache ends holding every draft but the last."""
        import torch

        tokens, qs = [], []
        x = pending.unsqueeze(0)
        greedy = self.cfg.temperature == 0
        for _ in range(gamma):
            t, q = self._sample(_forward(self.draft, x, cache, 1)[-1])
            tokens.append(t)
            qs.append(q)
            self.stats.draft_forward_passes += 1
            if not greedy and int(t) in self.eos_ids:
                break
            x = t.view(1, 1)
        drafts = torch.cat(tokens) if tokens else pending.new_empty(0)
        return drafts, qs

    def _cut(self, emitted: list[int], new: list[int], stop) -> tuple[list[int], bool]:
        """`emitted` cut after its first end-of-sequence id, then where `stop` (a `StopRule`) stops the
        generation `new + emitted`; and whether the generation ends there."""
        end = next((i + 1 for i, t in enumerate(emitted) if t in self.eos_ids), None)
        if end is not None:
            emitted = emitted[:end]
        if stop is not None:
            n = stop.stop_length(new + emitted, len(new))
            if n is not None:
                return emitted[:n - len(new)], True
        return emitted, end is not None

    def generate(self, prompt: "torch.Tensor", max_new_tokens: int,
                 on_iteration: Callable[[list[int], object, object], None] | None = None,
                 on_verify: Callable[["torch.Tensor", int, int, list[int]], None] | None = None,
                 stop=None) -> list[int]:
        """New tokens after the 1-D `prompt`, up to `max_new_tokens` or EOS (included), or where `stop` (the
        task's `tasks._kit.lm.StopRule`) ends the generation. `on_iteration(seq, target_cache, draft_cache)` is
        called after every rollback (for tests); `on_verify(logits, n, g, emitted)` after every verification
        pass, with the target's logits p_1..p_{g+1}, the n accepted of g drafts and the tokens it emitted (what
        online distillation records)."""
        import torch
        from transformers import DynamicCache

        seq = prompt.tolist()  # the host's copy (one read per call)
        dev = prompt  # the device's copy: the models' inputs are sliced from it, never rebuilt from the host
        start = len(seq)
        tc, dc = DynamicCache(config=self.target.config), DynamicCache(config=self.draft.config)
        st, greedy = self.stats, self.cfg.temperature == 0
        while len(seq) - start < max_new_tokens:
            remaining = max_new_tokens - (len(seq) - start)
            drafts, qs = self._draft(dev[dc.get_seq_length():], dc, min(self.cfg.num_draft_tokens, remaining - 1))
            ids = torch.cat([dev[tc.get_seq_length():], drafts]).unsqueeze(0)
            logits = _forward(self.target, ids, tc, drafts.shape[0] + 1)  # p_1 .. p_{g+1}
            if greedy:  # the one read of the device in this pass: the drafts and the target's argmaxes
                k = drafts.shape[0]
                both = torch.cat([drafts, logits.argmax(-1)]).tolist()
                d, a = both[:k], both[k:]
                g = next((i + 1 for i, t in enumerate(d) if t in self.eos_ids), k)  # drafts up to a draft EOS
                n = next((i for i in range(g) if d[i] != a[i]), g)  # accept_greedy on the first g drafts
                y, logits = a[n], logits[:g + 1]
                emitted = d[:n] + [y]
            else:
                g = drafts.shape[0]
                p = processed_probs(logits, self.cfg.temperature, self.cfg.top_k)
                q = torch.stack(qs) if g else p[:0]
                n, y = accept_drafts(p, q, drafts, self.generator)
                emitted = drafts[:n].tolist() + [y]
            prefix = len(seq)
            _rollback(tc, prefix + n)  # it holds prefix + (drafted) positions: keep the accepted drafts, not y
            if drafts.shape[0]:
                _rollback(dc, prefix + min(n, g - 1))  # it holds the drafts but the last
            st.target_forward_passes += 1
            st.drafted_tokens += g
            st.accepted_tokens += n
            emitted, done = self._cut(emitted, seq[start:], stop)
            if on_verify is not None:
                on_verify(logits, n, g, emitted)
            seq += emitted
            st.emitted_tokens += len(emitted)
            if not done:  # the next pass's inputs, appended on the device: the accepted drafts and y
                dev = torch.cat([dev, drafts[:n], torch.full((1,), y, dtype=dev.dtype, device=dev.device)])
            if on_iteration is not None:
                on_iteration(seq, tc, dc)
            if done:
                break
        return seq[start:]


@register_method("speculative", family="decoding", paper="Leviathan et al., Fast Inference from Transformers via "
                 "Speculative Decoding", year=2023, url="https://arxiv.org/abs/2211.17192",
                 modalities=("causal-lm",),
                 requires=(Draft,),
                 summary="a small draft proposes k tokens, the target verifies them in one pass; exact rejection "
                         "sampling keeps the target's output distribution")
class Speculative(Method):
    Config = SpeculativeConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.decoding._common import check_same_vocabulary, draft_subject, single_row
        from tasks.base import Subject

        draft = draft_subject(task, ctx, "speculative").model
        check_same_vocabulary(subject.model, draft, "speculative")
        tok = subject.extra["tokenizer"]
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        rule = stop_rule(subject)  # the task's stop strings and end-of-sequence ids, the reference's too
        decoder = SpeculativeDecoder(subject.model, draft, self.config,
                                     tok.eos_token_id if rule is None else rule.eos_ids, generator)

        def generate(subj, input_ids, max_new_tokens, attention_mask=None):
            row = single_row(input_ids, attention_mask, "speculative")
            with torch.inference_mode():
                new = decoder.generate(row, max_new_tokens, stop=stop_rule(subj))
            return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], 1)

        extra = {**subject.extra, "generate": generate, "draft": draft}
        n_draft = sum(p.numel() for p in draft.parameters())
        cost = Cost(description=f"no training: drafts with the task's draft model ({n_draft} parameters)")
        return Applied(Subject(subject.model, subject.kind, extra), cost, stats=decoder.stats.as_dict)
