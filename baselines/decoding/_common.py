"""What the causal-LM decoding methods share: the task's draft model, the batch-1 input, forward-call counting.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Subject, Task


def draft_subject(task: "Task", ctx: "RunContext", method: str) -> "Subject":
    """The task's draft model (same tokenizer as the reference); a task without one is refused by the registry
    before any work starts (the method requires `bench.api.Draft`), and by `require` here for direct callers."""
    from bench.api import Draft, require

    return require(task, Draft).draft_subject(ctx)


def check_same_vocabulary(target, draft, method: str) -> None:
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise ValueError(f"method {method!r}: the draft's vocabulary ({vd} tokens) differs from the target's "
                         f"({vt}); the draft must share the target's tokenizer")


def single_row(input_ids: "torch.Tensor", attention_mask: "torch.Tensor | None", method: str) -> "torch.Tensor":
    """The one prompt of a batch-1 call as a 1-D tensor, left padding stripped (the causal-LM profiles run
    batch 1; the draft-and-verify loop is written for one sequence, as transformers' assisted generation is)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"method {method!r} decodes one sequence at a time (batch 1, the causal-LM profiles' "
                         f"batch size); got input_ids of shape {tuple(input_ids.shape)}")
    row = input_ids[0]
    if attention_mask is not None:
        row = row[attention_mask[0].bool()]
    return row


@dataclass
class ForwardCount:
    calls: int = 0


@contextmanager
def counting_forwards(*models) -> Iterator[list[ForwardCount]]:
    """Count the forward calls of each model while the block runs (hooks are removed afterwards, so the
    reference, which shares the target model, is never slowed down by them)."""
    counts = [ForwardCount() for _ in models]
    handles = []
    for model, count in zip(models, counts):
        def hook(module, args, output, count=count):
            count.calls += 1
        handles.append(model.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def generated_length(output: "torch.Tensor", prompt_len: int, eos_id: int | None) -> int:
    """New tokens in a batch-1 output, up to and including the first EOS."""
    new = output[0, prompt_len:].tolist()
    return new.index(eos_id) + 1 if eos_id is not None and eos_id in new else len(new)
