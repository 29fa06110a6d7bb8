"""bench.divergence: a lossless decoder's differing answers told apart into rounding flips at near ties and
choices beyond rounding, on a tiny random Llama whose greedy answers are known."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bench.divergence import CRITERION, analyse, first_difference
from bench.result import Divergence

VOCAB, EOS, PAD = 40, 0, 1


def tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def greedy_with_logits(model, context: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([context]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=PAD, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(context):].tolist(), [z[0] for z in out.logits]


def padded(rows: list[list[int]], width: int = 12) -> np.ndarray:
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


CONTEXTS = [[5, 9, 12, 7], [3, 3, 20, 31, 8], [17, 2, 2]]


@pytest.mark.parametrize("a,b,t", [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 4, 3], 1), ([1, 2], [1, 2, 3], 2),
                                   ([], [4], 0)])
def test_first_difference(a, b, t):
    assert first_difference(a, b) == t


def test_identical_answers_have_nothing_to_analyse():
    model = tiny()
    ref = padded([greedy_with_logits(model, c, 8)[0] for c in CONTEXTS])
    d = analyse(model, CONTEXTS, ref, ref.copy())
    assert d == {"differing": 0, "analysed": 0, "numeric": 0, "beyond_rounding": 0, "unexplained": 0,
                 "criterion": CRITERION}
    Divergence(**d)


def test_a_token_the_reference_did_not_prefer_is_beyond_rounding_in_float32():
    """A method that swaps the reference's token for its least likely one (a wide margin) made a choice."""
    model = tiny()
    rows, met = [], []
    for c in CONTEXTS:
        ids, logits = greedy_with_logits(model, c, 8)
        rows.append(ids)
        worst = int(logits[3].argmin())
        met.append(ids[:3] + [worst] + ids[4:])
    d = analyse(model, CONTEXTS, padded(rows), padded(met))
    assert d["differing"] == d["analysed"] == 3 and d["beyond_rounding"] == 3 and d["numeric"] == 0


def test_an_exact_tie_is_a_numeric_flip():
    """Two tokens with identical output rows tie exactly at every position: taking the other one is rounding's
    business (margin 0), whatever the batch shape does."""
    model = copy.deepcopy(tiny())
    ids, _ = greedy_with_logits(model, CONTEXTS[0], 6)
    a = ids[2]
    b = (a + 1) % VOCAB if (a + 1) % VOCAB not in (EOS, PAD) else (a + 3) % VOCAB
    with torch.no_grad():
        model.lm_head.weight[b] = model.lm_head.weight[a]
    ids, _ = greedy_with_logits(model, CONTEXTS[0], 6)  # argmax takes the lower id of a tie
    t = next(i for i, x in enumerate(ids) if x in (a, b))
    other = b if ids[t] == a else a
    met = ids[:t] + [other] + ids[t + 1:]
    d = analyse(model, CONTEXTS[:1], padded([ids]), padded([met]))
    assert d["numeric"] == 1 and d["beyond_rounding"] == 0


def test_an_answer_that_runs_on_is_unexplained_and_the_limit_caps_the_work():
    model = tiny()
    rows = [greedy_with_logits(model, c, 8)[0] for c in CONTEXTS]
    met = [r + [r[-1]] for r in rows]  # each continues one token past the reference's end
    d = analyse(model, CONTEXTS, padded(rows), padded(met), limit=2)
    assert d["differing"] == 3 and d["analysed"] == 2 and d["unexplained"] == 2


def test_counts_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="do not add up"):
        Divergence(differing=3, analysed=3, numeric=1, beyond_rounding=1, unexplained=0, criterion=CRITERION)
    with pytest.raises(ValueError, match="do not add up"):
        Divergence(differing=1, analysed=2, numeric=2, beyond_rounding=0, unexplained=0, criterion=CRITERION)


def test_the_runner_records_why_a_lossless_decoder_differs(tmp_path, monkeypatch):
    """End to end on arith (smoke): a decoding 'method' on the reference's own weights that replaces one token
    of every answer by an unlikely one gets a record whose divergence counts those answers beyond rounding."""
    from bench import registry
    from bench.runner import run
    from bench.store import load_result

    from baselines.base import Applied, Cost, Method
    from tasks._kit.lm import generate_ids
    from tasks.base import Subject

    class Corrupting(Method):
        def apply(self, subject, task, ctx):
            def generate(subj, input_ids, max_new_tokens, attention_mask=None):
                out = generate_ids(subject, input_ids, max_new_tokens).clone()
                n = input_ids.shape[1]
                if out.shape[1] > n + 2:
                    out[:, n + 2] = (out[:, n + 2] + 7) % subject.model.config.vocab_size
                return out

            return Applied(Subject(subject.model, subject.kind, {**subject.extra, "generate": generate}),
                           Cost(description="none"))

    registry.METHODS.discover()
    monkeypatch.setattr(registry.METHODS, "_entries", dict(registry.METHODS._entries))  # undone after the test
    registry.register_method("corrupting-decoder", family="decoding", year=2026, url="https://example.org",
                             paper="a test double", modalities=("causal-lm",),
                             summary="greedy with one token of each answer replaced")(Corrupting)
    r = load_result(run("arith", "corrupting-decoder", budget="smoke", results_root=tmp_path).path, tmp_path)
    d = r.fidelity.divergence
    assert r.fidelity.value < 1 and d is not None
    assert d.differing > 0 and d.beyond_rounding >= 1 and d.numeric + d.beyond_rounding + d.unexplained == d.analysed


def test_every_batch_shape_computes_the_same_logits_up_to_rounding():
    """The shapes the noise is measured over are the same position recomputed: one parallel pass, and blocks of
    1..min(BLOCKS, t) tokens after a prefilled cache, all equal to token-by-token decoding up to float32 rounding
    (a shape that fed the wrong tokens or positions would differ by O(1))."""
    from bench.divergence import BLOCKS, _logits_in_shapes

    model = tiny()
    context = CONTEXTS[0]
    prefix, logits = greedy_with_logits(model, context, 12)
    for t in (0, 3, 10):
        seq, others = _logits_in_shapes(model, context, prefix[:t])
        assert len(others) == 1 + min(BLOCKS, t)
        assert np.allclose(seq, logits[t].numpy(), atol=1e-4)
        for z in others:
            assert np.allclose(z, seq, atol=1e-4) and not np.array_equal(z, logits[t + 1].numpy())


def test_details_name_each_flip():
    model = tiny()
    ref_rows = [greedy_with_logits(model, c, 8)[0] for c in CONTEXTS]
    met_rows = [list(r) for r in ref_rows]
    met_rows[1][4] = (met_rows[1][4] + 1) % VOCAB
    d = analyse(model, CONTEXTS, padded(ref_rows), padded(met_rows), details=True)
    assert [(f["answer"], f["position"]) for f in d["flips"]] == [(1, 4)]
    assert d["flips"][0]["gap"] > 0 and d["flips"][0]["kind"] in ("numeric", "beyond_rounding")
