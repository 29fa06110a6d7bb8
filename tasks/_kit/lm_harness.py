"""Exact match through lm-eval (EleutherAI's LM Evaluation Harness), offline, on a local GSM8K-style task.

`write_task(folder, name, rows)` writes the test rows as JSON lines and a task YAML beside them in the style
of lm-eval's own `gsm8k.yaml` (same prompt, target, stop strings, exact-match normalisation and the two
filters), but zero-shot and pointing at the local file through `dataset_path: json`. The same folder works
from the command line:

    lm_eval --model hf --model_args pretrained=tasks/artifacts/arith/reference,tokenizer=tasks/artifacts/arith/tokenizer \\
            --include_path <folder> --tasks arith --device cpu --batch_size 1

`evaluate(subject, folder, name)` runs `lm_eval.simple_evaluate` on the subject's model as an in-memory
`HFLM`, with a subclass whose `_model_generate` goes through the subject's generation procedure when a method
has set one (`tasks._kit.lm.generate_ids`, so decoding methods are evaluated by their own procedure, one
sequence at a time) and HFLM's own `generate` (lm-eval's stop-string criteria, at `batch_size`: the profile's
evaluation batch) otherwise, and records the generated token ids. Both arms stop by one rule: the task's
`StopRule` (`subject.extra["stop"]`: lm-eval's `until` and every end-of-sequence id) cuts the method's output
where lm-eval's criteria stop the reference's, and the recorded ids of either end there. The metric is the
`strict-match` filter's exact match (the number after `#### `).

A prompt longer than the model's context is evaluated as lm-eval evaluates it: HFLM keeps only its last
`max_length - max_gen_toks` tokens (`max_length` is the model's `max_position_embeddings`, `max_gen_toks` the
task's), so that prompt and answer fit the positions. The generation is recorded under the ids the model was
actually given, and each document's prompt is matched to them through lm-eval's own encoding
(`tok_batch_encode`), never through a re-tokenization here that could disagree with it; `HarnessResult.truncated`
counts the shortened prompts (`HarnessResult.metrics` gives it as a secondary metric, `truncated_prompts`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tasks.base import Subject

if TYPE_CHECKING:
    import numpy as np

FILTER = "strict-match"  # lm-eval gsm8k's regex on `#### <n>`; "flexible-extract" takes the last number
MAX_GEN_TOKS = 160  # the longest arith answer is about 110 tokens
UNTIL = ("Question:", "</s>", "<|im_end|>")  # the stop strings of TASK_YAML (lm-eval gsm8k.yaml's `until`)

TASK_YAML = """\
# An lm-eval task in the style of lm-eval's gsm8k.yaml (same prompt, target, stop strings, metric and
# filters), zero-shot, on local JSON lines. Written by bench (tasks/_kit/lm_harness.py); do not edit.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {hf_cache}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
num_fewshot: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "(?s).*#### "
      - "\\\\.$"
