"""fast-dllm: with the cache off and threshold 1 the reference sampler bit for bit; the block pass over an unchanged
sequence equals the full pass (the cache is exact when nothing moved); the K/V a block's later steps read are
those its first step computed; the counters follow the block schedule; the threshold cuts the network calls;
validation; the parallel-decoding-alone control; bench run's path at smoke budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from dllm_models import MASK, SAMPLING, StubTask, generate, tiny_model, tiny_subject  # noqa: E402

from baselines.caching import _dllm  # noqa: E402
from baselines.caching.fast_dllm import BlockCachedForward, FastDLLM, FastDLLMConfig, fast_subject  # noqa: E402
from bench.config import ConfigError  # noqa: E402
from tasks._kit import dllm  # noqa: E402


def fast(subject, **cfg):
    return FastDLLM(FastDLLMConfig(control=False, **cfg)).apply(subject, None, None)


@pytest.mark.parametrize("seed, sampling, shift", [(0, SAMPLING, 0), (0, SAMPLING, 1),
                                                   (1, dllm.Sampling(gen_length=16, steps=16, block_length=4), 0)])
def test_no_cache_and_threshold_1_reproduce_the_reference_bit_for_bit(seed, sampling, shift):
    subject = tiny_subject(seed, sampling, shift)
    applied = fast(subject, cache="none", threshold=1.0)
    for n in (3, 6):
        prompt = torch.randint(0, MASK, (1, n))
        assert torch.equal(generate(applied.subject, prompt), generate(subject, prompt))
    stats = applied.stats()
    assert stats["network_calls"] == 32 and stats["cache_hit_share"] == 0 and stats["tokens_unmasked_per_step"] == 1


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_the_block_pass_over_an_unchanged_sequence_equals_the_full_pass(cache):
    model = tiny_model(layers=3)
    ids = torch.randint(0, MASK + 1, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    forward = BlockCachedForward(cache)
    with torch.no_grad():
        ref = dllm.logits(model, ids, mask)
        _dllm.full_pass(model, ids, mask, forward.caches)
        out = forward.block_pass(model, ids, mask, 6, 10 if cache == "dual" else 14)
    torch.testing.assert_close(out[:, :4], ref[:, 6:10])


def test_with_the_logit_shift_the_block_pass_starts_one_row_earlier():
    """Dream's shift: token i's logits are row i - 1's, so the cached forward recomputes the row before the block;
    over an unchanged sequence its logits for the block are the shifted full pass's, and the first step's too."""
    model = tiny_model(layers=3)
    ids = torch.randint(0, MASK + 1, (1, 14))
    mask = torch.ones_like(ids)
    forward = BlockCachedForward("dual")
    step = {"block": 0, "index": 0, "lo": 6, "hi": 10, "shift": 1}
    with torch.no_grad():
        ref = dllm.logits(model, ids, mask, shift=1)
        first = forward(model, ids, mask, step)
        later = forward(model, ids, mask, {**step, "index": 1})
    torch.testing.assert_close(first[:, 6:10], ref[:, 6:10])
    torch.testing.assert_close(later[:, 6:10], ref[:, 6:10])
    assert forward.counts.recomputed == (14 + 5) * 3  # the full pass, then the block and the row before it


def test_later_steps_read_the_kv_of_the_blocks_first_step():
    model = tiny_model()
    snaps, inputs = [], []
    forward = BlockCachedForward("dual", on_call=lambda caches, step: snaps.append(
        (dict(step), [(c.k, c.v) for c in caches.layers])))

    def recording(model, x, mask, step):
        inputs.append(x.clone())
        return forward(model, x, mask, step)

    prompt = torch.randint(0, MASK, (1, 5))
    with torch.no_grad():
        dllm.sample(model, prompt, torch.ones_like(prompt), SAMPLING, MASK, forward=recording)
    firsts = {}
    for t, (step, kv) in enumerate(snaps):
        if step["index"] == 0:
            firsts[step["block"]] = kv
            fresh = _dllm.Caches()
            with torch.no_grad():
                _dllm.full_pass(model, inputs[t], torch.ones_like(inputs[t]), fresh)
            assert all(torch.equal(k, c.k) and torch.equal(v, c.v) for (k, v), c in zip(kv, fresh.layers))
        else:  # the very tensors stored at the block's first step: nothing refreshed them
            assert all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(kv, firsts[step["block"]]))
            # while the block itself moved on since the previous step: the cache is the approximation
            assert not torch.equal(inputs[t][:, step["lo"]:step["hi"]], inputs[t - 1][:, step["lo"]:step["hi"]])
    assert sorted(firsts) == [0, 1] and len(snaps) == 16


@pytest.mark.parametrize("cache, recomputed", [("dual", (2 * 21 + 14 * 8) / 16),  # 1 full + 7 block passes each
                                               ("prefix", (2 * 21 + 7 * 16 + 7 * 8) / 16)])  # block and suffix
def test_the_counters_follow_the_block_schedule(cache, recomputed):
    applied = fast(tiny_subject(), cache=cache, threshold=None)
    generate(applied.subject, torch.randint(0, MASK, (1, 5)))
    stats = applied.stats()
    assert stats["network_calls"] == 16 and stats["full_calls"] == 2 and stats["partial_calls"] == 14
    assert stats["tokens_recomputed_per_step"] == pytest.approx(recomputed)
    assert stats["cache_hit_share"] == pytest.approx(1 - recomputed / 21)


def test_the_threshold_unmasks_in_parallel_and_cuts_the_calls():
    subject = tiny_subject()
    low, _ = fast_subject(subject, "dual", 1e-9)
    assert low.extra["sampling"].steps == 16 and low.extra["sampling"].threshold == 1e-9
    applied = fast(subject, cache="dual", threshold=1e-9)
    out = generate(applied.subject, torch.randint(0, MASK, (1, 5)))
    stats = applied.stats()
    assert not (out == MASK).any()
    assert stats["network_calls"] == 2 and stats["full_calls"] == 2  # one call per block, each block's first
    assert stats["tokens_unmasked_per_step"] == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache="both"), "cache='both' is not one of dual, prefix, none"),
    (dict(threshold=0.0), r"threshold=0.0 must be in \(0, 1\]"),
    (dict(threshold=1.2), r"threshold=1.2 must be in \(0, 1\]"),
])
def test_bad_settings_are_refused_with_the_valid_range(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FastDLLMConfig(**kwargs).validate()


def test_the_control_is_parallel_decoding_without_the_cache():
    task = StubTask()
    subject = tiny_subject()
    applied = FastDLLM(FastDLLMConfig()).apply(subject, task, None)
    (control,) = applied.controls
    assert control.name == "parallel_decoding_without_cache"
    (seen,) = task.seen
    assert seen.extra["sampling"].threshold == 0.9 and seen.extra["forward"].cache == "none"
    assert applied.subject.extra["forward"].cache == "dual"
    assert not FastDLLM(FastDLLMConfig(cache="none")).apply(subject, task, None).controls


@pytest.mark.slow  # trains the smoke reference and evaluates through lm-eval: minutes on a loaded machine
def test_end_to_end_smoke_run(results_root):
    from bench.runner import run

    r = run("arith-dllm", "fast-dllm", budget="smoke", results_root=results_root).result
    assert r.status == "ok", r.error
    stats = r.method_stats
    assert stats["full_calls"] > 0 and stats["partial_calls"] > 0 and 0 < stats["cache_hit_share"] < 1
    assert stats["steps_per_sequence"] <= 16
    assert [c.name for c in r.controls] == ["parallel_decoding_without_cache"]


@pytest.mark.parametrize("cache", ["dual", "dllm-cache"])
def test_the_mac_counter_runs_through_the_cached_forwards_and_counts_less(cache):
    """bench run counts MACs with torch's flop counter outside no_grad (its module tracker hooks every module
    input): the layer walk must survive it, and the caches must show in the count."""
    from baselines.caching.dllm_cache import DLLMCache, DLLMCacheConfig
    from bench.measure import count_macs

    subject = tiny_subject()
    applied = fast(subject, cache=cache, threshold=None) if cache == "dual" else \
        DLLMCache(DLLMCacheConfig(control=False)).apply(subject, None, None)
    prompt = torch.randint(0, MASK, (1, 5))
    ref = count_macs(lambda: subject.extra["generate"](subject, prompt, 16))
    assert 0 < count_macs(lambda: applied.subject.extra["generate"](applied.subject, prompt, 16)) < ref
