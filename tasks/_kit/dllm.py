"""Masked diffusion language models in the LLaDA recipe (Nie et al. 2025, "Large Language Diffusion Models",
arXiv:2502.09992): the bidirectional mask predictor, its training loss, and the low-confidence-remasking sampler.

Module scope stays torch-free (see `bench.registry`).

The network. LLaDA's mask predictor is a Llama decoder with the causal mask removed (its GUIDELINES: "we derive
the backbone of LLaDA by simply removing the causal mask"), and one reserved [MASK] id. Here it is transformers'
`LlamaForCausalLM` itself, run with a 4-D attention mask that lets every position attend to every real token
(transformers takes a 4-D mask as given, and its SDPA path drops `is_causal` when a mask is passed): the model,
its weights and their serialisation stay the maintained library's; only the mask differs. [MASK] is id
`len(tokenizer)`, one past the tokenizer's vocabulary. Position i's logits predict token i (LLaDA: `shift` 0), or,
with `shift` 1, token i is predicted by position i - 1's logits (Dream's "shift operation", Ye et al. 2025,
"Dream 7B", arXiv:2508.15487): a mask predictor adapted from an autoregressive model keeps the meaning of its
output head (position i - 1's hidden state already predicts the next token), which is why Dream initialises from
an AR checkpoint with the shift. The shift is a property of the model (`DLLMExtra["shift"]`); every consumer of
logits (the loss, the sampler, a cache's forward) reads it.

Training (LLaDA's SFT, its eq. 5): for a prompt p_0 and response r_0 of length L', draw t ~ U(0, 1), mask each
response token independently with probability t (the prompt never), and minimise

    L(theta) = - E_{t, p_0, r_0, r_t} [ 1 / (t L') sum_{i=1}^{L'} 1[r_t^i = M] log p_theta(r_0^i | p_0, r_t) ]

an upper bound on the response's negative log-likelihood. As in LLaDA's SFT, the response is the answer, its
end-of-text token, and end-of-text padding up to a fixed length (`response_length`), all trained as ordinary
tokens, so the model learns where its answer stops; t is floored at `eps` (LLaDA's forward_process: p = (1 - eps)
t + eps).

Sampling (LLaDA's Algorithm/`generate`, low-confidence remasking): the response starts as `gen_length` [MASK]s.
Split into blocks of `block_length` (semi-autoregressive; one block = the whole response) decoded left to right,
each with steps / blocks steps; at every step the network predicts all positions, x0_i = argmax_v p_theta(v | x),
c_i = p_theta(x0_i | x) its confidence, and of the still masked positions of the current block the k with the
highest confidence are unmasked (k: the block's masked count split evenly over its steps, remainder first, as
LLaDA's `get_num_transfer_tokens`). Greedy (temperature 0); the task's stop rule then cuts the answer.

A method changes the sampler through `DLLMExtra`: `sampling` (steps, block length, an unmasking threshold) and
`forward` (the network call of one step, which a cache replaces); `sample` reports per-step statistics to an
optional `observe` callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

NEG = float("-inf")


@dataclass(frozen=True)
class Sampling:
    """How the reference samples (a method may replace it in the subject's extra)."""

    gen_length: int  # response positions, all [MASK] at the start
    steps: int  # network calls in all (split evenly over the blocks)
    block_length: int  # semi-autoregressive block; gen_length = one block
    threshold: float | None = None  # Fast-dLLM's parallel decoding: unmask every position above it (None: off)

    def validate(self) -> None:
        if self.gen_length < 1 or self.block_length < 1 or self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} must be a positive multiple of block_length="
                             f"{self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps < blocks or self.steps % blocks:
            raise ValueError(f"steps={self.steps} must be a positive multiple of the {blocks} blocks "
                             f"(gen_length {self.gen_length} / block_length {self.block_length})")
        if self.steps > self.gen_length:
            raise ValueError(f"steps={self.steps} exceeds gen_length={self.gen_length}: at least one token is "
                             f"unmasked per step")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1] (or None)")


