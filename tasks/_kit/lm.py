"""Shared machinery of the causal-LM tasks: tokenizer, Llama-style models, training, greedy generation.

Module scope stays torch- and transformers-free (see `bench.registry`); everything heavy is imported inside
functions.

Prompt format (GSM8K's in lm-eval): the prompt is `Question: <question>\\nAnswer:` and the completion is
`" " + answer` followed by the end-of-text token. Training puts the loss on the completion only.

The generation hook: a subject's greedy decoding goes through `generate_ids(subject, input_ids, ...)`, which
calls `subject.extra["generate"]` when a method has set one (speculative decoding, a KV-cache policy, ...)
and `model.generate` otherwise; both the lm-eval evaluation and the timed workload use it, so a method that
changes the decoding procedure is measured by the same code as the reference.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from bench.api import SMOKE_STEPS  # noqa: F401 - re-exported: the one cap of every training under smoke
from tasks.base import RunContext, Subject

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
PROMPT = "Question: {question}\nAnswer:"


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for a causal LM's forward, under the name it takes: transformers 5.25 renamed the
    `past_key_values` argument (and output) to `cache` and will drop the old name in 5.40; earlier 5.x has only
    `past_key_values`. Methods that drive the model's KV cache themselves pass it through this."""
    return {_cache_keyword(type(model)): cache}


