"""`speculative`: greedy output equals the target's, sampled output follows the target's distribution (even with
a bad draft), the KV caches are rolled back to the accepted prefix, and the method runs end to end on arith."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from baselines.decoding.speculative import (SpeculativeConfig, SpeculativeDecoder, accept_drafts, accept_greedy,
                                            processed_probs, residual_distribution)
from bench.config import ConfigError
from bench.registry import create_method
from decoding_models import DraftTask, greedy, tiny_llama
from tasks._kit import lm
from tasks.base import Subject

P_MIN = 1e-3  # chi-square p-value below which the empirical distribution is declared different (fixed seeds)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit, cells with an expected count under 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


# ---- greedy: the target's own output ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["noisy-copy", "unrelated"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_reproduces_the_target_token_for_token(target, drafts, prompts, tokenizer, ctx, which, k):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    method = create_method("speculative", {"num_draft_tokens": str(k)})
    applied = method.apply(Subject(target, "causal-lm", {"tokenizer": tokenizer}), DraftTask(drafts[which]), ctx)
    gen = applied.subject.extra["generate"]
    emitted = 0
    for ids in prompts:
        with torch.inference_mode():
            out = gen(applied.subject, ids, 40, torch.ones_like(ids))
        assert torch.equal(out[0, :ids.shape[1]], ids[0])  # the prompt is part of the output, as in generate()
        assert out[0, ids.shape[1]:].tolist() == greedy(target, ids, 40, eos, pad)
        emitted += out.shape[1] - ids.shape[1]
    s = applied.stats()
    assert 0 <= s["acceptance_rate"] < 1, s  # drafts were rejected, so the rollback path ran
    assert s["drafted_tokens"] > 0 and s["target_forward_passes"] <= emitted
    assert s["mean_accepted_length"] == pytest.approx(emitted / s["target_forward_passes"])
    if which == "noisy-copy":
        assert s["acceptance_rate"] > 0.2, s  # and some were accepted: fewer target passes than tokens
        assert s["target_forward_passes"] < emitted


def test_left_padding_is_stripped_and_batches_are_refused(target, drafts, prompts, tokenizer, ctx):
    applied = create_method("speculative").apply(Subject(target, "causal-lm", {"tokenizer": tokenizer}),
                                                 DraftTask(drafts["noisy-copy"]), ctx)
    gen, ids = applied.subject.extra["generate"], prompts[0]
    padded = torch.cat([torch.full((1, 3), tokenizer.pad_token_id), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.inference_mode():
        out = gen(applied.subject, padded, 20, mask)
    assert out[0, padded.shape[1]:].tolist() == greedy(target, ids, 20, tokenizer.eos_token_id,
                                                       tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="batch 1"):
        gen(applied.subject, torch.cat([ids, ids]), 5, None)


def test_stops_at_eos_and_at_the_length_limit(target, drafts, prompts, tokenizer):
    ids = prompts[1]
    ref = greedy(target, ids, 30, tokenizer.eos_token_id, tokenizer.pad_token_id)
    eos = ref[6]  # pretend a token the target emits is the end of text
    dec = SpeculativeDecoder(target, drafts["noisy-copy"], SpeculativeConfig(num_draft_tokens=4), eos)
    with torch.inference_mode():
        out = dec.generate(ids[0], 30)
        assert out == ref[:ref.index(eos) + 1]
        for n in (1, 2, 5):
            assert dec.generate(ids[0], n) == ref[:n]


def test_greedy_rule_is_the_sampling_rule_with_one_hot_distributions():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        g = 1 + trial % 5
        logits = torch.randn(g + 1, 7, generator=gen)
        drafts = torch.where(torch.rand(g, generator=gen) < 0.7, logits[:g].argmax(-1),
                             torch.randint(0, 7, (g,), generator=gen))
        p = torch.nn.functional.one_hot(logits.argmax(-1), 7).float()
        q = torch.nn.functional.one_hot(drafts, 7).float()
        assert accept_drafts(p, q, drafts, gen) == accept_greedy(logits, drafts)


# ---- the KV caches are rolled back ---------------------------------------------------------------------------

def test_caches_hold_exactly_the_accepted_prefix(target, drafts, prompts):
    """After every iteration the target's cache holds the KV of all tokens but the last (the next pass feeds
    it), the draft's a prefix of them, and both equal a fresh forward pass over that prefix."""
    from transformers import DynamicCache

    def fresh_keys(model, tokens):
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([tokens]), **lm.cache_kwargs(model, cache), use_cache=True)
        return [layer.keys for layer in cache.layers]

    checked = []

    def check(seq, tc, dc):
        assert tc.get_seq_length() == len(seq) - 1
        assert dc.get_seq_length() <= len(seq) - 1
        for model, cache in ((target, tc), (draft, dc)):
            want = fresh_keys(model, seq[:cache.get_seq_length()])
            for layer, w in zip(cache.layers, want):
                torch.testing.assert_close(layer.keys, w, atol=1e-5, rtol=1e-4)
        checked.append(len(seq))

    draft = drafts["noisy-copy"]
    dec = SpeculativeDecoder(target, draft, SpeculativeConfig(num_draft_tokens=3), eos_id=None)
    with torch.inference_mode():
        dec.generate(prompts[2][0], 24, on_iteration=check)
    s = dec.stats
    assert checked and s.accepted_tokens < s.drafted_tokens  # there were rejections to roll back
    assert s.accepted_tokens > 0


