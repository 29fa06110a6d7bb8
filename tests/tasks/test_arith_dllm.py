"""arith-dllm and its kit (`tasks._kit.dllm`): the bidirectional mask, LLaDA's loss against its definition on a
hand-made batch, the sampler against a direct argmax-confidence loop, blocks and the threshold rule, and the task
end to end at smoke budget."""

from __future__ import annotations

import math

import pytest
import torch

from tasks._kit import dllm

MASK = 19


def tiny_model(vocab: int = 20, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def test_the_mask_predictor_sees_both_ways_and_ignores_padding():
    model = tiny_model()
    x = torch.randint(0, MASK, (1, 6))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % MASK
    with torch.no_grad():
        assert not torch.allclose(dllm.logits(model, x)[0, 0], dllm.logits(model, y)[0, 0])  # a later token counts
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
        torch.testing.assert_close(dllm.logits(model, padded, mask)[:, 3:], dllm.logits(model, x))


def test_the_logit_shift_reads_token_i_at_position_i_minus_1():
    model = tiny_model()
    x = torch.randint(0, MASK, (2, 7))
    with torch.no_grad():
        plain, shifted = dllm.logits(model, x), dllm.logits(model, x, shift=1)
    torch.testing.assert_close(shifted[:, 1:], plain[:, :-1])
    with pytest.raises(ValueError, match="must be 0 .* or 1"):
        dllm.shifted(plain, 2)


def test_the_loss_equals_its_definition_on_a_hand_made_batch():
    """-(1 / (t L')) sum over masked response tokens of log p(token), averaged over rows, by hand."""
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    masked = torch.tensor([[False, False, True, False, True], [False, True, True, True, False]])
    t = torch.tensor([0.3, 0.8])
    lengths = torch.tensor([3, 4])  # response lengths L'
    p = t[:, None].expand(2, 5)
    expected = 0.0
    for r in range(2):
        logp = logits[r].log_softmax(-1)
        s = sum(-logp[i, targets[r, i]].item() for i in range(5) if masked[r, i])
        expected += s / (t[r].item() * lengths[r].item()) / 2
    assert dllm.masked_loss(logits, targets, masked, p, lengths).item() == pytest.approx(expected, rel=1e-6)


def test_the_forward_process_masks_only_the_response_at_rate_t():
    ids = torch.arange(4000).remainder(MASK).view(2, 2000)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 500:] = True
    noised, masked, p = dllm.forward_process(ids, maskable, torch.tensor([0.25, 0.75]), MASK,
                                             torch.Generator().manual_seed(0), eps=0.0)
    assert not masked[:, :500].any() and torch.equal(noised[:, :500], ids[:, :500])
    assert (noised[masked] == MASK).all() and torch.equal(noised[~masked], ids[~masked])
    rates = masked[:, 500:].float().mean(-1)
    assert rates[0].item() == pytest.approx(0.25, abs=0.04) and rates[1].item() == pytest.approx(0.75, abs=0.04)
    assert p[0, 0].item() == pytest.approx(0.25)


def test_transfer_counts_split_evenly_with_the_remainder_first():
    assert dllm.transfer_counts(10, 4) == [3, 3, 2, 2]
    assert dllm.transfer_counts(8, 8) == [1] * 8
    assert sum(dllm.transfer_counts(37, 5)) == 37


def direct_loop(model, prompt, length):
    """One token per step, one block: unmask the masked position whose argmax has the highest probability."""
    x = torch.cat([prompt, torch.full((1, length), MASK)], 1)
    for _ in range(length):
        with torch.no_grad():
            out = model(input_ids=x, attention_mask=dllm.bidirectional_mask(torch.ones_like(x), torch.float32)).logits
        out[..., MASK] = -math.inf
        probs = out.softmax(-1)[0]
        best, pos, tok = -1.0, None, None
        for i in range(prompt.shape[1], x.shape[1]):
            if x[0, i] == MASK:
                c, v = probs[i].max(-1)
                if c.item() > best:
                    best, pos, tok = c.item(), i, v.item()
        x[0, pos] = tok
    return x