def passed_cache(kwargs: dict):
    """The KV cache among the keyword arguments a module was called with, under either name (see `cache_kwargs`)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def output_cache(output):
    """The KV cache a forward returned (`output.cache` from transformers 5.25, `output.past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def prompt_of(question: str) -> str:
    return PROMPT.format(question=question)


# ---- tokenizer ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> "PreTrainedTokenizerFast":
    """Byte-level BPE (GPT-2's byte alphabet, so any text round-trips exactly) with every digit its own token:
    numbers are spelled digit by digit, which is what makes arithmetic learnable by a small model. The
    trainer is deterministic: the same texts give the same tokenizer.json, byte for byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok) -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   unk_token=None, clean_up_tokenization_spaces=False, model_max_length=512)


def load_tokenizer(path: Path) -> "PreTrainedTokenizerFast":
    """The tokenizer from a `tokenizer.json` file (the project's tokenizers are all in that one file)."""
    from tokenizers import Tokenizer

    return wrap_tokenizer(Tokenizer.from_file(str(path)))


def tokenizer_json(tok: "PreTrainedTokenizerFast") -> str:
    """The canonical serialisation that is hashed and published."""
    return tok.backend_tokenizer.to_str(pretty=True) + "\n"


# ---- models -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMArch:
    """A Llama-style decoder (RoPE, RMSNorm, SwiGLU), untied embeddings so weights save without sharing."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 256

    def config(self, tok: "PreTrainedTokenizerFast"):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(tok), hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=self.max_positions,
                           tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, bos_token_id=None)


def build_lm(arch: LMArch, tok: "PreTrainedTokenizerFast", seed: int = 0) -> "PreTrainedModel":
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the run's generator alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(arch.config(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


# ---- training -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMRecipe:
    epochs: float  # passes over the training split (fractions allowed)
    lr: float  # AdamW peak learning rate: linear warm-up, then cosine to zero
    batch_size: int
    warmup_steps: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0


@dataclass
class TrainStats:
    seconds: float = 0.0
    steps: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0  # tokens of the sequences trained on (prompt and completion, padding excluded)
    final_loss: float = float("nan")


Example = tuple[list[int], list[int]]  # (token ids, labels: the id where the loss applies, else -100)


def encode_examples(tok: "PreTrainedTokenizerFast", prompts: Sequence[str], completions: Sequence[str]) -> list[Example]:
    """Prompt + " " + completion + EOS, with the loss on the completion and EOS only."""
    p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tok([" " + c for c in completions], add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(p_ids, c_ids):
        ids = p + c + [tok.eos_token_id]
        out.append((ids, [-100] * len(p) + ids[len(p):]))
    return out


def encode_spans(tok: "PreTrainedTokenizerFast", texts: Sequence[str],
                 spans: Sequence[Sequence[tuple[int, int]]]) -> list[Example]:
    """Texts with the loss only on the tokens that end inside the given character spans."""
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        labels = [t if any(a < end <= b for a, b in sp) else -100 for t, (_, end) in zip(ids, offsets)]
        out.append((ids, labels))
    return out


def _batches(lengths: list[int], batch_size: int, gen: "torch.Generator") -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within windows of 50 batches (less padding),
    then the batches shuffled again. Deterministic for the generator's state."""
    import torch

    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = 50 * batch_size
    batches = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w:w + window], key=lambda i: (lengths[i], i))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def collate(examples: list[Example], idx: list[int], pad_id: int):
    """(input_ids, attention_mask, labels) right-padded; labels are -100 where there is no loss."""
    import torch

    n = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        seq, lab = examples[i]
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, :len(seq)] = torch.tensor(lab)
    return ids, mask, labels


def completion_loss(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def fit_lm(model: "PreTrainedModel", examples: list[Example], recipe: LMRecipe, ctx: RunContext,
           seed: int, description: str, pad_id: int,
           loss_fn: Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
           | None = None,
           batch_loss: Callable[["PreTrainedModel", "torch.Tensor", "torch.Tensor", "torch.Tensor"],
                                tuple["torch.Tensor", int]] | None = None) -> TrainStats:
    """Train `model` in place (AdamW, warm-up + cosine, gradient clipping), deterministically for `seed`.

    `loss_fn(logits, input_ids, attention_mask, labels)` replaces the completion cross-entropy
    (distillation passes its own). `batch_loss(model, input_ids, attention_mask, labels)` replaces the forward
    pass as well and returns `(loss, tokens trained on)`: on-policy distillation trains on sequences it
    samples from the batch's prompts. Under `--budget smoke` training stops after `SMOKE_STEPS` steps."""
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    model.to(ctx.device).train()
    lengths = [len(e[0]) for e in examples]
    per_epoch = math.ceil(len(examples) / recipe.batch_size)
    total = max(1, round(recipe.epochs * per_epoch))
    total = ctx.budget.steps(total)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    warm = min(recipe.warmup_steps, max(1, total // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stats = TrainStats()
    t0 = time.perf_counter()
    queue: list[list[int]] = []
    running = None
    with ctx.progress.step(description, total=total) as advance:
        while stats.steps < total:
            if not queue:
                queue = _batches(lengths, recipe.batch_size, gen)
            idx = queue.pop(0)
            ids, mask, labels = (t.to(ctx.device) for t in collate(examples, idx, pad_id))
            if batch_loss is not None:
                loss, tokens = batch_loss(model, ids, mask, labels)
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss = completion_loss(logits, labels) if loss_fn is None else loss_fn(logits, ids, mask, labels)
                tokens = int(mask.sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
            opt.step()
            sched.step()
            value = loss.detach().item()
            running = value if running is None else 0.98 * running + 0.02 * value
            stats.steps += 1
            stats.samples_seen += len(idx)
            stats.tokens_seen += tokens
            advance(1)
    stats.seconds = time.perf_counter() - t0
    stats.final_loss = float(running) if running is not None else float("nan")
    model.eval()
    return stats


# ---- generation ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopRule:
    """Where a generation ends, the same for every arm: after the first token that is one of `eos_ids`, or after
    the first token with which one of `strings` appears in the decoded generation.

    The stop strings are tested as lm-eval tests them for the reference (`lm_eval.models.utils_hf.
    MultiTokenEOSCriteria`, which HFLM passes to `generate`): after each generated token, string s stops the
    generation when it occurs in the decoding (special tokens kept) of the last len(encode(s)) + 2 generated
    tokens. lm-eval then cuts the response text at each string (`postprocess_generated_text`), so a procedure
    that stops where this rule says produces, token for token and after the cut character for character, the
    reference's response. A task sets the rule as `subject.extra["stop"]` (`LMExtra`); `generate_ids` applies
    it to the reference's `model.generate` (a stopping criterion and every end-of-sequence id) and cuts a
    method's output with it; a method's own loop reads it (`stop_rule`) to stop there as well."""

    strings: tuple[str, ...]  # lm-eval's `until`, with the tokenizer's decoded EOS appended as lm-eval does
    eos_ids: tuple[int, ...]  # every end-of-sequence id of the checkpoint (generation_config, config, tokenizer)
    tokenizer: object = None  # decodes the generated tokens for the stop strings
    windows: tuple[int, ...] = ()  # per string: the generated tokens lm-eval's criterion decodes

    @classmethod
    def build(cls, tokenizer, until: Sequence[str], eos_ids: Iterable[int]) -> "StopRule":
        """The rule for lm-eval's `until` (its `handle_stop_sequences`: the tokenizer's decoded EOS is appended
        unless present) and the given end-of-sequence ids (the tokenizer's own is always among them)."""
        strings = [s for s in until if s]
        eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
        if eos_text and eos_text not in strings:
            strings.append(eos_text)
        ids = sorted({int(i) for i in eos_ids} | {int(tokenizer.eos_token_id)})
        windows = tuple(len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in strings)
        return cls(tuple(strings), tuple(ids), tokenizer, windows)

    def _hit(self, tokens: Sequence[int], end: int) -> bool:
        """Does a stop string occur in lm-eval's window of the generated tokens[:end]?"""
        if not self.strings:
            return False
        widest = self.tokenizer.decode(list(tokens[max(0, end - max(self.windows)):end]))
        for s, w in zip(self.strings, self.windows):
            if s in widest and s in self.tokenizer.decode(list(tokens[max(0, end - w):end])):
                return True
        return False

    def stop_length(self, tokens: Sequence[int], checked: int = 0) -> int | None:
        """How many of the generated `tokens` a generation keeps (the stopping token included), or None when
        it would go on; the first `checked` tokens are known not to stop it (a loop passes what it tested)."""
        for i in range(checked, len(tokens)):
            if tokens[i] in self.eos_ids or self._hit(tokens, i + 1):
                return i + 1
        return None

    def cut(self, tokens: Sequence[int]) -> list[int]:
        n = self.stop_length(tokens)
        return list(tokens if n is None else tokens[:n])

    def criteria(self, prompt_len: int):
        """A transformers stopping criterion for the stop strings, per row (the end-of-sequence ids go to
        `generate` as `eos_token_id`), testing the tokens generated after `prompt_len` as lm-eval does."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        rule = self

        class _StopStrings(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                gen = input_ids[:, prompt_len:][:, -max(rule.windows):].tolist()
                return torch.tensor([rule._hit(row, len(row)) for row in gen], device=input_ids.device)

        return StoppingCriteriaList([_StopStrings()] if self.strings else [])

    def cut_output(self, output: "torch.Tensor", prompt_len: int, pad_id: int) -> "torch.Tensor":
        """`output` (prompt and generation, a batch) with every row's tokens after its stop replaced by `pad_id`,
        and the columns after the longest kept generation dropped (batch 1: the output ends at the stop)."""
        rows = output[:, prompt_len:].tolist()
        keep = [self.stop_length(r) for r in rows]
        if all(k is None for k in keep):
            return output
        out = output.clone()
        for r, k in enumerate(keep):
            if k is not None:
                out[r, prompt_len + k:] = pad_id
        longest = max(len(row) if k is None else k for row, k in zip(rows, keep))
        return out[:, :prompt_len + longest]


def checkpoint_eos_ids(model, tokenizer) -> tuple[int, ...]:
    """Every end-of-sequence id the checkpoint declares: its generation_config's (an int or a list: Qwen2.5-
    Instruct's is [<|im_end|>, <|endoftext|>]), its config's, and the tokenizer's."""
    ids = {int(tokenizer.eos_token_id)}
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids |= {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
    return tuple(sorted(ids))


def stop_rule(subject: Subject) -> StopRule | None:
    """The task's stopping rule for this subject (None: stop at the tokenizer's EOS only, as before)."""
    return subject.extra.get("stop")


def generate_ids(subject: Subject, input_ids: "torch.Tensor", max_new_tokens: int,
                 attention_mask: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Greedy continuation of `input_ids` (left-padded when `attention_mask` is given), prompt included,
    stopping at EOS, and where the subject carries a `StopRule` (`extra["stop"]`) at its stop strings and every
    end-of-sequence id; rows that stopped early are padded. `subject.extra["generate"](subject, input_ids,
    max_new_tokens, attention_mask)`, when a method sets it, replaces `model.generate`; its output is cut by the
    rule, so a method's answers end exactly where the reference's do (a method stops there itself by reading
    `stop_rule(subject)`; one that does not still returns the cut answer, but does the extra work)."""
    rule = stop_rule(subject)
    tok = subject.extra["tokenizer"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hook = subject.extra.get("generate")
    if hook is not None:
        out = hook(subject, input_ids, max_new_tokens, attention_mask)
        return out if rule is None else rule.cut_output(out, input_ids.shape[1], pad)
    if attention_mask is None:
        import torch

        attention_mask = torch.ones_like(input_ids)
    if rule is None:
        return subject.model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    out = subject.model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=list(rule.eos_ids), pad_token_id=pad,
                                 stopping_criteria=rule.criteria(input_ids.shape[1]))
    return rule.cut_output(out, input_ids.shape[1], pad)


def completion_tokens(output: "torch.Tensor", prompt_len: int, eos_id: int, rule: StopRule | None = None) -> list[int]:
    """The generated tokens of a batch-1 output, up to and including the first EOS (or where `rule` stops)."""
    out = output[0, prompt_len:].tolist()
    if rule is not None:
        return rule.cut(out)
    return out[:out.index(eos_id) + 1] if eos_id in out else out
