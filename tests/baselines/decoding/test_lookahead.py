"""`lookahead`: the attention mask gives every branch token the context the paper defines, exact greedy output
(random tiny Llamas, arith prompts, EOS and length limits, several (W, N, G)), statistics, config validation,
and a whole smoke run on arith."""

from __future__ import annotations

import pytest
import torch

from baselines.decoding.jacobi import Counters
from baselines.decoding.lookahead import Lookahead, LookaheadConfig, _branches, _mask, lookahead_decode
from bench.config import ConfigError, apply_overrides
from tasks._kit import lm
from tasks.base import Subject

EOS, PAD = 1, 0
SETTINGS = [(1, 3, 1), (3, 3, 2), (4, 4, 4), (7, 4, 7), (5, 6, 3)]  # (W, N, G)


def tiny_llama(vocab: int = 64, seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


class Tok:
    def __init__(self, eos: int = EOS, pad: int = PAD):
        self.eos_token_id, self.pad_token_id = eos, pad


def greedy(model, prompt, max_new, eos):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=PAD)
    return out[0, prompt.shape[1]:].tolist()


def prompts(vocab: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (1, 3 + (5 * i) % 9), generator=g) for i in range(count)]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_branch_token_sees_exactly_its_chain(attn):
    """One pass over [prefix, branches] with the mask gives, at every branch token, the logits of a plain
    causal forward over the prefix followed by that token's chain (c, level-0 columns 1..i, its column's lower
    levels, itself; or c and its candidate's tokens up to itself)."""
    w, n, g = 3, 4, 2
    model = tiny_llama(seed=5, attn=attn)
    rel, allow = _branches(w, n, g)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, 64, (1, 6), generator=gen)
    branch = torch.randint(2, 64, (1, len(rel)), generator=gen)
    ids = torch.cat([prefix, branch], dim=1)
    pos = torch.tensor([list(range(6)) + [5 + r for r in rel]])
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pos, attention_mask=_mask(0, 6, allow, model.dtype, "cpu")).logits[0]
        for b in range(len(rel)):
            chain = [j for j in range(len(rel)) if allow[b, j]]
            assert chain[-1] == b and [rel[j] for j in chain] == list(range(1, rel[b] + 1))  # contiguous
            want = model(input_ids=torch.cat([prefix, branch[:, chain]], dim=1)).logits[0, -1]
            torch.testing.assert_close(got[6 + b], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wng", SETTINGS)
def test_reproduces_greedy_on_random_models(wng):
    w, n, g = wng
    model = tiny_llama(seed=w + n)
    c = Counters()
    for p in prompts(64, 6, seed=n):
        ref = greedy(model, p, 50, EOS)
        with torch.no_grad():
            assert lookahead_decode(model, p, 50, EOS, w, n, g, 0, c) == ref
    assert c.forward_passes >= c.tokens / n and c.tokens >= c.forward_passes
    assert c.tokens - c.forward_passes <= c.extra["candidate_tokens_accepted"]


def test_repetitive_output_is_accepted_several_tokens_at_a_time():
    """Random tiny models fall into loops; the pool then holds the loop's n-grams and passes commit more than
    one token on average (the counters are measured, not assumed)."""
    model = tiny_llama(vocab=16, seed=2)
    c = Counters()
    for p in prompts(16, 3, seed=2):
        with torch.no_grad():
            assert lookahead_decode(model, p, 80, 10_000, 5, 4, 5, 0, c) == greedy(model, p, 80, 10_000)
    assert c.tokens / c.forward_passes > 1.5 and c.extra["pool_size"] > 0


def test_stops_at_eos_and_at_max_new_tokens():
    model = tiny_llama(seed=3)
    for p in prompts(64, 4, seed=3):
        free = greedy(model, p, 30, eos=10_000)
        eos = free[12]  # a token the model does emit
        for w, n, g in SETTINGS[::2]:
            for max_new in (1, 4, 13, 30):
                ref = greedy(model, p, max_new, eos)
                c = Counters()
                with torch.no_grad():
                    got = lookahead_decode(model, p, max_new, eos, w, n, g, 0, c)
                assert got == ref and c.tokens == len(got) <= max_new and eos not in got[:-1]


def test_the_window_seed_changes_the_work_not_the_output():
    model = tiny_llama(seed=4)
    p = prompts(64, 1, seed=4)[0]
    runs = []
    for seed in (0, 1):
        c = Counters()
        with torch.no_grad():
            runs.append(lookahead_decode(model, p, 40, EOS, 4, 4, 4, seed, c))
    assert runs[0] == runs[1] == greedy(model, p, 40, EOS)


def test_hook_and_stats_through_the_task_interface():
    model = tiny_llama(seed=1)
    applied = Lookahead(LookaheadConfig(window=4, ngram=3, guesses=4)).apply(
        Subject(model, "causal-lm", {"tokenizer": Tok()}), None, None)
    ids = torch.tensor([[PAD, 5, 9, 3], [7, 8, 2, 4]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        out = lm.generate_ids(applied.subject, ids, 30, mask)
    rows = [greedy(model, ids[r:r + 1][:, mask[r].bool()], 30, EOS) for r in range(2)]
    width = max(len(r) for r in rows)
    for r, ref in enumerate(rows):
        assert out[r].tolist() == ids[r].tolist() + ref + [PAD] * (width - len(ref))
    s = applied.stats()
    assert s["tokens"] == sum(len(r) for r in rows) and s["calls"] == 2
    assert s["mean_accepted_length"] == s["tokens"] / s["forward_passes"] >= 1
    assert 0 <= s["acceptance_rate"] <= 1 and s["pool_size"] > 0
    assert {"forward_passes", "pool_size", "acceptance_rate", "candidates_per_pass"} <= set(s)


def test_arith_prompts_with_the_arith_tokenizer():
    from tasks.arith import Arith

    task = Arith()
    task.load()
    tok = task.tokenizer
    model = lm.build_lm(lm.LMArch(hidden=32, layers=2, heads=2, intermediate=64), tok, seed=1).eval()
    reference = Subject(model, "causal-lm", {"tokenizer": tok})
    for w, n, g in ((5, 3, 5), (7, 4, 7)):
        applied = Lookahead(LookaheadConfig(window=w, ngram=n, guesses=g)).apply(reference, task, None)
        for p in task.test[:4]:
            ids = tok(lm.prompt_of(p["question"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                assert torch.equal(lm.generate_ids(applied.subject, ids, 48), lm.generate_ids(reference, ids, 48))


@pytest.mark.parametrize("key,value,valid", [("window", "0", "1 <= window <= 64"), ("ngram", "2", "3 <= ngram <= 16"),
                                             ("guesses", "65", "1 <= guesses <= 64")])
def test_config_errors_list_the_valid_range(key, value, valid):
    with pytest.raises(ConfigError, match=f"{key}.*valid: integers {valid}"):
        apply_overrides(LookaheadConfig(), {key: value}, owner="method 'lookahead'")


def test_an_attention_that_ignores_4d_masks_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        Lookahead().apply(Subject(model, "causal-lm", {"tokenizer": Tok()}), None, None)


@pytest.mark.slow
def test_smoke_run_on_arith(tmp_path):
    from bench.runner import run

    r = run("arith", "lookahead", budget="smoke", results_root=tmp_path).result
    assert r.status == "ok"
    s = r.method_stats
    assert s["forward_passes"] > 0 and s["mean_accepted_length"] >= 1 and 0 <= s["acceptance_rate"] <= 1
    assert s["mean_accepted_length"] == pytest.approx(s["tokens"] / s["forward_passes"])
    assert r.fidelity.value == 1.0