# ---- sampling: the target's distribution ---------------------------------------------------------------------

def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.6, 0.2, 0.1])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    q2 = torch.tensor([0.25, 0.25, 0.25, 0.25])
    torch.testing.assert_close(residual_distribution(p, q2), torch.tensor([0.25, 0.05, 0.0, 0.0]) / 0.3)
    torch.testing.assert_close(residual_distribution(p, p), p)  # no residual mass: p itself, never 0/0
    batch = residual_distribution(torch.stack([p, p]), torch.stack([q, q2]))
    torch.testing.assert_close(batch.sum(-1), torch.ones(2))


def test_processed_probs_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    torch.testing.assert_close(processed_probs(logits, 1.0), torch.softmax(logits, -1))
    torch.testing.assert_close(processed_probs(logits, 0.5), torch.softmax(logits * 2, -1))
    top2 = processed_probs(logits, 1.0, top_k=2)
    assert top2[2:].sum() == 0 and top2[:2].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("draft_kind", ["bad", "close", "equal"])
def test_rejection_rule_emits_the_target_distribution(draft_kind):
    """Context-free p_1, p_2, p_3 and q_1, q_2: the first emitted token follows p_1 and, when a second is
    emitted (the first draft was accepted), it follows p_2 -- whatever q is, including a q that puts most of its
    mass on a token p finds unlikely. The same counts fail the test against q, so the test has power."""
    v, gamma, n = 6, 2, 30000
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 1.5, -1.0, 0.5, 2.0, -0.5],
                                    [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]), -1)
    q = {"bad": torch.tensor([[0.02, 0.02, 0.02, 0.02, 0.02, 0.9]] * gamma),
         "close": 0.8 * p[:gamma] + 0.2 / v, "equal": p[:gamma].clone()}[draft_kind]
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(gamma)], 1)
    first, second = np.zeros(v), np.zeros(v)
    for row in drafts:
        k, y = accept_drafts(p, q, row, gen)
        out = row[:k].tolist() + [y]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chi2_pvalue(first, p[0].numpy()) > P_MIN
    assert chi2_pvalue(second, p[1].numpy()) > P_MIN
    if draft_kind == "bad":
        assert chi2_pvalue(first, q[0].numpy()) < 1e-12