def test_one_token_per_step_equals_a_direct_argmax_confidence_loop():
    model = tiny_model()
    prompt = torch.randint(0, MASK, (1, 5))
    out = dllm.sample(model, prompt, torch.ones_like(prompt), dllm.Sampling(gen_length=8, steps=8, block_length=8),
                      MASK)
    assert torch.equal(out, direct_loop(model, prompt, 8))
    assert not (out == MASK).any()


def test_blocks_are_decoded_left_to_right_and_steps_are_counted():
    model = tiny_model(seed=1)
    prompt = torch.randint(0, MASK, (1, 4))
    seen = []
    out = dllm.sample(model, prompt, torch.ones_like(prompt), dllm.Sampling(gen_length=8, steps=4, block_length=4),
                      MASK, observe=lambda s: seen.append((s["block"], s["unmasked"],
                                                           int(s["masked"][:, 8:].sum()))))
    assert [b for b, _, _ in seen] == [0, 0, 1, 1]
    assert [u for _, u, _ in seen] == [2, 2, 2, 2]  # 4 positions per block over 2 steps
    assert all(later == 4 for b, _, later in seen if b == 0)  # the second block stays masked during the first
    assert not (out == MASK).any()


def test_the_threshold_unmasks_every_confident_position_and_at_least_one():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, MASK, (1, 4))
    seen = []
    dllm.sample(model, prompt, torch.ones_like(prompt), dllm.Sampling(gen_length=8, steps=8, block_length=8,
                                                                      threshold=1e-9), MASK,
                observe=lambda s: seen.append(s["unmasked"]))
    assert seen == [8]  # every position clears a threshold of ~0: one step
    seen.clear()
    dllm.sample(model, prompt, torch.ones_like(prompt), dllm.Sampling(gen_length=8, steps=8, block_length=8,
                                                                      threshold=1.0), MASK,
                observe=lambda s: seen.append(s["unmasked"]))
    assert seen == [1] * 8  # none does at 1: one per step, the plain sampler


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=10, steps=10, block_length=4), "multiple of block_length"),
    (dict(gen_length=8, steps=3, block_length=4), "multiple of the 2 blocks"),
    (dict(gen_length=8, steps=16, block_length=8), "exceeds gen_length"),
    (dict(gen_length=8, steps=8, block_length=8, threshold=1.5), "threshold"),
])
def test_bad_sampling_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dllm.Sampling(**kwargs).validate()


# ---- the task --------------------------------------------------------------------------------------------------

def test_word_problems_are_padded_with_end_of_text_and_drills_left_alone():
    from tasks._kit import lm
    from tasks.arith import Arith
    from tasks.arith_dllm import GEN_LENGTH, ArithDLLM, pad_answers

    arith = Arith()
    arith.load()
    tok = arith.tokenizer
    eos = tok.eos_token_id
    rows = arith.train[:20]
    problems = lm.encode_examples(tok, [lm.prompt_of(r["question"]) for r in rows], [r["answer"] for r in rows])
    drill = ([5, 6, 7], [-100, 6, 7])
    padded = pad_answers(problems + [drill], eos)
    assert padded[-1] == drill
    for (ids, labels), (ids0, _) in zip(padded, problems):
        response = [x for x in labels if x != -100]
        assert len(response) == GEN_LENGTH and response[-1] == eos and ids[:len(ids0)] == ids0
        assert ids[-len(response):] == response and len(ids) == len(labels)
    task = ArithDLLM()
    task.load()
    assert task.mask_id == len(tok) and task.build_reference().config.vocab_size == task.mask_id + 1


def test_none_runs_on_arith_dllm(results_root):
    """bench run's path at smoke budget: reference trained for the smoke steps (arith-dllm has no published
    reference yet when the cache is empty), evaluated through lm-eval by the dLLM sampler, and timed."""
    from bench.runner import run
    from bench.store import load_result
    from tasks.arith_dllm import SMOKE_EVAL_SIZE

    out = run("arith-dllm", "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.modality == "diffusion-lm"
    assert r.quality.metric == "exact_match" and r.quality.n == SMOKE_EVAL_SIZE
    assert r.quality.delta == 0 and r.fidelity.value == 1.0
    assert r.speed.items_per_call > 0 and "steps" in r.speed.unit
