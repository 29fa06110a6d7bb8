"""Offline stand-ins for the full language tasks (`gsm8k`, `gsm8k-dllm`, `glue-sst2`, `glue-mnli`) and the full
vision-language task (`textvqa`), shared by the method tests that run end to end on them: fixture files in the real
formats, train splits included (pruning calibrates on them, distillation trains on them), tiny random models, and
the environment variables that point the tasks at them. Built from the task tests' own fixture writers
(`test_gsm8k`, `test_gsm8k_dllm`, `test_glue`, `test_textvqa`)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterator

import pytest
import test_glue as glue_fixtures
import test_gsm8k as gsm8k_fixtures
import test_gsm8k_dllm as gsm8k_dllm_fixtures
import test_textvqa as textvqa_fixtures


@contextlib.contextmanager
def full_task_env(root: Path, separate_draft: bool) -> Iterator[Path]:
    """Write the fixtures under `root` and set the tasks' environment while the context is open. The gsm8k
    reference is a 2-layer Llama of width 32; its draft is the same model, or with `separate_draft` a 1-layer
    Llama of width 16 (a student smaller than its teacher). The gsm8k-dllm reference is a 2-layer Llama of width
    32 with one more row, its config's mask_token_id, on the same tokenizer and data."""
    from tasks import glue, gsm8k, gsm8k_dllm
    from tasks._kit import lm

    data = root / "gsm8k"
    data.mkdir()
    gsm8k_fixtures.write_jsonl(data / "train.jsonl", gsm8k_fixtures.TRAIN)
    gsm8k_fixtures.write_jsonl(data / "test.jsonl", gsm8k_fixtures.TEST)
    rows = gsm8k_fixtures.TRAIN + gsm8k_fixtures.TEST
    tok = lm.train_tokenizer([lm.prompt_of(q) + " " + a for q, a in rows], vocab_size=400)
    gsm8k_fixtures.save_llama(root / "reference", tok, hidden=32, layers=2, seed=0)
    draft = root / "reference"
    if separate_draft:
        draft = root / "draft"
        gsm8k_fixtures.save_llama(draft, tok, hidden=16, layers=1, seed=1)
    gsm8k_dllm_fixtures.save_mask_llama(root / "dllm-reference", tok)

    g = root / "glue"
    sst2, mnli = glue_fixtures.SST2_ROWS, glue_fixtures.MNLI_ROWS
    for split in ("validation", "train"):
        glue_fixtures.write_parquet(g / "sst2" / f"{split}-00000-of-00001.parquet",
                                    {"sentence": [s for s, _ in sst2], "label": [y for _, y in sst2],
                                     "idx": list(range(len(sst2)))}, glue.SST2.labels)
    for split in ("validation_matched", "train"):
        glue_fixtures.write_parquet(g / "mnli" / f"{split}-00000-of-00001.parquet",
                                    {"premise": [p for p, _, _ in mnli], "hypothesis": [h for _, h, _ in mnli],
                                     "label": [y for *_, y in mnli], "idx": list(range(len(mnli)))},
                                    glue.MNLI.labels)
    glue_fixtures.save_bert(root / "sst2", glue_fixtures.words(s for s, _ in sst2), {0: "negative", 1: "positive"})
    glue_fixtures.save_bert(root / "mnli", glue_fixtures.words(t for p, h, _ in mnli for t in (p, h)),
                            {0: "contradiction", 1: "entailment", 2: "neutral"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gsm8k.DATA_ENV, str(data))
        mp.setenv(gsm8k.REFERENCE_ENV, str(root / "reference"))
        mp.setenv(gsm8k.DRAFT_ENV, str(draft))
        mp.setenv(gsm8k_dllm.REFERENCE_ENV, str(root / "dllm-reference"))
        mp.delenv(gsm8k_dllm.TRUST_ENV, raising=False)
        mp.delenv(gsm8k_dllm.SHIFT_ENV, raising=False)
        mp.setenv(glue.DATA_ENV, str(g))
        mp.setenv(glue.SST2.reference_env, str(root / "sst2"))
        mp.setenv(glue.MNLI.reference_env, str(root / "mnli"))
        for spec in (glue.SST2, glue.MNLI):
            mp.delenv(spec.labels_env, raising=False)
        yield root


@contextlib.contextmanager
def vlm_task_env(root: Path) -> Iterator[Path]:
    """`textvqa` offline while the context is open: lmms-lab/textvqa-layout parquet files (6 validation questions,
    two training shards) and a tiny random LLaVA (2-layer CLIP tower, 16 visual tokens an image, 2-layer Llama)
    saved with its LlavaProcessor, under `root`."""
    from tasks import textvqa

    textvqa_fixtures.write_textvqa(root / "textvqa")
    textvqa_fixtures.save_tiny_llava(root / "llava")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(textvqa.DATA_ENV, str(root / "textvqa"))
        mp.setenv(textvqa.REFERENCE_ENV, str(root / "llava"))
        mp.delenv(textvqa.OCR_ENV, raising=False)
        yield root


def cifar10_fixtures():
    """This folder's conftest (its `write_cifar10` writes CIFAR-10 files in the real format), loaded once under a
    name of its own: `conftest` names several modules, so it cannot be imported by that name."""
    spec = importlib.util.spec_from_file_location("_cifar10_fixture_writer", Path(__file__).parent / "conftest.py")
    if spec.name not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # before running it: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[spec.name]
