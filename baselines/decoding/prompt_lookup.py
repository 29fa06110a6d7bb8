"""`prompt-lookup`: prompt lookup decoding (Saxena, 2023, https://github.com/apoorvumang/prompt-lookup-decoding)
through transformers' `generate(prompt_lookup_num_tokens=...)`.

Speculative decoding without a draft model: the drafts are copied from the text so far. With the last
n tokens x_{t-n+1..t} (n from `max_matching_ngram_size` down to 1), find an earlier occurrence of that n-gram in
x_{<=t}; the `prompt_lookup_num_tokens` tokens that followed it are the candidates, which the target verifies
in one forward pass, keeping the longest prefix equal to its greedy choices plus its next token. Greedy
output is the target's own. It pays off where the answer copies the prompt (GSM8K-style answers repeat the
question's numbers and words).

Statistics: target forward calls are counted during each `generate` (a hook that lives only for that call);
mean_accepted_length = generated tokens / target calls. How many tokens were proposed is not exposed by the
library, so no acceptance rate is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class PromptLookupConfig:
    prompt_lookup_num_tokens: int = 10  # candidates copied per round (Saxena's and transformers' docs' value)
    max_matching_ngram_size: int = 2  # longest n-gram matched (transformers' default)

    def validate(self) -> None:
        check_range("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens, lo=1)
        check_range("max_matching_ngram_size", self.max_matching_ngram_size, lo=1)


@dataclass
class LookupCounts:
    target_forward_passes: int = 0
    generated_tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"mean_accepted_length": self.generated_tokens / max(1, self.target_forward_passes),
                "target_forward_passes": self.target_forward_passes, "generated_tokens": self.generated_tokens}


@register_method("prompt-lookup", family="decoding", paper="Saxena, Prompt Lookup Decoding", year=2023,
                 url="https://github.com/apoorvumang/prompt-lookup-decoding", modalities=("causal-lm",),
                 summary="drafts copied from matching n-grams of the text so far, verified by the target in one "
                         "pass (transformers' prompt_lookup_num_tokens)")
class PromptLookup(Method):
    Config = PromptLookupConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.decoding._common import counting_forwards, generated_length
        from tasks.base import Subject

        cfg = self.config
        tok = subject.extra["tokenizer"]
        counts = LookupCounts()

        def generate(subj, input_ids, max_new_tokens, attention_mask=None):
            if input_ids.shape[0] != 1:
                raise ValueError(f"transformers' prompt lookup decoding decodes batch 1 only; got batch "
                                 f"{input_ids.shape[0]}")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            with counting_forwards(subj.model) as (t,):
                out = subj.model.generate(input_ids, attention_mask=mask, do_sample=False,
                                          prompt_lookup_num_tokens=cfg.prompt_lookup_num_tokens,
                                          max_matching_ngram_size=cfg.max_matching_ngram_size,
                                          max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)
            counts.target_forward_passes += t.calls
            counts.generated_tokens += generated_length(out, input_ids.shape[1], tok.eos_token_id)
            return out

        extra = {**subject.extra, "generate": generate}
        return Applied(Subject(subject.model, subject.kind, extra), Cost(description="none: no draft, no training"),
                       stats=counts.as_dict)
