"""`osd`: online updates never change the target's greedy output (float32, updates firing several times); an
update changes the draft's weights and lowers its divergence on the buffer; on a stream where the draft starts
bad, acceptance in the last window exceeds the first; the frozen control keeps its weights; the divergences;
settings; the ShiftedPrompts capability; the method end to end (stats, paused updates for the timed calls, the
cached adapted draft); slow smoke runs on arith and offline gsm8k. Tiny random Llamas over the arith tokenizer
(conftest), trained only by the online updates under test."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from baselines.decoding import _osd
from baselines.decoding.osd import OSDConfig
from bench.api import CapabilityMissing, Draft, ShiftedPrompts, offers
from bench.config import ConfigError, apply_overrides
from bench.registry import create_method
from decoding_models import DraftTask, greedy, tiny_llama
from tasks._kit import lm
from tasks.base import Subject


def settings(**kw) -> _osd.OnlineSettings:
    base = dict(num_draft_tokens=4, update_interval=2, buffer_size=4, lr=1e-2, steps_per_update=2,
                divergence="fkl", positions="all", max_steps=10 ** 9)
    return _osd.OnlineSettings(**{**base, **kw})


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def stream(arith_task, tokenizer) -> list[torch.Tensor]:
    """Twelve arith prompts, test then shifted, as 1-D token ids."""
    texts = [lm.prompt_of(p["question"]) for p in arith_task.test[:6]] + arith_task.shifted_prompts(6, 0)
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for t in texts]


@pytest.fixture(scope="module")
def bad_draft(tokenizer):
    """A draft unrelated to the target (another seed, smaller): it rarely agrees at first."""
    return tiny_llama(len(tokenizer), hidden=16, layers=1, heads=1, seed=7, eos=tokenizer.eos_token_id,
                      pad=tokenizer.pad_token_id)


# ---- exactness ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("positions", ["all", "corrections"])
def test_greedy_output_is_the_targets_throughout_a_learning_stream(target, bad_draft, stream, tokenizer,
                                                                   divergence, positions):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    draft = copy.deepcopy(bad_draft)
    dec = _osd.OnlineSpeculativeDecoder(target, draft, settings(divergence=divergence, positions=positions,
                                                                update_interval=2), eos)
    for ids in stream:
        assert dec.serve(ids, 30) == greedy(target, ids[None], 30, eos, pad)
    assert dec.updates >= 4, "updates must fire several times during the stream"
    assert not same_weights(draft, bad_draft)
    s = dec.stats.as_dict()
    assert 0 < s["acceptance_rate"] < 1  # drafts were accepted and rejected: both paths of the loop ran


def test_records_hold_the_targets_distributions_at_every_emitted_position(target, bad_draft, stream, tokenizer):
    eos = tokenizer.eos_token_id
    dec = _osd.OnlineSpeculativeDecoder(target, copy.deepcopy(bad_draft), settings(update_interval=10 ** 6), eos)
    for ids in stream[:3]:
        out = dec.serve(ids, 25)
        rec = dec.buffer[-1]
        assert rec.ids.tolist() == ids.tolist() + out and rec.start == ids.shape[0]
        with torch.no_grad():  # p(.|x, y_<t) from one plain forward pass over (x, y)
            direct = target(input_ids=rec.ids[None, :-1]).logits[0, rec.start - 1:]
        torch.testing.assert_close(rec.target_logits, direct, atol=1e-4, rtol=1e-4)
        assert (rec.target_logits.argmax(-1) == rec.ids[rec.start:]).all()  # y is the target's argmax
        assert rec.corrected.sum() <= dec.queries[-1].passes  # at most one correction per target pass


# ---- the update -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_an_update_changes_the_draft_and_lowers_its_divergence_on_the_buffer(target, bad_draft, stream, tokenizer,
                                                                             divergence):
    draft = copy.deepcopy(bad_draft)
    s = settings(update_interval=10 ** 6, buffer_size=4, steps_per_update=5, lr=1e-2, divergence=divergence)
    dec = _osd.OnlineSpeculativeDecoder(target, draft, s, tokenizer.eos_token_id)
    for ids in stream[:4]:
        dec.serve(ids, 30)
    assert dec.updates == 0 and len(dec.buffer) == 4
    before = copy.deepcopy(draft)
    d0 = _osd.buffer_divergence(draft, dec.buffer, divergence, "all")
    seconds = dec.update()
    d1 = _osd.buffer_divergence(draft, dec.buffer, divergence, "all")
    assert seconds > 0 and dec.updates == 1 and dec.steps == 5
    assert not same_weights(draft, before)
    assert d1 < 0.9 * d0, (d0, d1)
    assert dec.losses[0] == pytest.approx(d0, rel=1e-4)  # the update's objective is the buffer's divergence


def test_the_step_budget_and_an_empty_buffer_stop_updates(target, bad_draft, stream, tokenizer):
    draft = copy.deepcopy(bad_draft)
    dec = _osd.OnlineSpeculativeDecoder(target, draft, settings(update_interval=1, steps_per_update=3, max_steps=7),
                                        tokenizer.eos_token_id)
    assert dec.update() == 0.0  # nothing buffered yet
    for ids in stream[:5]:
        dec.serve(ids, 20)
    assert dec.steps == 7 and dec.updates == 3  # 3 + 3 + 1, then the budget is spent


def test_on_a_stream_where_the_draft_starts_bad_acceptance_rises(target, tokenizer, arith_task):
    """A behaviour test that can fail: the online draft's last window beats its first, and beats the frozen
    control's last window, on a stream of 24 arith test prompts. The target's output layer is scaled up so its
    distributions are peaked as a trained model's are (a random tiny model's are nearly uniform, its argmax set
    by tiny margins that a divergence barely weighs); the draft is an unrelated one-layer model that agrees
    with it almost never at first. Measured: windows 0.06 -> 0.38 online, 0.00 frozen."""
    eos = tokenizer.eos_token_id
    sharp = copy.deepcopy(target)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(20)
    bad = tiny_llama(len(tokenizer), hidden=32, layers=1, heads=1, seed=7, eos=eos, pad=tokenizer.pad_token_id)
    texts = [lm.prompt_of(p["question"]) for p in arith_task.test[10:34]]
    prompts = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for t in texts]
    s = settings(update_interval=2, buffer_size=4, steps_per_update=4, lr=1e-2)
    on = _osd.run_stream(sharp, copy.deepcopy(bad), prompts, [24] * len(prompts), s, eos, learn=True)
    off = _osd.run_stream(sharp, copy.deepcopy(bad), prompts, [24] * len(prompts), s, eos, learn=False)
    won, woff = _osd.windows(on.queries, 4), _osd.windows(off.queries, 4)
    assert won[-1]["acceptance"] > won[0]["acceptance"] + 0.15, (won, woff)
    assert won[-1]["acceptance"] > woff[-1]["acceptance"] + 0.15, (won, woff)
    assert won[-1]["tokens_per_pass"] > woff[-1]["tokens_per_pass"]


def test_the_frozen_control_keeps_its_weights(target, bad_draft, stream, tokenizer):
    draft = copy.deepcopy(bad_draft)
    dec = _osd.run_stream(target, draft, stream, [30] * len(stream), settings(update_interval=1),
                          tokenizer.eos_token_id, learn=False)
    assert same_weights(draft, bad_draft) and dec.updates == 0 and not dec.buffer
    assert len(dec.queries) == len(stream)


# ---- divergences, windows --------------------------------------------------------------------------------------

def test_divergences_against_their_definitions():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    p, q = a.softmax(-1), b.softmax(-1)
    kl = lambda x, y: (x * (x / y).log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(_osd.token_divergence(a, b, "fkl"), kl(p, q))
    torch.testing.assert_close(_osd.token_divergence(a, b, "rkl"), kl(q, p))
    m = 0.5 * (p + q)
    torch.testing.assert_close(_osd.token_divergence(a, b, "jsd"), 0.5 * kl(p, m) + 0.5 * kl(q, m))
    for kind in ("fkl", "rkl", "jsd"):
        assert _osd.token_divergence(a, a, kind).abs().max() < 1e-6
    with pytest.raises(ValueError, match="fkl, rkl, jsd"):
        _osd.token_divergence(a, b, "tvd")


def test_windows_cut_the_stream_into_contiguous_parts():
    qs = [_osd.QueryStats(drafted=4, accepted=i % 5, passes=2, emitted=3 + i % 2) for i in range(23)]
    ws = _osd.windows(qs, 10)
    assert len(ws) == 10 and sum(w["queries"] for w in ws) == 23
    assert ws[0]["acceptance"] == pytest.approx((0 + 1) / 8)
    assert len(_osd.windows(qs[:3], 10)) == 3  # never more windows than queries


# ---- settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("divergence", "tvd", "fkl, rkl, jsd"), ("positions", "rejected", "all, corrections"),
    ("update_interval", "0", "1 <= update_interval"), ("buffer_size", "0", "buffer_size"),
    ("lr", "0", "lr=0.0 must be > 0"), ("num_draft_tokens", "0", "num_draft_tokens"),
    ("stream_windows", "0", "stream_windows"), ("steps_per_update", "-1", "steps_per_update"),
])
def test_settings_are_checked_and_errors_list_the_valid_options(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(OSDConfig(), {key: value}, "osd")


def test_defaults_are_valid_and_frozen():
    cfg = create_method("osd").config
    cfg.validate()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]


# ---- the capability ---------------------------------------------------------------------------------------------

def test_arith_offers_a_shifted_stream_of_long_chains(arith_task):
    from tasks import arith_data

    assert offers(arith_task, ShiftedPrompts) and arith_task.shift
    a, b = arith_task.shifted_prompts(30, 0), arith_task.shifted_prompts(30, 0)
    assert a == b and a != arith_task.shifted_prompts(30, 1)  # fixed by the seed
    assert all(p.startswith(lm.prompt_of("")[:9]) for p in a)  # the task's prompt format
    rows = arith_data.shifted(200, 0)
    steps = [r["answer"].count("<<") for r in rows]
    assert set(steps) == set(arith_data.SHIFTED_OPS)  # 4-6 operations, where training problems have 1-3
    assert max(r["answer"].count("<<") for r in arith_task.test + arith_task.train[:2000]) <= 3
    assert {r["question"] for r in rows}.isdisjoint({r["question"] for r in arith_task.test})


def test_gsm8k_declares_it_too():
    from tasks.gsm8k import GSM8K

    assert offers(GSM8K, ShiftedPrompts) and offers(GSM8K, Draft)


def test_a_task_without_a_shifted_stream_is_refused(target, bad_draft, tokenizer, ctx):
    with pytest.raises(CapabilityMissing, match="ShiftedPrompts.*arith"):
        create_method("osd").apply(Subject(target, "causal-lm", {"tokenizer": tokenizer}), DraftTask(bad_draft), ctx)


# ---- the method end to end ----------------------------------------------------------------------------------------

@dataclass
class StreamTask(DraftTask, ShiftedPrompts):
    """Stands in for a causal-LM task with a draft and a shifted stream (all `osd` reads from a task)."""

    texts: list = None  # type: ignore[assignment]
    shift = "the arith task's shifted problems"

    def shifted_prompts(self, n: int, seed: int) -> list[str]:
        return self.texts[:n]

    def data_fingerprint(self) -> str:
        return "stream-" + str(len(self.texts))

    class spec:  # noqa: N801 - what the cache's folder names read
        name, version = "stream", "1"


def test_apply_serves_exactly_learns_then_pauses_and_caches_the_adapted_draft(target, bad_draft, stream, tokenizer,
                                                                              arith_task, ctx):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    task = StreamTask(copy.deepcopy(bad_draft), arith_task.shifted_prompts(6, 3))
    overrides = {"update_interval": "2", "buffer_size": "4", "lr": "0.01", "stream_windows": "3",
                 "shifted_queries": "6", "max_new_tokens": "20"}
    method = create_method("osd", overrides)
    subject = Subject(target, "causal-lm", {"tokenizer": tokenizer})
    applied = method.apply(subject, task, ctx)
    gen, served = applied.subject.extra["generate"], applied.subject.extra["draft"]
    outs = []
    for ids in stream[:8]:  # the evaluation stream
        with torch.inference_mode():  # as the harness calls it: updates must still run
            out = gen(applied.subject, ids[None], 20, torch.ones_like(ids[None]))
        assert out[0, ids.shape[0]:].tolist() == greedy(target, ids[None], 20, eos, pad)
        outs.append(out)
    s = applied.stats()
    assert s["eval_queries"] == 8 and s["eval_updates"] == 4 and s["eval_windows"] == 3
    assert s["shifted_queries"] == 6 and s["shifted_updates"] == 3
    for stream_name in ("eval", "shifted"):
        for arm in ("online", "frozen"):
            for k in ("acceptance_first", "acceptance_last", "tokens_per_pass_first", "tokens_per_pass_last"):
                assert 0 <= s[f"{stream_name}_{arm}_{k}"] <= 5
    assert applied.cost.seconds == pytest.approx(s["eval_update_seconds"]) and applied.cost.seconds > 0
    assert applied.cost.steps == s["eval_update_steps"] == 8 and applied.cost.tokens_seen > 0
    # the timed calls: updates paused, the draft as the stream left it
    after = copy.deepcopy(served)
    for ids in stream[8:]:
        with torch.inference_mode():
            gen(applied.subject, ids[None], 20, torch.ones_like(ids[None]))
    assert same_weights(served, after) and not same_weights(served, bad_draft)
    assert applied.stats() == s  # computed once

    # a second apply (a timing worker, bench remeasure) finds the adapted draft cached and serves with it frozen
    again = create_method("osd", overrides).apply(subject, StreamTask(copy.deepcopy(bad_draft), task.texts), ctx)
    assert same_weights(again.subject.extra["draft"], after)
    for ids, out in zip(stream[:8], outs):
        with torch.inference_mode():
            assert torch.equal(again.subject.extra["generate"](again.subject, ids[None], 20, None), out)
    s2 = again.stats()  # its eval stream's online arm: replayed from the initial draft, ending at the cached one
    assert s2["eval_replay_matches_cache"] == 1.0
    assert s2["eval_online_acceptance_all"] == s["eval_online_acceptance_all"]
    assert same_weights(again.subject.extra["draft"], after)


# ---- runs ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_run_on_arith(results_root):
    from bench.runner import run
    from bench.store import load_result

    r = load_result(run("arith", "osd", budget="smoke", results_root=results_root).path, results_root)
    assert r.status == "ok" and r.fidelity.value == 1.0 and r.quality.delta == 0
    s = r.method_stats
    assert s["eval_queries"] == 6 and s["shifted_queries"] == 16 and s["shifted_updates"] == 2
    assert 0 < s["shifted_online_acceptance_last"] <= 1 and 0 < s["shifted_frozen_acceptance_first"] <= 1
    assert s["shifted_windows"] == 10
    assert r.cost.steps <= 20


@pytest.mark.slow
def test_smoke_run_on_gsm8k_offline(tmp_path_factory, results_root):
    """The full task through the runner on its fixture files and tiny random models (lm-eval's 5-shot contexts
    for the evaluation and for the shifted stream)."""
    import sys
    from pathlib import Path

    from bench.runner import run
    from bench.store import load_result

    sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers
    import full_fixtures

    with full_fixtures.full_task_env(tmp_path_factory.mktemp("full"), separate_draft=True):
        r = load_result(run("gsm8k", "osd", budget="smoke", overrides={"max_new_tokens": "24", "shifted_queries": "8"},
                            results_root=results_root).path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.fidelity.value == 1.0
    assert r.method_stats["shifted_queries"] == 8 and r.method_stats["shifted_updates"] == 1