def _bad_draft(vocab: int, token: int):
    """A draft that puts ~90% of its mass on `token` whatever the context (its LM head is a bias)."""
    draft = tiny_llama(vocab, hidden=16, layers=1, heads=1, seed=5)
    head = torch.nn.Linear(16, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = math.log(0.9 * (vocab - 1) / 0.1)
    draft.lm_head = head
    return draft


@pytest.mark.parametrize("temperature,top_k,draft_kind,draws", [
    (1.0, 0, "bad", 1500),
    pytest.param(0.7, 5, "random", 3000, marks=pytest.mark.slow),
])
def test_sampled_continuations_follow_the_target(temperature, top_k, draft_kind, draws):
    """The whole loop (drafting, verification, rejection, rollback, bonus token) on tiny Llamas with an 8-token
    vocabulary: the joint distribution of the first two generated tokens matches the target's processed p."""
    v = 8
    target = tiny_llama(v, hidden=16, layers=1, heads=1, seed=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(6)  # peaked, context-dependent next-token distributions
    prompt = torch.tensor([2, 3, 4, 5, 6])
    with torch.inference_mode():
        p1 = processed_probs(target(prompt[None]).logits[0, -1], temperature, top_k)
        joint = torch.stack([p1[a] * processed_probs(target(torch.cat([prompt, torch.tensor([a])])[None])
                                                     .logits[0, -1], temperature, top_k) for a in range(v)])
    draft = _bad_draft(v, int(p1.argmin())) if draft_kind == "bad" else tiny_llama(v, 16, 1, 1, seed=9)
    dec = SpeculativeDecoder(target, draft, SpeculativeConfig(num_draft_tokens=2, temperature=temperature,
                                                              top_k=top_k), eos_id=None,
                             generator=torch.Generator().manual_seed(0))
    counts = np.zeros(v * v)
    with torch.inference_mode():
        for _ in range(draws):
            a, b = dec.generate(prompt, 3)[:2]
            counts[a * v + b] += 1
    assert chi2_pvalue(counts, joint.flatten().double().numpy()) > P_MIN
    assert 0 < dec.stats.accepted_tokens < dec.stats.drafted_tokens  # both acceptances and rejections happened


def test_sampling_is_repeatable_for_a_seed(target, drafts, prompts):
    def sample(seed):
        dec = SpeculativeDecoder(target, drafts["noisy-copy"], SpeculativeConfig(temperature=1.0), None,
                                 torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            return dec.generate(prompts[0][0], 15)

    assert sample(3) == sample(3) != sample(4)


# ---- configuration and contracts ---------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("num_draft_tokens", "0"), ("num_draft_tokens", "-2"),
                                       ("temperature", "-0.1"), ("top_k", "-1")])
def test_invalid_config_is_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        create_method("speculative", {key: value})


def test_a_task_without_a_draft_is_refused_with_the_tasks_that_have_one(target, tokenizer, ctx):
    class NoDraft:
        spec = type("Spec", (), {"name": "digits"})()

    subject = Subject(target, "causal-lm", {"tokenizer": tokenizer})
    with pytest.raises(ValueError, match="arith"):
        create_method("speculative").apply(subject, NoDraft(), ctx)


@pytest.mark.slow
def test_end_to_end_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "speculative", budget="smoke", results_root=results_root).result
    assert r.status == "ok"
    assert r.fidelity.value == 1.0  # greedy: the reference's answers, token for token
    s = r.method_stats
    assert 0 <= s["acceptance_rate"] <= 1 and s["mean_accepted_length"] >= 1 and s["target_forward_passes"] > 0


# ---- one stopping rule, one device read per verification pass (issue 26, points 3 and 7) ----------------------

def _stop_rule_at(tokenizer, tokens: list[int], at: int, eos_ids=()):
    """A StopRule whose stop string is the decoded text of tokens[at - 2:at] (which the greedy target emits)."""
    from tasks._kit.lm import StopRule

    return StopRule.build(tokenizer, [tokenizer.decode(tokens[at - 2:at])], eos_ids)


def test_a_stop_string_ends_the_generation_where_lm_evals_criteria_end_the_references(target, drafts, prompts,
                                                                                       tokenizer):
    """The reference's `generate` with lm-eval's own stop criteria and the speculative loop given the task's
    StopRule stop after the same token: the decoder does not run on to the length limit."""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    ids = prompts[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    free = greedy(target, ids, 40, eos, pad)
    assert len(free) == 40 and eos not in free  # the random target runs to the limit without a stop
    rule = _stop_rule_at(tokenizer, free, 12)
    with torch.inference_mode():
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                              eos_token_id=eos, pad_token_id=pad,
                              stopping_criteria=stop_sequences_criteria(tokenizer, list(rule.strings),
                                                                        ids.shape[1], 1))[0, ids.shape[1]:].tolist()
        dec = SpeculativeDecoder(target, drafts["noisy-copy"], SpeculativeConfig(num_draft_tokens=4), eos)
        out = dec.generate(ids[0], 40, stop=rule)
    assert len(ref) < 40 and out == ref == free[:len(ref)] == rule.cut(free)
    assert dec.stats.emitted_tokens == len(out)  # it stopped: what it emitted is what it kept
    assert dec.stats.target_forward_passes <= len(out)