def bidirectional_mask(attention_mask: "torch.Tensor", dtype) -> "torch.Tensor":
    """The 4-D additive mask (B, 1, L, L): every query attends to every real key (attention_mask 1), none to
    padding. transformers passes a 4-D mask through unchanged, so the Llama runs without its causal mask."""
    import torch

    keys = attention_mask[:, None, None, :].to(torch.bool)
    full = keys.expand(-1, 1, attention_mask.shape[1], -1)
    return torch.zeros(full.shape, dtype=dtype, device=attention_mask.device).masked_fill(~full,
                                                                                         torch.finfo(dtype).min)


def positions(attention_mask: "torch.Tensor") -> "torch.Tensor":
    """RoPE positions counted over real tokens only, so a left-padded row sees the positions it has alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logits(model, ids: "torch.Tensor", attention_mask: "torch.Tensor | None" = None, shift: int = 0) -> "torch.Tensor":
    """The mask predictor's logits (B, L, V) for every position: one bidirectional forward pass; row i holds the
    prediction of token i (with `shift` 1 taken from the network's row i - 1: `shifted`)."""
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    dtype = next(model.parameters()).dtype
    out = model(input_ids=ids, attention_mask=bidirectional_mask(attention_mask, dtype),
                position_ids=positions(attention_mask)).logits
    return shifted(out, shift)


def shifted(out: "torch.Tensor", shift: int) -> "torch.Tensor":
    """Network rows -> predictions of tokens: with shift 1 row i becomes row i - 1 (row 0, a prompt token that is
    never predicted, keeps its own); with 0 unchanged."""
    import torch

    if shift not in (0, 1):
        raise ValueError(f"shift={shift} must be 0 (LLaDA: position i predicts token i) or 1 (Dream: position "
                         f"i - 1 predicts token i)")
    return torch.cat([out[:, :1], out[:, :-1]], dim=1) if shift else out


def forward_process(ids: "torch.Tensor", maskable: "torch.Tensor", t: "torch.Tensor", mask_id: int,
                    gen: "torch.Generator", eps: float = 1e-3) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(noised ids, masked positions, p_mask): each `maskable` position of `ids` masked independently with
    probability p = (1 - eps) t + eps (LLaDA's forward_process), t per row."""
    import torch

    p = ((1 - eps) * t + eps)[:, None].expand_as(ids)
    masked = (torch.rand(ids.shape, generator=gen).to(ids.device) < p) & maskable
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked, p


def masked_loss(model_logits: "torch.Tensor", targets: "torch.Tensor", masked: "torch.Tensor",
                p_mask: "torch.Tensor", lengths: "torch.Tensor") -> "torch.Tensor":
    """LLaDA's SFT loss: per row, sum over masked positions of -log p(target) / p_mask, divided by the row's
    response length L'; averaged over rows."""
    import torch.nn.functional as F

    nll = F.cross_entropy(model_logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    nll = nll.view(targets.shape) * masked / p_mask
    return (nll.sum(-1) / lengths.clamp(min=1)).mean()


def sft_batch_loss(mask_id: int, eps: float, gen: "torch.Generator", shift: int = 0) -> Callable:
    """A `batch_loss` for `tasks._kit.lm.fit_lm`: its labels mark the response (every position the loss applies
    to; the prompt is -100), which is masked by the forward process at a t per row."""
    import torch

    def loss(model, ids, attention_mask, labels):
        maskable = labels != -100
        t = torch.rand(ids.shape[0], generator=gen).to(ids.device)
        noised, masked, p = forward_process(ids, maskable, t, mask_id, gen, eps)
        out = logits(model, noised, attention_mask, shift)
        return masked_loss(out, ids, masked, p, maskable.sum(-1)), int(attention_mask.sum())

    return loss


def transfer_counts(masked: int, steps: int) -> list[int]:
    """How many positions each of `steps` steps unmasks: `masked` split evenly, the remainder to the first steps
    (LLaDA's get_num_transfer_tokens)."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def default_forward(model, x: "torch.Tensor", attention_mask: "torch.Tensor", step: dict) -> "torch.Tensor":
    return logits(model, x, attention_mask, step.get("shift", 0))


def sample(model, prompt: "torch.Tensor", attention_mask: "torch.Tensor", sampling: Sampling, mask_id: int,
           forward: Callable = default_forward, observe: Callable[[dict], None] | None = None,
           shift: int = 0) -> "torch.Tensor":
    """Prompt (left-padded rows) + generated response, (B, Lp + gen_length), by low-confidence remasking.

    `forward(model, x, attention_mask, step)` returns the logits of one step; `step` carries the block, the
    step within it, the positions still masked (a cache reads them) and the model's logit `shift`. With
    `threshold`, every masked position of the block whose confidence exceeds it is unmasked too (at least the
    top one: Fast-dLLM's parallel decoding). `observe(step)` receives each step's record after it ran (`unmasked`: positions fixed)."""
    import torch

    sampling.validate()
    b, lp = prompt.shape
    x = torch.cat([prompt, torch.full((b, sampling.gen_length), mask_id, dtype=prompt.dtype,
                                      device=prompt.device)], dim=1)
    mask = torch.cat([attention_mask, torch.ones((b, sampling.gen_length), dtype=attention_mask.dtype,
                                                 device=attention_mask.device)], dim=1)
    blocks = sampling.gen_length // sampling.block_length
    per_block = sampling.steps // blocks
    for k in range(blocks):
        lo, hi = lp + k * sampling.block_length, lp + (k + 1) * sampling.block_length
        counts = [transfer_counts(int(n), per_block) for n in (x[:, lo:hi] == mask_id).sum(-1)]
        for i in range(per_block):
            masked_now = x == mask_id
            if not masked_now[:, lo:hi].any():
                break
            step = {"block": k, "index": i, "lo": lo, "hi": hi, "masked": masked_now, "shift": shift}
            out = forward(model, x, mask, step).float()
            out[..., mask_id] = NEG  # [MASK] is never a prediction
            probs = out.softmax(-1)
            conf, x0 = probs.max(-1)
            conf = torch.where(masked_now, conf, torch.full_like(conf, NEG))
            conf[:, hi:] = NEG  # nothing beyond the current block
            conf[:, :lo] = NEG
            chosen = torch.zeros_like(masked_now)
            for r in range(b):
                n = counts[r][i]
                if sampling.threshold is not None:
                    n = max(int((conf[r] > sampling.threshold).sum()), 1 if masked_now[r, lo:hi].any() else 0)
                n = min(n, int(masked_now[r, lo:hi].sum()))
                if n:
                    chosen[r, conf[r].topk(n).indices] = True
            x = torch.where(chosen, x0, x)
            if observe is not None:
                step["unmasked"] = int(chosen.sum())
                observe(step)
    return x


def generate_hook(sampling_key: str = "sampling") -> Callable:
    """The subject's `extra["generate"]` (see `tasks._kit.lm.generate_ids`): the dLLM sampler with the subject's
    `Sampling`, its `forward` (default: one full bidirectional pass) and `observe`; `max_new_tokens` is the
    response length the caller allows, which must cover the sampler's `gen_length`."""

    def generate(subject, input_ids, max_new_tokens, attention_mask=None):
        import torch

        extra = subject.extra
        sampling = extra[sampling_key]
        if sampling.gen_length > max_new_tokens:
            raise ValueError(f"the dLLM sampler's gen_length {sampling.gen_length} exceeds the caller's "
                             f"max_new_tokens {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return sample(subject.model, input_ids, attention_mask, sampling, extra["mask_id"],
                      forward=extra.get("forward") or default_forward, observe=extra.get("observe"),
                      shift=extra.get("shift", 0))

    return generate


def step_workload(subject, prompts: list[str], device, max_new_tokens: int) -> tuple[Callable, int]:
    """A dLLM task's timed workload: (run, network calls per run). `run(observe=None)` answers `prompts` one at a
    time through the subject's generate hook; it is called once here with a counting `observe` (and as a
    warm-up), since a dLLM's cost is counted in sampler steps, each one network call."""
    import torch

    from tasks._kit import lm

    tok = subject.extra["tokenizer"]
    batches = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for p in prompts]
    calls = [0]
    inner = subject.extra.get("observe")

    def counting(step: dict) -> None:
        calls[0] += 1
        if inner is not None:
            inner(step)

    def run(observe=None) -> list["torch.Tensor"]:
        subject.extra["observe"] = observe or inner
        try:
            with torch.inference_mode():
                return [lm.generate_ids(subject, ids, max_new_tokens) for ids in batches]
        finally:
            subject.extra["observe"] = inner

    run(counting)
    return run, calls[0]
