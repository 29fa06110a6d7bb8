"""`cllm`: trajectories end at the greedy output, the consistency loss is zero exactly at the fixed point, zero
training steps leave the reference bit for bit, decoding returns the (trained) model's own greedy output, the
fast-forwarded/stationary counts on hand-made traces, the cache and the cost, config validation, and a smoke
run on arith. Tiny random Llamas over the arith tokenizer (conftest), never trained beyond a few steps."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.decoding import _cllm
from baselines.decoding.cllm import CLLM, CLLMConfig, split_rows
from bench.config import ConfigError, apply_overrides
from decoding_models import RowsTask, greedy, tiny_llama
from tasks._kit import lm
from tasks.base import Subject


@pytest.fixture(scope="module")
def rows(arith_task):
    return arith_task.train[:12]


def subject_of(model, tokenizer) -> Subject:
    return Subject(model, "causal-lm", {"tokenizer": tokenizer})


def ids(tokenizer, rows) -> list[list[int]]:
    return tokenizer([lm.prompt_of(r["question"]) for r in rows], add_special_tokens=False)["input_ids"]


# ---- trajectories ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 8, 16])
@pytest.mark.parametrize("seed", [0, 2])
def test_trajectories_end_at_the_greedy_output(tokenizer, prompts, n, seed):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = tiny_llama(len(tokenizer), seed=seed, eos=eos, pad=pad)
    for p in prompts:
        ref = greedy(model, p, 40, eos, pad)
        with torch.inference_mode():
            blocks, passes = _cllm.jacobi_trajectory(model, p[0].tolist(), 40, eos, n, pad)
        assert sum((b.fixed_point for b in blocks), []) == ref
        assert passes == sum(len(b.states) for b in blocks)  # one pass per iterate, the last confirms y*
        context = p[0].tolist()
        for b in blocks:
            assert b.context == context and b.prompt_len == p.shape[1]
            assert b.states[0] == [pad] * len(b.states[0]) and len(b.states) <= len(b.states[0]) + 1
            with torch.inference_mode():  # each state is the Jacobi update of the one before it
                for y, nxt in zip(b.states, b.states[1:]):
                    logits = model(torch.tensor([context + y[:-1]])).logits[0, len(context) - 1:]
                    assert logits.argmax(-1).tolist() == nxt
            context = context + b.fixed_point


# ---- the losses ------------------------------------------------------------------------------------------------

def blocks_of(model, tokenizer, prompts, n=8) -> list[_cllm.Block]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.inference_mode():
        return [b for p in prompts for b in _cllm.jacobi_trajectory(model, p[0].tolist(), 24, eos, n, pad)[0]]


@pytest.mark.parametrize("consistency", ["global", "local"])
def test_consistency_loss_is_zero_exactly_at_the_fixed_point(target, tokenizer, prompts, consistency):
    blocks = [b for b in blocks_of(target, tokenizer, prompts) if len(b.states) > 2]
    assert blocks
    settled = [_cllm.Block(b.context, b.prompt_len, [b.states[-1]] * 3, b.valid) for b in blocks]
    samples = [(b, j) for b in settled for j in (0, 1)]
    loss_c, loss_ar, tokens = _cllm.cllm_losses(target, samples, consistency, tokenizer.pad_token_id)
    assert loss_c.item() == 0.0 and loss_ar.item() > 0 and tokens > 0
    moving = [(b, 0) for b in blocks]  # y^(0): pads, far from y* (and from y^(1))
    loss_c, _, _ = _cllm.cllm_losses(target, moving, consistency, tokenizer.pad_token_id)
    assert loss_c.item() > 0
    loss_c.backward()  # the student side has a gradient ...
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in target.parameters())
    target.zero_grad(set_to_none=True)


def test_global_and_local_targets_differ_only_before_the_last_step(target, tokenizer, prompts):
    """From y^(J-1) the next iterate is y* itself: local and global give the same loss there (zero, in fact,
    when y^(J-1) differs from y* in the block's last token only, which no prediction reads)."""
    blocks = [b for b in blocks_of(target, tokenizer, prompts) if len(b.states) > 2]
    last = [(b, len(b.states) - 2) for b in blocks]
    g = _cllm.cllm_losses(target, last, "global", tokenizer.pad_token_id)[0].item()
    lo = _cllm.cllm_losses(target, last, "local", tokenizer.pad_token_id)[0].item()
    assert g == pytest.approx(lo, rel=1e-6, abs=1e-9)
    first = [(b, 0) for b in blocks]
    assert _cllm.cllm_losses(target, first, "global", tokenizer.pad_token_id)[0].item() != \
        _cllm.cllm_losses(target, first, "local", tokenizer.pad_token_id)[0].item()


def test_training_lowers_the_consistency_loss(target, tokenizer, prompts, ctx):
    model = copy.deepcopy(target)
    blocks = blocks_of(model, tokenizer, prompts)
    samples = [(b, 0) for b in blocks if len(b.states) > 1]
    before = _cllm.cllm_losses(model, samples, "global", tokenizer.pad_token_id)[0].item()
    st = _cllm.fit(model, blocks, steps=30, batch_size=4, lr=3e-3, warmup_steps=2, ar_weight=0.0,
                   consistency="global", pad=tokenizer.pad_token_id, seed=0, ctx=ctx)
    assert st.steps == 30 and st.samples_seen == 120 and st.tokens_seen > 0 and not model.training
    with torch.no_grad():
        after = _cllm.cllm_losses(model, samples, "global", tokenizer.pad_token_id)[0].item()
    assert after < 0.5 * before


# ---- fast-forwarded and stationary tokens ----------------------------------------------------------------------

def test_counts_on_hand_made_traces():
    """Traces as `jacobi_decode` makes them (n = 4: a pass's guesses are the previous pass's updates after the
    committed ones, then pads); EOS is 1."""
    out = [10, 11, 12, 13, 14, 15, 1]
    trace = [(0, [10, 99, 12, 13], 1),  # 12 and 13 right behind a wrong 99
             (1, [11, 12, 13, 77], 1),  # guess 99 was wrong: one token; 12 and 13 unchanged
             (2, [12, 13, 14, 15], 3),  # guesses 12, 13 were right: three tokens, two fast-forwarded
             (5, [15, 1, 4, 4], 2)]  # guess 15 right: 15 and EOS
    assert _cllm.count_phenomena(trace, out) == (3, 2)
    changed = [(0, [10, 99, 12, 13], 1),
               (1, [11, 55, 13, 14], 1),  # 12 changed (not stationary); 13 and 14 right behind the wrong 55
               (2, [12, 13, 14, 15], 1),
               (3, [13, 14, 15, 1], 4)]
    assert _cllm.count_phenomena(changed, out) == (3, 2)
    # EOS cuts a pass: its fast-forwarded tokens count only up to the end of the output
    assert _cllm.count_phenomena([(0, [10, 11, 12, 1, 7, 7], 6)], [10, 11, 12, 1]) == (3, 0)
    assert _cllm.count_phenomena([(0, [10], 1), (1, [11], 1)], [10, 11]) == (0, 0)  # autoregressive


def test_decoder_counts_add_up(target, tokenizer, prompts):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    outs, st = _cllm.decode_prompts(target, [p[0].tolist() for p in prompts], 40, eos, 8, pad)
    assert outs == [greedy(target, p, 40, eos, pad) for p in prompts]
    assert st["tokens"] == sum(len(o) for o in outs) and st["calls"] == len(prompts)
    assert st["fast_forwarded_tokens"] == st["tokens"] - st["forward_passes"]
    assert st["tokens_per_pass"] == st["mean_accepted_length"]
    assert 0 <= st["stationary_tokens"] <= st["tokens"]


# ---- the method ------------------------------------------------------------------------------------------------

def small(**kw) -> CLLMConfig:
    base = dict(block_size=8, prompts=4, steps=6, batch_size=4, lr=3e-3, warmup_steps=1, max_new_tokens=24,
                heldout_prompts=2)
    return CLLMConfig(**{**base, **kw})


def test_zero_steps_is_the_reference_bit_for_bit(target, tokenizer, prompts, ctx, rows):
    applied = CLLM(small(steps=0)).apply(subject_of(target, tokenizer), RowsTask(rows), ctx)
    model = applied.subject.model
    assert model is not target
    ref = target.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())
    assert applied.cost.steps == 0 and applied.cost.seconds == 0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for p in prompts:
        with torch.inference_mode():
            out = lm.generate_ids(applied.subject, p, 40)
        assert out[0, p.shape[1]:].tolist() == greedy(target, p, 40, eos, pad)


