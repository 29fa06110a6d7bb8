"""One stopping rule for both arms of the LM tasks (issue 26, point 3), and lm-eval's batch for the reference
(point 4), on the offline gsm8k fixture (tiny random Llama models; `test_gsm8k`'s files).

The reference's answers come from lm-eval's own HFLM path (its stop-string criteria, the model's
generation_config end-of-sequence ids); a method's from its generate hook, stopped or cut by the task's
`tasks._kit.lm.StopRule`. The random fixture model never writes `Question:`, so the tests add a stop string that
its greedy text does contain, and an end-of-sequence id that it does emit."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test_gsm8k's fixture writers, under --import-mode=importlib

import test_gsm8k as fx  # noqa: E402

from bench.registry import create_method  # noqa: E402
from tasks import gsm8k  # noqa: E402
from tasks._kit import lm  # noqa: E402
from tasks.base import RunContext, Subject  # noqa: E402

files, env, task = fx.files, fx.env, fx.task  # the module-scoped fixtures


def context(eval_batch_size: int | None = None) -> RunContext:
    ctx = fx.context()
    return RunContext(profile=ctx.profile, seed=0, progress=ctx.progress, batch_size=1, budget="smoke",
                      eval_batch_size=eval_batch_size)


@pytest.fixture(scope="module")
def free(task):
    """The reference's evaluation under lm-eval's own stop strings (none of which the random model writes)."""
    subject = task.subject_from_state(task.reference_weights(context()).state, context())
    task.evaluate(subject, context())
    return task.last_harness


def variant(task, until_extra: list[str] = (), eos_extra: list[int] = ()):
    """The task with stop strings added to lm-eval's `until` and the reference checkpoint declaring more
    end-of-sequence ids (as Qwen2.5-Instruct's generation_config lists two), and its reference subject."""
    t = copy.copy(task)
    t.config = copy.deepcopy(task.config)
    t.config["generation_kwargs"]["until"] = list(t.config["generation_kwargs"]["until"]) + list(until_extra)
    model = task.subject_from_state(task.reference_weights(context()).state, context()).model
    model.generation_config.eos_token_id = [task.tokenizer.eos_token_id, *eos_extra]
    return t, t.prepare(model, context())


def both_arms(t, reference: Subject):
    """lm-eval's results of the reference (HFLM's own generate) and of speculative decoding (the hook)."""
    ctx = context()
    applied = create_method("speculative").apply(reference, t, ctx)
    ev_ref = t.evaluate(reference, ctx)
    h_ref = t.last_harness
    ev_m = t.evaluate(applied.subject, ctx)
    return ev_ref, h_ref, ev_m, t.last_harness, applied


def test_the_rule_is_lm_evals_until_and_every_end_of_sequence_id(task):
    tok = task.tokenizer
    model = copy.deepcopy(task.subject_from_state(task.reference_weights(context()).state, context()).model)
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]  # a list, as Qwen2.5-Instruct's
    assert lm.checkpoint_eos_ids(model, tok) == (min(tok.eos_token_id, 7), max(tok.eos_token_id, 7))
    subject = task.prepare(model, context())
    rule = subject.extra["stop"]
    assert rule.strings == ("Question:", "</s>", "<|im_end|>", lm.EOS)  # lm-eval appends the decoded EOS
    assert set(rule.eos_ids) == {tok.eos_token_id, 7}
    assert set(subject.model.generation_config.eos_token_id) == {tok.eos_token_id, 7}  # greedy() keeps both
    assert subject.model.generation_config.do_sample is False


def test_stop_length_mirrors_lm_evals_criterion(task):
    """A string stops after the token that completes it (tested on lm-eval's window of len + 2 tokens); an
    end-of-sequence id stops with it; nothing stops: None."""
    tok = task.tokenizer
    rule = lm.StopRule.build(tok, ["Question:"], [tok.eos_token_id])
    ids = tok(" 12 apples.\n\nQuestion: how", add_special_tokens=False)["input_ids"]
    n = rule.stop_length(ids)
    assert tok.decode(ids[:n]).endswith("Question:") and "Question:" not in tok.decode(ids[:n - 1])
    assert rule.stop_length(ids[:3] + [tok.eos_token_id] + ids[3:]) == 4
    assert rule.stop_length(ids[:3]) is None and rule.cut(ids[:3]) == ids[:3]


def test_a_method_arm_is_cut_and_stops_where_lm_eval_stops_the_reference(task, free):
    """With a stop string the greedy text contains, lm-eval stops the reference's `generate` after it; the
    speculative arm, through its hook, stops at the same token: same responses, same generated ids, and the
    decoder emitted no token past the stop (it did not run on to the 256-token limit)."""
    tok = task.tokenizer
    first = free.generated[0]
    stop = next(s for s in (tok.decode(first[i:i + 2]) for i in range(8, len(first) - 2)) if s.strip())
    t, reference = variant(task, until_extra=[stop])
    ev_ref, h_ref, ev_m, h_m, applied = both_arms(t, reference)
    assert h_m.texts == h_ref.texts and h_m.generated == h_ref.generated
    assert t.fidelity(ev_ref, ev_m) == ("identical_responses", 1.0)
    assert len(h_ref.generated[0]) <= 10 < len(first)  # stopped where the string first appears
    assert all(stop not in x for x in h_ref.texts)  # lm-eval's cut
    assert applied.stats()["emitted_tokens"] == sum(map(len, h_m.generated))  # what it decoded is what it kept
    print(f"\ntokens generated for {len(free.generated)} documents: {sum(map(len, free.generated))} "
          f"without the stop string, {sum(map(len, h_m.generated))} with it (method arm)")


def test_every_end_of_sequence_id_stops_both_arms(task, free):
    """A second end-of-sequence id the checkpoint declares (Qwen2.5-Instruct's <|endoftext|> beside
    <|im_end|>) ends the reference's and the method's generation alike, the id included."""
    first = free.generated[0]
    i = next(i for i in range(4, len(first)) if first[i] not in first[:i])
    t, reference = variant(task, eos_extra=[first[i]])
    _, h_ref, _, h_m, _ = both_arms(t, reference)
    assert h_ref.generated[0] == first[:i + 1] == h_m.generated[0]
    assert h_m.texts == h_ref.texts


def test_the_workload_stops_by_the_rule_and_counts_what_it_kept(task, free):
    t, reference = variant(task, eos_extra=[free.generated[0][3]])
    fn, tokens, unit = t.workload(reference, context())
    assert tokens <= 4 and "stop strings" in unit


def test_the_reference_is_batched_by_lm_eval_and_a_method_runs_one_sequence(task, free):
    """HFLM generates the reference's responses at the evaluation batch (here 3: every smoke document in one
    left-padded batch): the same responses as at batch 1 (fp32 on the CPU). A method's hook gets one row."""
    ref = task.subject_from_state(task.reference_weights(context()).state, context())
    calls = []
    real = lm.generate_ids

    task.evaluate(ref, context(eval_batch_size=3))
    assert task.last_harness.texts == free.texts and task.last_harness.generated == free.generated

    def one_row(subject, input_ids, max_new_tokens, attention_mask=None):
        calls.append(input_ids.shape[0])
        return real(Subject(ref.model, "causal-lm", {k: v for k, v in ref.extra.items()}), input_ids,
                    max_new_tokens, attention_mask)

    hooked = Subject(ref.model, "causal-lm", {**ref.extra, "generate": one_row})
    task.evaluate(hooked, context(eval_batch_size=3))
    assert calls == [1] * gsm8k.SMOKE_EVAL_SIZE and task.last_harness.texts == free.texts
