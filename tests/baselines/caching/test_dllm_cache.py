"""dllm-cache and the opened-up mask predictor it runs on (`baselines.caching._dllm`).

The layer walk with nothing cached equals the model's own logits; both intervals 1 reproduce the reference
sampler bit for bit; the features a step reads from the cache equal those computed at their refresh step (and a
refresh step's equal a fresh full pass on that step's input); V-verify recomputes exactly the positions whose
values moved most (checked independently on layer 0, whose input is the token embedding); the counters match the
schedule; validation; the fewer-steps control; bench run's path at smoke budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from dllm_models import MASK, SAMPLING, StubTask, generate, tiny_model, tiny_subject  # noqa: E402

from baselines.caching import _dllm  # noqa: E402
from baselines.caching.dllm_cache import CachedForward, DLLMCache, DLLMCacheConfig, matched_steps  # noqa: E402
from bench.config import ConfigError  # noqa: E402
from tasks._kit import dllm  # noqa: E402


def cached(subject, **cfg):
    return DLLMCache(DLLMCacheConfig(control=False, **cfg)).apply(subject, None, None)


def test_the_layer_walk_with_nothing_cached_equals_the_models_logits():
    model = tiny_model(layers=3)
    ids = torch.randint(0, MASK + 1, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        ref = dllm.logits(model, ids, mask)
        caches = _dllm.Caches()
        torch.testing.assert_close(_dllm.full_pass(model, ids, mask, caches), ref)
        torch.testing.assert_close(_dllm.full_pass(model, ids, mask, rows=(4, 9)), ref[:, 4:9])
    assert len(caches.layers) == 3 and caches.layers[0].k.shape == (2, 2, 11, 8)


@pytest.mark.parametrize("seed, sampling, shift", [(0, SAMPLING, 0), (0, SAMPLING, 1),
                                                   (1, dllm.Sampling(gen_length=16, steps=8, block_length=4), 0)])
def test_both_intervals_1_reproduce_the_reference_bit_for_bit(seed, sampling, shift):
    subject = tiny_subject(seed, sampling, shift)
    applied = cached(subject, prompt_interval=1, response_interval=1)
    for n in (3, 6):
        prompt = torch.randint(0, MASK, (1, n))
        assert torch.equal(generate(applied.subject, prompt), generate(subject, prompt))
    stats = applied.stats()
    assert stats["full_calls"] == stats["network_calls"] == 2 * sampling.steps and stats["cache_hit_share"] == 0


@pytest.mark.parametrize("shift", [0, 1])
def test_partial_steps_recomputing_everything_give_the_references_answers(shift):
    """Response interval 2 with update ratio 1 and the prompt refreshed every step: the partial path recomputes
    every position, so the answers are the reference's; with Dream's shift the logits come from the rows one to
    the left (the first of them the prompt's last position), which this would catch if they did not."""
    subject = tiny_subject(2, SAMPLING, shift)
    applied = cached(subject, prompt_interval=1, response_interval=2, update_ratio=1.0)
    for n in (3, 6):
        prompt = torch.randint(0, MASK, (1, n))
        assert torch.equal(generate(applied.subject, prompt), generate(subject, prompt))
    assert applied.stats()["full_calls"] < applied.stats()["network_calls"]


def run_recorded(cfg: DLLMCacheConfig, prompt_length: int = 6, seed: int = 0):
    """Sample once, keeping after every call the caches (their tensors are replaced, never written in place) and
    the sequence the call saw."""
    model = tiny_model(seed)
    snaps, inputs = [], []
    forward = CachedForward(cfg, SAMPLING.gen_length,
                            on_call=lambda caches, s: snaps.append([(c.k, c.v, c.attn, c.ffn, c.step.clone())
                                                                    for c in caches.layers]))

    def recording(model, x, mask, step):
        inputs.append(x.clone())
        return forward(model, x, mask, step)

    prompt = torch.randint(0, MASK, (1, prompt_length))
    with torch.no_grad():
        dllm.sample(model, prompt, torch.ones_like(prompt), SAMPLING, MASK, forward=recording)
    return model, forward, snaps, inputs


def test_the_features_a_step_reads_are_those_computed_at_their_refresh_step():
    cfg = DLLMCacheConfig(prompt_interval=8, response_interval=4, update_ratio=0.25)
    model, _, snaps, inputs = run_recorded(cfg)
    reused = 0
    for t, layers in enumerate(snaps):
        for layer, (k, v, a, f, tag) in enumerate(layers):
            for pos in range(tag.shape[1]):
                r = int(tag[0, pos])
                assert r <= t
                if r < t:
                    reused += 1
                kr, vr, ar, fr, _ = snaps[r][layer]
                assert torch.equal(k[0, :, pos], kr[0, :, pos]) and torch.equal(v[0, :, pos], vr[0, :, pos])
                assert torch.equal(a[0, pos], ar[0, pos]) and torch.equal(f[0, pos], fr[0, pos])
    assert reused > 0
    for r in (0, 8):  # the full refreshes equal a fresh pass over that step's sequence
        fresh = _dllm.Caches()
        with torch.no_grad():
            _dllm.full_pass(model, inputs[r], torch.ones_like(inputs[r]), fresh)
        for (k, v, a, f, _), c in zip(snaps[r], fresh.layers):
            assert torch.equal(k, c.k) and torch.equal(v, c.v) and torch.equal(a, c.attn) and torch.equal(f, c.ffn)
    tags = [layers[0][4][0] for layers in snaps]
    assert (tags[5][:6] == 0).all() and (tags[9][:6] == 8).all()  # the prompt: refreshed at 0 and 8 only
    assert (tags[4][6:] == 4).all() and (tags[12][6:] == 12).all()  # the response: every 4th step in full
    assert int((tags[5][6:] == 5).sum()) == 4  # in between: 25% of 16 response positions


def test_v_verify_recomputes_the_response_positions_whose_values_moved_most():
    cfg = DLLMCacheConfig(prompt_interval=100, response_interval=100, update_ratio=0.25)
    model, _, snaps, inputs = run_recorded(cfg, seed=3)
    layer = model.model.layers[0]
    checked = 0
    for t in range(1, len(snaps)):
        with torch.no_grad():  # layer 0's input is the embedding of the step's sequence
            v_new = _dllm.values_of(layer, model.model.embed_tokens(inputs[t])[:, 6:])
        v_old = snaps[t - 1][0][1][:, :, 6:]
        sim = torch.nn.functional.cosine_similarity(v_new.transpose(1, 2).flatten(2),
                                                    v_old.transpose(1, 2).flatten(2), dim=-1)[0]
        chosen = (snaps[t][0][4][0, 6:] == t)
        assert int(chosen.sum()) == 4
        assert sim[chosen].max() <= sim[~chosen].min()  # the lowest similarities, ties aside
        changed = (inputs[t] != inputs[t - 1])[0, 6:]  # tokens fixed by the previous step: their values moved
        if changed.any():
            assert chosen[changed].all() and (sim[changed] < 1 - 1e-6).all()
            checked += 1
    assert checked == len(snaps) - 1  # one token fixed per step, each recomputed at the next


def test_the_counters_follow_the_schedule():
    subject = tiny_subject()
    applied = cached(subject, prompt_interval=8, response_interval=4, update_ratio=0.25)
    generate(applied.subject, torch.randint(0, MASK, (1, 6)))
    stats = applied.stats()
    # 16 steps over 22 positions: full at 0 and 8; the response (16) at 4 and 12; 4 positions at the 12 others
    assert stats["network_calls"] == 16 and stats["full_calls"] == 2 and stats["partial_calls"] == 14
    assert stats["tokens_recomputed_per_step"] == pytest.approx((2 * 22 + 2 * 16 + 12 * 4) / 16)
    assert stats["cache_hit_share"] == pytest.approx(1 - (2 * 22 + 2 * 16 + 12 * 4) / (16 * 22))
    assert stats["steps_per_sequence"] == 16 and stats["v_verify_rows"] == pytest.approx(12 * 16 / 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_interval=0), "prompt_interval=0 must be an integer >= 1"),
    (dict(response_interval=-2), "response_interval=-2 must be an integer >= 1"),
    (dict(update_ratio=1.5), r"update_ratio=1.5 must be in \[0, 1\]"),
])
def test_bad_settings_are_refused_with_the_valid_range(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DLLMCacheConfig(**kwargs).validate()


def test_the_control_is_the_plain_sampler_with_the_matched_share_of_steps():
    cfg = DLLMCacheConfig(response_interval=4, update_ratio=0.25)
    assert matched_steps(SAMPLING, cfg) == 8  # 1/4 + 3/4 * 1/4 = 0.44 of 16 steps, 3.5 per block -> 4 (x 2)
    assert matched_steps(SAMPLING, DLLMCacheConfig(response_interval=100, update_ratio=0.0)) == 2
    task = StubTask()
    subject = tiny_subject()
    applied = DLLMCache(cfg).apply(subject, task, None)
    (control,) = applied.controls
    assert control.name == "fewer_steps_same_share" and control.value == 0.5
    (seen,) = task.seen
    assert seen.extra["sampling"].steps == 8 and seen.extra.get("forward") is None
    assert applied.subject.extra["forward"] is not None and subject.extra.get("forward") is None


@pytest.mark.slow  # trains the smoke reference and evaluates through lm-eval: minutes on a loaded machine
def test_end_to_end_smoke_run(results_root):
    from bench.runner import run

    r = run("arith-dllm", "dllm-cache", budget="smoke", results_root=results_root).result
    assert r.status == "ok", r.error
    stats = r.method_stats
    # smoke: 16 steps; prompt refreshed at step 0 only, the response every 4th step
    assert stats["steps_per_sequence"] == 16 and stats["full_calls"] > 0 and stats["partial_calls"] > 0
    assert 0 < stats["cache_hit_share"] < 1 and stats["tokens_recomputed_per_step"] < stats["tokens_per_step_full"]
    assert [c.name for c in r.controls] == ["fewer_steps_same_share"]