def test_trained_model_decodes_to_its_own_greedy_output_and_is_cached(target, tokenizer, prompts, ctx, rows):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    task = RowsTask(rows)
    subject = subject_of(target, tokenizer)
    before = {k: t.clone() for k, t in target.state_dict().items()}
    applied = CLLM(small()).apply(subject, task, ctx)
    model = applied.subject.model
    assert all(torch.equal(t, before[k]) for k, t in target.state_dict().items())  # the reference is untouched
    assert any(not torch.equal(t, before[k]) for k, t in model.state_dict().items())
    for p in prompts:
        with torch.inference_mode():
            got = lm.generate_ids(applied.subject, p, 40)[0, p.shape[1]:].tolist()
        assert got == greedy(model, p, 40, eos, pad)
    s = applied.stats()
    assert s["tokens"] > 0 and s["calls"] == len(prompts)
    assert s["fast_forwarded_tokens"] == s["tokens"] - s["forward_passes"]
    for k in ("heldout_reference_tokens_per_pass", "heldout_tokens_per_pass", "heldout_identical_answers",
              "trajectory_blocks", "final_consistency_loss", "training_seconds", "trajectory_seconds"):
        assert k in s
    c = applied.cost
    assert c.steps == 6 and c.samples_seen == 24 and c.tokens_seen > 0 and c.seconds > 0
    assert c.seconds == pytest.approx(s["trajectory_seconds"] + s["training_seconds"])
    again = CLLM(small()).apply(subject, task, ctx)  # from the cache: same weights, same cost
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in again.subject.model.state_dict().items())
    assert again.cost == c
    other = CLLM(small(consistency="local")).apply(subject, task, ctx)
    assert any(not torch.equal(t, model.state_dict()[k]) for k, t in other.subject.model.state_dict().items())


