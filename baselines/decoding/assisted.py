"""`assisted`: transformers' own assisted generation, `model.generate(..., assistant_model=draft)` (Hugging Face's
"Assisted Generation" blog post, 2023, https://huggingface.co/blog/assisted-generation), the library baseline
beside the hand-written `speculative`, with the same draft model.

Greedy (the task's decoding), each round the assistant greedily drafts up to `num_assistant_tokens` tokens
(stopping early when its own probability of a token falls below `assistant_confidence_threshold`, a threshold
the library re-fits along the way), the target scores them in one forward pass, and the longest prefix that
equals the target's argmax is kept plus the target's next token: the output is the target's greedy output.
(With sampling the library applies Leviathan et al.'s rejection rule; this baseline stays greedy.)

Statistics come from counting forward calls during each `generate` (hooks that live only for that call): each
target call is one verification (the first also reads the prompt), each assistant call drafts one token, so
    mean_accepted_length = generated tokens / target calls,
    acceptance_rate ~= (generated tokens - target calls) / assistant calls
(each round emits its accepted drafts plus one target token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import Draft
from bench.registry import register_method


@dataclass(frozen=True)
class AssistedConfig:
    # the defaults are transformers' own (GenerationConfig's assisted-generation defaults in 5.x): the library
    # baseline is what a user of `generate(assistant_model=...)` gets
    num_assistant_tokens: int = 20  # most drafts per round
    num_assistant_tokens_schedule: Literal["constant", "heuristic", "heuristic_transient"] = "constant"
    assistant_confidence_threshold: float = 0.4  # stop drafting below this draft probability; 0 = never

    def validate(self) -> None:
        check_range("num_assistant_tokens", self.num_assistant_tokens, lo=1)
        check_range("assistant_confidence_threshold", self.assistant_confidence_threshold, lo=0, hi=1)
        valid = ("constant", "heuristic", "heuristic_transient")
        if self.num_assistant_tokens_schedule not in valid:
            raise ConfigError(f"num_assistant_tokens_schedule={self.num_assistant_tokens_schedule!r} is not one "
                              f"of {', '.join(valid)}")


@dataclass
class CallCounts:
    target_forward_passes: int = 0
    draft_forward_passes: int = 0
    generated_tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        out = {"mean_accepted_length": self.generated_tokens / max(1, self.target_forward_passes),
               "target_forward_passes": self.target_forward_passes, "generated_tokens": self.generated_tokens}
        if self.draft_forward_passes:
            out["drafted_tokens"] = self.draft_forward_passes
            out["acceptance_rate"] = ((self.generated_tokens - self.target_forward_passes)
                                      / self.draft_forward_passes)
        return out


@register_method("assisted", family="decoding", paper="Gante, Assisted Generation: a new direction toward "
                 "low-latency text generation (Hugging Face)", year=2023,
                 url="https://huggingface.co/blog/assisted-generation", modalities=("causal-lm",),
                 requires=(Draft,),
                 summary="transformers' generate(assistant_model=draft): the library's speculative decoding, "
                         "greedy, with the task's draft")
class Assisted(Method):
    Config = AssistedConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        import torch

        from baselines.decoding._common import (check_same_vocabulary, counting_forwards, draft_subject,
                                                generated_length)
        from tasks.base import Subject

        cfg = self.config
        draft = draft_subject(task, ctx, "assisted").model
        check_same_vocabulary(subject.model, draft, "assisted")
        gc = copy.deepcopy(draft.generation_config)  # the library reads these from the assistant's config
        gc.num_assistant_tokens = cfg.num_assistant_tokens
        gc.num_assistant_tokens_schedule = cfg.num_assistant_tokens_schedule
        gc.assistant_confidence_threshold = cfg.assistant_confidence_threshold  # 0.0 (falsy): no stopping; None
        # would be replaced by the library default (0.4)
        draft.generation_config = gc
        tok = subject.extra["tokenizer"]
        counts = CallCounts()

        def generate(subj, input_ids, max_new_tokens, attention_mask=None):
            if input_ids.shape[0] != 1:
                raise ValueError(f"transformers' assisted generation decodes batch 1 only; got batch "
                                 f"{input_ids.shape[0]}")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            with counting_forwards(subj.model, draft) as (t, d):
                out = subj.model.generate(input_ids, attention_mask=mask, assistant_model=draft, do_sample=False,
                                          max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)
            counts.target_forward_passes += t.calls
            counts.draft_forward_passes += d.calls
            counts.generated_tokens += generated_length(out, input_ids.shape[1], tok.eos_token_id)
            return out

        extra = {**subject.extra, "generate": generate, "draft": draft}
        n_draft = sum(p.numel() for p in draft.parameters())
        cost = Cost(description=f"no training: drafts with the task's draft model ({n_draft} parameters)")
        return Applied(Subject(subject.model, subject.kind, extra), cost, stats=counts.as_dict)
