"""`tasks._kit.lm_harness`: a prompt longer than the model's context is evaluated as lm-eval evaluates it.

A tiny random GPT-2 with 256 positions and a local task whose answers get lm_harness's 160 new tokens: lm-eval's
HFLM keeps the last 256 - 160 = 96 tokens of a longer prompt. Before the fix the generation was stored under those
96 ids and looked up under the whole prompt's ids, a KeyError (issue 18, case 11).
"""

from __future__ import annotations

import pytest
import torch

from tasks._kit import lm, lm_harness
from tasks.base import Subject

POSITIONS = 256
CONTEXT = POSITIONS - lm_harness.MAX_GEN_TOKS  # what lm-eval keeps of a prompt: max_length - max_gen_toks

SHORT = {"question": "Tom has 3 boxes of 4 apples. How many apples?", "answer": "3*4=12.\n#### 12"}
LONG = {"question": "Count on: " + " ".join(str(i) for i in range(100, 190)) + ". What comes next?",
        "answer": "After 189 comes 190.\n#### 190"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer GPT-2 (256 positions, ~300-token vocabulary), its tokenizer, and the local task."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = lm.train_tokenizer([lm.prompt_of(r["question"]) + " " + r["answer"] for r in (SHORT, LONG)],
                             vocab_size=300)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=POSITIONS, n_embd=32, n_layer=1, n_head=2,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    folder = lm_harness.write_task(tmp_path_factory.mktemp("harness"), "longq", [SHORT, LONG, SHORT])
    return {"tok": tok, "model": model, "folder": folder}


def prompt_ids(tok, row) -> list[int]:
    return tok("Question: " + row["question"] + "\nAnswer:", add_special_tokens=False)["input_ids"]


def test_the_long_prompt_exceeds_what_lm_eval_keeps(tiny):
    assert tiny["model"].config.max_position_embeddings == POSITIONS
    assert len(prompt_ids(tiny["tok"], LONG)) > 200 > CONTEXT >= len(prompt_ids(tiny["tok"], SHORT))


def test_a_long_prompt_is_left_truncated_as_lm_eval_does_and_counted(tiny):
    """The model's own procedure (the hook decoding methods set) sees the last `CONTEXT` prompt tokens, and its
    continuation is the document's generation; short prompts are untouched and nothing else is counted."""
    tok, model = tiny["tok"], tiny["model"]
    seen = []

    def generate(subject, input_ids, max_new_tokens, attention_mask=None):  # greedy to EOS, no stop strings
        seen.append(input_ids[0].tolist())
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)

    r = lm_harness.evaluate(Subject(model, "causal-lm", {"tokenizer": tok, "generate": generate}),
                            tiny["folder"], "longq")
    long_ids, short_ids = prompt_ids(tok, LONG), prompt_ids(tok, SHORT)
    assert sorted(map(len, seen)) == sorted([len(short_ids), CONTEXT, len(short_ids)])  # a call a document
    assert long_ids[-CONTEXT:] in seen and short_ids in seen
    assert r.prompt_tokens == [len(short_ids), len(long_ids), len(short_ids)]
    assert r.context_tokens == [len(short_ids), CONTEXT, len(short_ids)]
    assert r.truncated == 1 and r.metrics == {"truncated_prompts": 1.0}
    with torch.inference_mode():
        direct = model.generate(torch.tensor([long_ids[-CONTEXT:]]), do_sample=False,
                                max_new_tokens=lm_harness.MAX_GEN_TOKS, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)[0, CONTEXT:].tolist()
    assert r.generated[1] == (direct[:direct.index(tok.eos_token_id) + 1] if tok.eos_token_id in direct else direct)
    assert len(r.generated) == len(r.texts) == r.per_example.shape[0] == 3


def test_responses_are_plain_lm_evals_on_the_same_model(tiny):
    """Through HFLM's own generation, bench's responses are those of lm-eval's unmodified HFLM at the same
    `max_length`: the long prompt is scored on what lm-eval would score, not dropped or re-tokenized."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok, model = tiny["tok"], tiny["model"]
    r = lm_harness.evaluate(Subject(model, "causal-lm", {"tokenizer": tok}), tiny["folder"], "longq")
    assert r.truncated == 1 and all(r.generated)
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=POSITIONS)
    out = lm_eval.simple_evaluate(model=plain, tasks=["longq"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tiny["folder"]), include_defaults=False))
    samples = sorted((s for s in out["samples"]["longq"] if s["filter"] == lm_harness.FILTER),
                     key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == r.texts