def test_rows_for_training_and_held_out_are_disjoint_and_seeded():
    a, b = split_rows(100, 10, 5, seed=3)
    assert len(a) == 10 and len(b) == 5 and not set(a) & set(b) and (a, b) == split_rows(100, 10, 5, seed=3)
    assert split_rows(8, 10, 5, seed=0) == (list(range(8)), [])
    with pytest.raises(ValueError, match="empty"):
        split_rows(0, 1, 1, seed=0)


@pytest.mark.parametrize("key,value", [("block_size", "1"), ("consistency", "both"), ("steps", "-1"),
                                       ("lr", "0"), ("prompts", "0")])
def test_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(CLLMConfig(), {key: value}, owner="method 'cllm'").validate()


@pytest.mark.slow
def test_smoke_run_on_arith(tmp_path):
    from bench.runner import run

    r = run("arith", "cllm", budget="smoke", results_root=tmp_path).result
    assert r.status == "ok"
    s = r.method_stats
    assert s["forward_passes"] > 0 and s["tokens_per_pass"] >= 1
    assert s["fast_forwarded_tokens"] == s["tokens"] - s["forward_passes"]
    assert 0 < r.cost.steps <= 20 and r.cost.seconds > 0 and r.cost.tokens_seen > 0


@pytest.mark.slow
def test_smoke_run_on_gsm8k_offline(tmp_path_factory, results_root):
    """The full task through the runner on its fixture files and tiny random models (lm-eval's 5-shot contexts,
    the Qwen-style pad = EOS tokenizer setup, TrainingRows from the train.jsonl)."""
    import sys
    from pathlib import Path

    from bench.runner import run
    from bench.store import load_result

    sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers
    import full_fixtures

    with full_fixtures.full_task_env(tmp_path_factory.mktemp("full"), separate_draft=False):
        r = load_result(run("gsm8k", "cllm", budget="smoke", overrides={"max_new_tokens": "24"},
                            results_root=results_root).path, results_root)
    assert r.status == "ok" and r.task.tier == "full"
    assert 0 < r.cost.steps <= 20 and r.cost.tokens_seen > 0
    assert r.method_stats["fast_forwarded_tokens"] == r.method_stats["tokens"] - r.method_stats["forward_passes"]