generation_kwargs:
  until:
    - "Question:"
    - "</s>"
    - "<|im_end|>"
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
repeats: 1
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str, rows: list[dict], max_gen_toks: int = MAX_GEN_TOKS) -> Path:
    """Write `<folder>/test.jsonl` and `<folder>/<name>.yaml` (atomically); return the folder."""
    from bench.store import atomic_write_text

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "test.jsonl"
    atomic_write_text(data, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    yaml = TASK_YAML.format(name=name, data_file=json.dumps(str(data)), hf_cache=json.dumps(str(folder / "hf")),
                            max_gen_toks=max_gen_toks)
    atomic_write_text(folder / f"{name}.yaml", yaml)
    return folder


@dataclass
class HarnessResult:
    value: float  # lm-eval's exact match (strict-match filter)
    stderr: float  # lm-eval's own standard error of that mean
    per_example: "np.ndarray"  # 0/1 per test document, in document order
    generated: list[list[int]]  # generated token ids per document (EOS included when emitted)
    texts: list[str]  # lm-eval's decoded responses, per document
    raw: dict  # lm-eval's results entry for the task
    prompt_tokens: list[int] = field(default_factory=list)  # each document's prompt as lm-eval tokenized it
    context_tokens: list[int] = field(default_factory=list)  # what the model was given (left-truncated)
    context_ids: list[list[int]] = field(default_factory=list)  # those token ids, per document

    @property
    def truncated(self) -> int:
        """Documents whose prompt lm-eval left-truncated to fit the model's context (0 when all fit)."""
        return sum(c < p for p, c in zip(self.prompt_tokens, self.context_tokens))

    @property
    def metrics(self) -> dict[str, float]:
        """For `Evaluation.metrics`: a truncated prompt is scored on what the model saw of it, so how many
        were shortened belongs beside the score (a reference and a method of different contexts differ here)."""
        return {"truncated_prompts": float(self.truncated)}


@dataclass(frozen=True)
class _Encoded:
    ids: tuple[int, ...]  # the context the model was given (padding included at batch > 1): generation's key
    prompt_tokens: int  # the whole prompt
    context_tokens: int  # what was kept of it


@contextmanager
def _rng_preserved() -> Iterator[None]:
    """lm-eval may touch the global generators; the run's own random state must not depend on whether the
    reference's evaluation came from the cache."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _lm_class():
    from lm_eval.models.huggingface import HFLM

    from tasks._kit.lm import generate_ids, stop_rule

    class SubjectLM(HFLM):
        """HFLM over a bench `Subject`: generation goes through the subject's procedure and is recorded."""

        def __init__(self, subject: Subject, batch_size: int = 1, **kwargs):
            self.subject = subject
            self.generated: dict[tuple[int, ...], list[int]] = {}  # by the context ids the model was given
            self.encoded: dict[str, _Encoded] = {}  # by prompt text: those ids and the prompt's full length
            tok = subject.extra["tokenizer"]
            super().__init__(pretrained=subject.model, tokenizer=tok, batch_size=batch_size,
                             max_length=subject.model.config.max_position_embeddings, **kwargs)

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            """lm-eval's encoding of the prompts, unchanged (left-truncated to `left_truncate_len` only when
            longer), with what each prompt became recorded, so `evaluate` finds its generation by the prompt."""
            full, full_mask = super().tok_batch_encode(strings, padding_side, None, truncation)
            ids, mask = full, full_mask
            if left_truncate_len and full.shape[1] > left_truncate_len:  # lm-eval's own truncation (and warning)
                ids, mask = super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
            for row, text in enumerate(strings):
                self.encoded[text] = _Encoded(tuple(ids[row].tolist()), int(full_mask[row].sum()),
                                              int(mask[row].sum()))
            return ids, mask

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.subject.extra.get("generate") is None:
                out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            else:  # a method's own decoding procedure, stopped (or at least cut) by the task's StopRule
                out = generate_ids(self.subject, context, max_length - context.shape[1])
            eos, rule = self.tokenizer.eos_token_id, stop_rule(self.subject)
            for row in range(context.shape[0]):
                ids = out[row, context.shape[1]:].tolist()
                if rule is not None:  # lm-eval's batch goes on until every row stopped: each row's own stop
                    ids = rule.cut(ids)
                elif eos in ids:
                    ids = ids[:ids.index(eos) + 1]
                self.generated[tuple(context[row].tolist())] = ids
            return out

    return SubjectLM


def evaluate(subject: Subject, folder: Path | None, name: str, limit: int | None = None,
             config: dict | None = None, batch_size: int = 1) -> HarnessResult:
    """lm-eval's exact match of `subject` on the first `limit` documents (all when None) of the task `name` in
    `folder`; or, with `config`, of that inline lm-eval task config (`tasks.gsm8k` passes lm-eval's own
    gsm8k.yaml, whose data may come from the hub, so nothing is forced offline then; `folder` is None).
    `batch_size` is HFLM's generation batch when the subject has no generation hook (the reference's
    `model.generate`, left-padded); a method's own procedure decodes one sequence at a time."""
    import logging

    import numpy as np

    if config is None:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    for log in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(log).setLevel(logging.ERROR)
    lm = _lm_class()(subject, batch_size=1 if subject.extra.get("generate") is not None else max(1, batch_size))
    manager = TaskManager(include_path=None if folder is None else str(folder), include_defaults=False)
    with _rng_preserved():
        out = lm_eval.simple_evaluate(model=lm, tasks=[name if config is None else config], task_manager=manager,
                                      limit=limit, log_samples=True, bootstrap_iters=1000, random_seed=None,
                                      numpy_random_seed=None, torch_random_seed=None)
    samples = sorted((s for s in out["samples"][name] if s["filter"] == FILTER), key=lambda s: s["doc_id"])
    per_example = np.asarray([float(s["exact_match"]) for s in samples], dtype=np.float64)
    generated, texts, encodings = [], [], []
    for s in samples:
        context = s["arguments"][0][0]
        enc = lm.encoded.get(context)
        if enc is None or enc.ids not in lm.generated:
            raise RuntimeError(f"lm-eval returned a response for document {s['doc_id']} of {name!r} that was never "
                               f"generated through bench's HFLM ({'never encoded' if enc is None else 'no generation'}"
                               " under its context ids); every response must come from the subject's generation")
        generated.append(lm.generated[enc.ids])
        texts.append(s["resps"][0][0])
        encodings.append(enc)
    raw = out["results"][name]
    return HarnessResult(float(raw[f"exact_match,{FILTER}"]), float(raw[f"exact_match_stderr,{FILTER}"]),
                         per_example, generated, texts, {k: v for k, v in raw.items() if k != "alias"},
                         [e.prompt_tokens for e in encodings], [e.context_tokens for e in encodings],
                         [list(e.ids) for e in encodings])