@pytest.mark.parametrize("which", ["first", "second"])
def test_every_end_of_sequence_id_stops_the_decoder(target, drafts, prompts, tokenizer, which):
    """A checkpoint may declare several end-of-sequence ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>):
    each ends the generation, included, whichever comes first."""
    ids = prompts[1]
    ref = greedy(target, ids, 30, tokenizer.eos_token_id, tokenizer.pad_token_id)
    a, b = ref[5], ref[9]
    assert a not in ref[:5] and b not in ref[:9]
    eos_ids = [tokenizer.eos_token_id, a, b] if which == "first" else [b, tokenizer.eos_token_id]
    dec = SpeculativeDecoder(target, drafts["noisy-copy"], SpeculativeConfig(num_draft_tokens=3), eos_ids)
    with torch.inference_mode():
        out = dec.generate(ids[0], 30)
    assert out == ref[:6 if which == "first" else 10]


def test_greedy_drafts_past_a_draft_eos_are_cut_as_before(target, prompts, tokenizer):
    """The greedy draft no longer stops at its own EOS (that read synced the device per draft token); the
    drafts are cut there afterwards, so what is verified, accepted and emitted is what it was: the target's
    output, and the same drafted and accepted counts as a draft loop that stops at the EOS."""
    ids = prompts[2]
    ref = greedy(target, ids, 30, tokenizer.eos_token_id, tokenizer.pad_token_id)
    eos = ref[7]  # the target (and so the self-draft) emits it at position 7: a draft EOS inside a block
    dec = SpeculativeDecoder(target, target, SpeculativeConfig(num_draft_tokens=4), eos)
    with torch.inference_mode():
        out = dec.generate(ids[0], 30)
    s = dec.stats
    assert out == ref[:ref.index(eos) + 1]
    assert s.accepted_tokens == s.drafted_tokens  # the self-draft is always right, and nothing past EOS counts
    assert s.emitted_tokens == len(out) and s.draft_forward_passes >= s.drafted_tokens


def test_the_method_reads_the_tasks_stop_rule(target, drafts, prompts, tokenizer, ctx):
    """Through the generate hook (what lm-eval and the timed workload call), the subject's StopRule stops the
    speculative loop itself, and `generate_ids` returns the reference's cut answer."""
    from decoding_models import DraftTask

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = prompts[3]
    free = greedy(target, ids, 40, eos, pad)
    rule = _stop_rule_at(tokenizer, free, 15)
    reference = Subject(target, "causal-lm", {"tokenizer": tokenizer, "stop": rule})
    applied = create_method("speculative").apply(reference, DraftTask(drafts["noisy-copy"]), ctx)
    with torch.inference_mode():
        ref = lm.generate_ids(reference, ids, 40)
        out = lm.generate_ids(applied.subject, ids, 40)
    assert torch.equal(out, ref) and ref.shape[1] - ids.shape[1] == len(rule.cut(free)) < 40
    assert applied.stats()["emitted_tokens"] == len(rule.cut(free))


@pytest.mark.gpu
def test_greedy_decoding_reads_the_device_once_per_verification_pass(tokenizer):
    """On CUDA, count the synchronising calls of the decoding loop (torch.cuda.set_sync_debug_mode warns on
    each; those inside the models' forward passes, transformers' own, are counted apart): one read per
    verification pass and one per call, whatever the number of drafts (before: one per draft token, and more)."""
    import warnings

    target = tiny_llama(len(tokenizer), eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id).cuda()
    draft = tiny_llama(len(tokenizer), hidden=16, layers=1, heads=1, seed=7).cuda()
    prompt = torch.tensor(tokenizer("Question: 12+7\nAnswer:", add_special_tokens=False)["input_ids"], device="cuda")
    caught: list = []
    inside = [0]
    marks: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda *a: marks.append(len(caught))) for m in (target, draft)]
    hooks += [m.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] + len(caught) - marks.pop()))
              for m in (target, draft)]
    try:
        for k in (2, 6):
            dec = SpeculativeDecoder(target, draft, SpeculativeConfig(num_draft_tokens=k), None)
            with torch.inference_mode():
                dec.generate(prompt, 4)  # warm-up (lazy initialisation syncs)
                dec.stats = type(dec.stats)()
                torch.cuda.synchronize()
                caught.clear()
                inside[0] = 0
                with warnings.catch_warnings(record=True) as caught_here:
                    warnings.simplefilter("always")
                    caught = caught_here
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        dec.generate(prompt, 48)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
            syncs = len(caught) - inside[0]  # every warning while sync debugging is on is a sync report
            passes = dec.stats.target_forward_passes
            assert passes > 0 and syncs <= passes + 1, (k, syncs, passes)
    finally:
        for h in hooks:
            h.remove()
