"""`jacobi`: exact greedy output (random tiny Llamas, arith prompts, EOS and length limits), its statistics,
config validation, and a whole smoke run on arith."""

from __future__ import annotations

import pytest
import torch

from baselines.decoding.jacobi import Counters, Jacobi, JacobiConfig, jacobi_decode
from bench.config import ConfigError, apply_overrides
from tasks._kit import lm
from tasks.base import Subject

EOS, PAD = 1, 0


def tiny_llama(vocab: int = 64, seed: int = 0, eos: int = EOS, pad: int = PAD):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=eos, pad_token_id=pad)
    return LlamaForCausalLM(cfg).eval()


class Tok:
    """The two ids the decoding hook reads from a tokenizer."""

    def __init__(self, eos: int = EOS, pad: int = PAD):
        self.eos_token_id, self.pad_token_id = eos, pad


def greedy(model, prompt, max_new, eos):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=PAD)
    return out[0, prompt.shape[1]:].tolist()


def prompts(vocab: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (1, 3 + (7 * i) % 11), generator=g) for i in range(count)]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_reproduces_greedy_on_random_models(block_size, seed):
    model = tiny_llama(seed=seed)
    c = Counters()
    for p in prompts(64, 6, seed):
        ref = greedy(model, p, 40, EOS)
        with torch.no_grad():
            assert jacobi_decode(model, p, 40, EOS, block_size, PAD, c) == ref
    assert c.tokens >= c.forward_passes >= c.tokens / block_size
    if block_size == 1:
        assert c.tokens == c.forward_passes


def test_stops_at_eos_and_at_max_new_tokens():
    model = tiny_llama(seed=3)
    for p in prompts(64, 4, seed=3):
        free = greedy(model, p, 30, eos=10_000)  # an id that never occurs: no EOS
        eos = free[12]  # a token the model does emit: generation must stop at its first occurrence
        for n in (1, 4, 7):
            for max_new in (1, 5, 13, 30):
                ref = greedy(model, p, max_new, eos)
                c = Counters()
                with torch.no_grad():
                    got = jacobi_decode(model, p, max_new, eos, n, PAD, c)
                assert got == ref and len(got) <= max_new and c.tokens == len(got)
                assert eos not in got[:-1]


def test_on_pass_sees_every_pass_and_what_it_commits():
    """The hook `cllm` counts from: one call per pass, with the tokens committed before it, the pass's updates
    and the k it commits; the committed updates are the output."""
    model = tiny_llama(seed=2)
    for p in prompts(64, 3, seed=2):
        trace, c = [], Counters()
        with torch.no_grad():
            out = jacobi_decode(model, p, 30, EOS, 5, PAD, c, on_pass=lambda s, pred, k: trace.append((s, pred, k)))
        assert out == greedy(model, p, 30, EOS) and len(trace) == c.forward_passes
        assert trace[0][0] == 0 and all(b == a + k for (a, _, k), (b, _, _) in zip(trace, trace[1:]))
        assert sum((pred[:k] for _, pred, k in trace), [])[:len(out)] == out
        assert all(1 <= k <= len(pred) <= 5 for _, pred, k in trace)


