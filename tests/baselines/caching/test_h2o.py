from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from baselines.caching._kv import KVCounts, greedy_decode
from baselines.caching.h2o import H2O, H2OConfig, _layer_class, attention_modules, make_cache, scoring
from bench.config import ConfigError, apply_overrides

sys.path.insert(0, str(Path(__file__).parent))  # for kvcache_models, under --import-mode=importlib too

from kvcache_models import EOS, heavy_and_recent, oracle, prompt, reference_greedy, subject, tiny_llama  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def generate_with(model, cfg: H2OConfig, ids, max_new, tokenizer=None):
    applied = H2O(cfg).apply(subject(model, tokenizer), None, None)
    out = applied.subject.extra["generate"](applied.subject, ids, max_new, None)
    return out, applied.stats()


def labelled(ids: list[int], heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values whose first feature is the token's index in the text, to read back what was kept."""
    k = torch.zeros(1, heads, len(ids), 4)
    k[..., 0] = torch.tensor(ids, dtype=torch.float)
    return k, k.clone()


def kept(layer, head: int = 0) -> list[int]:
    return layer.keys[0, head, :, 0].long().tolist()


def test_hand_made_case_keeps_the_largest_accumulated_attention():
    layer = _layer_class()(heavy=2, recent=2)
    layer.update(*labelled([0, 1, 2, 3, 4]))  # prefill of 5 tokens into a budget of 4
    w = torch.zeros(1, 1, 5, 5)
    w[0, 0, :, :] = torch.tensor([0.5, 3.0, 0.2, 1.0, 0.3]) / 5  # column sums 0.5, 3.0, 0.2, 1.0, 0.3
    layer.observe(w)
    # recent = {3, 4}; heavy hitters = the 2 largest among {0, 1, 2}: 1 (3.0) and 0 (0.5); 2 (0.2) is evicted
    assert kept(layer) == [0, 1, 3, 4]
    assert torch.allclose(layer.scores[0], torch.tensor([0.5, 3.0, 1.0, 0.3]))
    layer.update(*labelled([5]))
    layer.observe(torch.tensor([[[[0.0, 0.1, 0.6, 0.1, 0.2]]]]))  # query 5 over kept 0, 1, 3, 4 and itself
    # scores now 0: 0.5, 1: 3.1, 3: 1.6, 4: 0.4, 5: 0.2; recent = {4, 5}; among {0, 1, 3} token 0 is the smallest
    assert kept(layer) == [1, 3, 4, 5]
    assert torch.allclose(layer.scores[0], torch.tensor([3.1, 1.6, 0.4, 0.2]))
    assert layer.evicted == 2 and layer.values.shape == layer.keys.shape == (1, 1, 4, 4)


def test_each_kv_head_keeps_its_own_heavy_hitters_and_query_heads_of_a_group_add_up():
    layer = _layer_class()(heavy=1, recent=1)
    layer.update(*labelled([0, 1, 2], heads=2))
    w = torch.zeros(1, 4, 1, 3)  # 4 query heads, 2 per KV head
    w[0, 0, 0] = torch.tensor([0.6, 0.3, 0.1])  # KV head 0 = query heads 0 + 1: scores 0.7, 0.8, 0.5
    w[0, 1, 0] = torch.tensor([0.1, 0.5, 0.4])  # (query head 0 alone would make token 0 the heavier)
    w[0, 2, 0] = torch.tensor([0.1, 0.8, 0.1])  # KV head 1 = query heads 2 + 3: scores 0.3, 1.5, 0.2
    w[0, 3, 0] = torch.tensor([0.2, 0.7, 0.1])
    layer.observe(w)
    assert kept(layer, 0) == [1, 2] and kept(layer, 1) == [1, 2]  # recent token 2 + the heavier of {0, 1}
    w2 = torch.zeros(1, 4, 1, 3)  # query 3 over cache slots (tokens 1, 2) and itself
    w2[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    w2[0, 2, 0] = torch.tensor([1.0, 0.0, 0.0])
    layer.update(*labelled([3], heads=2))
    layer.observe(w2)
    # head 0: token 2 now has 0.5 + 1.0 = 1.5 > token 1's 0.8; head 1: token 1 has 1.5 + 1.0 > token 2's 0.2
    assert kept(layer, 0) == [2, 3] and kept(layer, 1) == [1, 3]


def test_a_budget_above_the_sequence_is_the_reference_token_for_token():
    model = tiny_llama()
    for seed in range(3):
        ids = prompt(12 + 5 * seed, seed=seed)
        ref = reference_greedy(model, ids, 50)
        out, stats = generate_with(model, H2OConfig(cache_budget=128), ids, 50)
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
    applied = H2O(H2OConfig(cache_budget=256)).apply(ref_subject, task, None)
    for p in task.test[:3]:
        ids = tok(lm.prompt_of(p["question"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ref = lm.generate_ids(ref_subject, ids, 40)
            out = lm.generate_ids(applied.subject, ids, 40)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("budget,heavy_ratio,n_prompt", [(12, 0.5, 8), (10, 0.3, 14), (8, 0.75, 5)])
def test_small_budgets_match_a_recomputing_oracle(budget, heavy_ratio, n_prompt):
    """One layer and one KV head (two query heads, so the group sum is exercised): every step must equal a
    from-scratch forward over exactly the tokens the plain-Python H2O rule keeps, at their text positions."""
    model = tiny_llama(layers=1, heads=2, kv_heads=1, seed=5)
    cfg = H2OConfig(cache_budget=budget, heavy_ratio=heavy_ratio)
    ids = prompt(n_prompt, seed=2)
    out, stats = generate_with(model, cfg, ids, 30)
    expected = oracle(model, ids, 30, heavy_and_recent(cfg.heavy, cfg.recent), "original")
    assert out[0, n_prompt:].tolist() == expected
    assert stats["kv_tokens_kept"] == budget and stats["evictions"] == stats["kv_tokens_full"] - budget


def test_the_cache_never_exceeds_the_budget_and_the_model_is_left_as_it_was():
    model = tiny_llama(layers=2, seed=1)
    cfg = H2OConfig(cache_budget=12, heavy_ratio=0.5)
    cache = make_cache(model, cfg.heavy, cfg.recent)
    lengths = []
    handle = model.register_forward_hook(lambda *_: lengths.append([l.get_seq_length() for l in cache.layers]))
    counts = KVCounts()
    try:
        with scoring(model):
            assert model.config._attn_implementation == "eager"
            out = greedy_decode(model, prompt(9, seed=4), None, 40, EOS, cache, "original", counts, "test")
    finally:
        handle.remove()
    seen = out.shape[1] - 1
    assert max(max(step) for step in lengths) == 12 and seen > 12
    for layer in cache.layers:
        assert layer.keys.shape[2] == layer.scores.shape[1] == 12
        assert (layer.scores > 0).all()
    assert counts.evictions == seen - 12 and counts.kv_tokens_full == seen
    assert model.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks for m in attention_modules(model))


def test_batches_above_one_are_refused():
    with pytest.raises(ValueError, match="batch 1"):
        generate_with(tiny_llama(), H2OConfig(), prompt(6).repeat(2, 1), 5)


def test_config_validation_names_the_valid_ranges():
    base = H2OConfig()
    assert (base.cache_budget, base.heavy_ratio, base.heavy, base.recent) == (64, 0.5, 32, 32)
    with pytest.raises(ConfigError, match=r"valid range: 0.0 <= heavy_ratio <= 1.0"):
        apply_overrides(base, {"heavy_ratio": "1.5"})
    with pytest.raises(ConfigError, match=r"no recent window; valid range: 0 <= heavy_ratio < 0.9922"):
        apply_overrides(base, {"heavy_ratio": "1.0"})
    with pytest.raises(ConfigError, match="cache_budget=0 must be >= 2"):
        apply_overrides(base, {"cache_budget": "0"})
    assert apply_overrides(base, {"cache_budget": "20", "heavy_ratio": "0"}).recent == 20


@pytest.mark.slow
def test_end_to_end_smoke_run(tmp_path):
    from bench.runner import run

    r = run("arith", "h2o", budget="smoke", results_root=tmp_path).result
    assert r.status == "ok", r.error
    stats = r.method_stats
    assert stats["kv_tokens_kept"] <= 64 < stats["kv_tokens_full"] and stats["evictions"] > 0
    assert r.method.hyperparameters["heavy_ratio"] == 0.5
