from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from baselines.caching._kv import KVCounts, greedy_decode
from baselines.caching.streamingllm import StreamingLLM, StreamingLLMConfig, make_cache
from bench.config import ConfigError, apply_overrides

sys.path.insert(0, str(Path(__file__).parent))  # for kvcache_models, under --import-mode=importlib too

from kvcache_models import EOS, oracle, prompt, reference_greedy, sinks_and_window, subject, tiny_llama  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def generate_with(model, cfg: StreamingLLMConfig, ids, max_new, tokenizer=None, mask=None):
    applied = StreamingLLM(cfg).apply(subject(model, tokenizer), None, None)
    out = applied.subject.extra["generate"](applied.subject, ids, max_new, mask)
    return out, applied.stats()


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_a_budget_above_the_sequence_is_the_reference_token_for_token(positions):
    model = tiny_llama()
    for seed in range(3):
        ids = prompt(12 + 5 * seed, seed=seed)
        ref = reference_greedy(model, ids, 50)
        out, stats = generate_with(model, StreamingLLMConfig(cache_budget=128, positions=positions), ids, 50)
        assert torch.equal(out, ref)
        assert stats["evictions"] == 0 and stats["kv_tokens_kept"] == stats["kv_tokens_full"] == ref.shape[1] - 1


def test_arith_prompts_with_a_large_budget_are_the_reference():
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks._kit import lm
    from tasks.arith import Arith
    from tasks.base import RunContext

    task = Arith()
    task.load(RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1))
    tok = task.tokenizer
    model = tiny_llama(vocab=len(tok), seed=3)
    ref_subject = subject(model, tok)
    applied = StreamingLLM(StreamingLLMConfig(cache_budget=256)).apply(ref_subject, task, None)
    for p in task.test[:3]:
        ids = tok(lm.prompt_of(p["question"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ref = lm.generate_ids(ref_subject, ids, 40)
            out = lm.generate_ids(applied.subject, ids, 40)
        assert torch.equal(out, ref)
    assert applied.stats()["sequences"] == 3


@pytest.mark.parametrize("positions", ["cache", "original"])
@pytest.mark.parametrize("budget,sinks,n_prompt", [(12, 4, 8), (10, 0, 6), (8, 2, 15)])
def test_small_budgets_match_a_recomputing_oracle(positions, budget, sinks, n_prompt):
    """One layer, so cached keys depend only on token and position: every step must equal a from-scratch
    forward over exactly the sinks and the window, at cache (or text) positions. This checks the eviction
    set and the RoPE re-rotation together; (8, 2, 15) has a prompt longer than the budget."""
    model = tiny_llama(layers=1, heads=2, kv_heads=1, seed=5)
    ids = prompt(n_prompt, seed=2)
    out, stats = generate_with(model, StreamingLLMConfig(cache_budget=budget, sink_tokens=sinks,
                                                         positions=positions), ids, 30)
    expected = oracle(model, ids, 30, sinks_and_window(sinks, budget - sinks), positions)
    assert out[0, n_prompt:].tolist() == expected
    assert stats["kv_tokens_kept"] == budget and stats["evictions"] == stats["kv_tokens_full"] - budget


def test_re_assigned_positions_change_the_logits_only_after_the_first_eviction():
    """Cache positions and text positions agree until a token is evicted, and differ after (else the
    re-rotation would be doing nothing)."""
    model = tiny_llama(layers=1, heads=2, kv_heads=1, seed=5)
    ids = prompt(8, seed=2)
    logits = {}
    for positions in ("cache", "original"):
        steps = logits[positions] = []
        handle = model.register_forward_hook(lambda m, a, out: steps.append(out.logits[0, -1].clone()))
        try:
            generate_with(model, StreamingLLMConfig(cache_budget=10, positions=positions), ids, 12)
        finally:
            handle.remove()
    a, b = torch.stack(logits["cache"]), torch.stack(logits["original"])
    # steps 0-3 bring the text to 8, 9, 10, 11 tokens, each attending to all of it; the first eviction follows
    # step 3's attention, and from step 4 on the window has moved
    assert torch.equal(a[:4], b[:4])
    assert all(not torch.allclose(a[i], b[i]) for i in range(4, len(a)))


def test_the_cache_never_exceeds_the_budget_and_holds_the_sinks_and_the_recent_tokens():
    model = tiny_llama(layers=2, seed=1)
    sinks, window, n_prompt, max_new = 3, 9, 7, 40
    cache = make_cache(model, sinks, window, "cache")
    lengths = []
    handle = model.register_forward_hook(lambda *_: lengths.append([l.get_seq_length() for l in cache.layers]))
    counts = KVCounts()
    try:
        out = greedy_decode(model, prompt(n_prompt, seed=4), None, max_new, EOS, cache, "cache", counts, "test")
    finally:
        handle.remove()
    seen = out.shape[1] - 1  # the last token is never fed back
    assert max(max(step) for step in lengths) == sinks + window
    assert all(len(set(step)) == 1 for step in lengths)  # every layer holds the same tokens
    assert lengths[-1][0] == sinks + window and seen > sinks + window
    expected = list(range(sinks)) + list(range(seen - window, seen))
    for layer in cache.layers:
        assert layer.tokens.tolist() == expected  # text positions of the kept keys
        # each window token came in when the cache was full, so was rotated at cache index S + W
        assert layer.pos.tolist() == list(range(sinks)) + [sinks + window] * window
        assert layer.keys.shape[2] == layer.values.shape[2] == sinks + window
    assert counts.kv_tokens_kept == sinks + window and counts.kv_tokens_full == seen
    assert counts.evictions == seen - sinks - window


def test_left_padding_is_stripped_and_batches_above_one_are_refused():
    model = tiny_llama()
    ids = prompt(10, seed=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    cfg = StreamingLLMConfig(cache_budget=16)
    plain, _ = generate_with(model, cfg, ids, 20)
    out, _ = generate_with(model, cfg, padded, 20, mask=mask)
    assert torch.equal(out[:, 3:], plain) and torch.equal(out[:, :13], padded)
    with pytest.raises(ValueError, match="batch 1"):
        generate_with(model, cfg, ids.repeat(2, 1), 5)


def test_config_validation_names_the_valid_ranges():
    base = StreamingLLMConfig()
    assert base.cache_budget == 64 and base.sink_tokens == 4 and base.window == 60 and base.positions == "cache"
    with pytest.raises(ConfigError, match=r"valid range: 0 <= sink_tokens <= 15"):
        apply_overrides(base, {"cache_budget": "16", "sink_tokens": "16"})
    with pytest.raises(ConfigError, match="cache_budget=1 must be >= 2"):
        apply_overrides(base, {"cache_budget": "1", "sink_tokens": "0"})
    with pytest.raises(ConfigError, match="'cache', 'original'"):
        apply_overrides(base, {"positions": "text"})
    ok = apply_overrides(base, {"cache_budget": "32", "sink_tokens": "0", "positions": "original"})
    assert ok.window == 32


def test_cache_positions_need_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=128)).eval()
    with pytest.raises(ValueError, match="positions='original'"):
        StreamingLLM(StreamingLLMConfig()).apply(subject(gpt2), None, None)


@pytest.mark.slow
def test_end_to_end_smoke_run(tmp_path):
    from bench.runner import run

    r = run("arith", "streamingllm", budget="smoke", results_root=tmp_path).result
    assert r.status == "ok", r.error
    stats = r.method_stats
    assert stats["kv_tokens_kept"] <= 64 < stats["kv_tokens_full"] and stats["evictions"] > 0
    assert r.method.hyperparameters["cache_budget"] == 64