def test_a_model_that_is_its_own_fixed_point_commits_whole_blocks():
    """Logits all zero: greedy is token 0 (argmax's first index) forever, the pad guess is already right, so
    every pass commits the whole block (the last one only what the budget leaves)."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    c = Counters()
    with torch.no_grad():
        out = jacobi_decode(model, torch.tensor([[5, 6, 7]]), 20, EOS, 8, PAD, c)
    assert out == [0] * 20 and c.forward_passes == 3 and c.tokens == 20  # 8 + 8 + 4


class PositionModel(torch.nn.Module):
    """A stand-in causal LM whose greedy token depends on the position only (token = 2 + position % 7): one
    Jacobi pass makes every guess right, so a correctly slid block is committed whole on the next pass."""

    def __init__(self):
        from transformers import LlamaConfig

        super().__init__()
        self.config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)

    def forward(self, input_ids, past_key_values, use_cache, logits_to_keep):
        from types import SimpleNamespace

        start = past_key_values.get_seq_length()
        q = input_ids.shape[1]
        past_key_values.update(torch.zeros(1, 1, q, 1), torch.zeros(1, 1, q, 1), 0)
        nxt = 2 + (torch.arange(start, start + q) + 1) % 7
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, 16).float()[None, -logits_to_keep:])


@pytest.mark.parametrize("n,max_new,passes", [(4, 30, 12), (8, 30, 8), (8, 7, 2), (1, 9, 9)])
def test_the_block_slides_with_its_iterates(n, max_new, passes):
    """A block of pad guesses commits one token and makes its other n - 1 iterates exact; slid into the next
    pass they are all fixed, so it commits n and leaves only pad guesses: 1, n, 1, n, ... tokens per pass
    (the last pass holds only what the budget leaves). A block slid off by one would commit 1 per pass."""
    c = Counters()
    out = jacobi_decode(PositionModel(), torch.tensor([[3, 4, 5]]), max_new, EOS, n, PAD, c)
    assert out == [2 + p % 7 for p in range(3, 3 + max_new)]
    assert c.forward_passes == passes and c.tokens == max_new


def test_hook_batches_strip_left_padding_and_pad_like_generate():
    model = tiny_llama(seed=1)
    subject = Subject(model, "causal-lm", {"tokenizer": Tok()})
    applied = Jacobi(JacobiConfig(block_size=4)).apply(subject, None, None)
    ids = torch.tensor([[PAD, PAD, 5, 9, 3], [7, 8, 2, 4, 6]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        out = lm.generate_ids(applied.subject, ids, 25, mask)
        rows = [model.generate(ids[r:r + 1][:, mask[r].bool()], do_sample=False, max_new_tokens=25,
                               eos_token_id=EOS, pad_token_id=PAD)[0, mask[r].sum():].tolist() for r in range(2)]
    assert out[:, :5].tolist() == ids.tolist()
    width = max(len(r) for r in rows)
    assert out.shape[1] == 5 + width
    for r, ref in enumerate(rows):
        assert out[r, 5:].tolist() == ref + [PAD] * (width - len(ref))
    s = applied.stats()
    assert s["tokens"] == sum(len(r) for r in rows) and s["calls"] == 2
    assert s["mean_accepted_length"] == s["tokens"] / s["forward_passes"] >= 1


def test_arith_prompts_with_the_arith_tokenizer():
    """A random model over the arith tokenizer's vocabulary, on real test prompts, through the task's hook."""
    from tasks.arith import Arith

    task = Arith()
    task.load()
    tok = task.tokenizer
    model = lm.build_lm(lm.LMArch(hidden=32, layers=2, heads=2, intermediate=64), tok, seed=1).eval()
    for n in (3, 8):
        applied = Jacobi(JacobiConfig(block_size=n)).apply(Subject(model, "causal-lm", {"tokenizer": tok}),
                                                          task, None)
        total = 0
        for p in task.test[:4]:
            ids = tok(lm.prompt_of(p["question"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                ref = lm.generate_ids(Subject(model, "causal-lm", {"tokenizer": tok}), ids, 48)
                got = lm.generate_ids(applied.subject, ids, 48)
            assert torch.equal(got, ref)
            total += got.shape[1] - ids.shape[1]
        assert applied.stats()["tokens"] == total


@pytest.mark.parametrize("value", ["0", "-3", "129"])
def test_config_errors_list_the_valid_range(value):
    with pytest.raises(ConfigError, match=r"block_size.*valid: integers 1 <= block_size <= 128"):
        apply_overrides(JacobiConfig(), {"block_size": value}, owner="method 'jacobi'")


@pytest.mark.slow
def test_smoke_run_on_arith(tmp_path):
    from bench.runner import run

    r = run("arith", "jacobi", budget="smoke", results_root=tmp_path).result
    assert r.status == "ok"
    s = r.method_stats
    assert s["forward_passes"] > 0 and s["mean_accepted_length"] >= 1
    assert s["mean_accepted_length"] == pytest.approx(s["tokens"] / s["forward_passes"])
    assert r.fidelity.value == 1.0  # the exact greedy answers
