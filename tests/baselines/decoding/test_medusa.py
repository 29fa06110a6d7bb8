"""`medusa`: the heads start as the LM head, their training targets are k + 1 tokens ahead, decoding reproduces
greedy output token for token (tiny Llamas, several trees, EOS and length limits, heads that guess right and
wrong), training through `apply` on a stand-in task is cached with its cost, settings are checked, and whole
smoke runs on arith."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.decoding.jacobi import Counters
from baselines.decoding.medusa import TREES, MedusaConfig, MedusaDecoder, build_heads, build_tree, head_targets
from bench.config import ConfigError
from bench.registry import create_method
from decoding_models import RowsTask, greedy, tiny_llama
from tasks._kit import lm
from tasks.base import Subject

ACCURACY = [[0.6, 0.2, 0.1, 0.05], [0.4, 0.2, 0.1, 0.05], [0.3, 0.1, 0.1, 0.05]]  # made up, for sparse trees


def heads_for(model, k: int, noise: float, seed: int = 0):
    """Heads that start as the LM head (guessing the next token, which is right on repeated tokens), with noise
    on both layers so their guesses vary."""
    heads = build_heads(model, k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (heads.w1, heads.w2):
            p.add_(noise * heads.w2.std() * torch.randn(p.shape, generator=g))
    return heads.requires_grad_(False)


def loopy_prompts(vocab: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (1, 3 + (5 * i) % 9), generator=g) for i in range(count)]


def test_untrained_heads_predict_what_the_lm_head_predicts():
    """W_1 = 0, W_2 = the LM head (the paper's initialisation): every head's logits are the LM head's."""
    model = tiny_llama(40, seed=1)
    heads = build_heads(model, 3)
    h = torch.randn(5, 32)
    with torch.no_grad():
        out = heads(h)
        assert out.shape == (3, 5, 40)
        for k in range(3):
            torch.testing.assert_close(out[k], model.lm_head(h))


def test_head_k_is_trained_on_the_token_k_plus_1_ahead():
    """Positions t whose next token is an answer token (labels[t + 1] set); head k's target is labels[t + k + 1]."""
    model = tiny_llama(40)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8]])  # a 2-token prompt, then a 4-token answer
    logits, targets = head_targets(build_heads(model, 2), model.get_decoder(), ids, torch.ones_like(ids), labels, 2)
    assert logits.shape == (2, 4, 40)  # t = 1..4 (t = 1: the prompt's last token, whose next token is 5)
    assert targets.tolist() == [[6, 7, 8, -100], [7, 8, -100, -100]]


def test_training_on_a_tiny_vocabulary_ranks_every_token(ctx):
    """Held-out accuracies a_k[i] of rank i: with fewer tokens than TOPK every token is ranked, so each head's
    accuracies sum to 1; the reference is left untouched."""
    from baselines.decoding.medusa import train_heads

    model = tiny_llama(8, seed=5, eos=0, pad=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = []
    for p in loopy_prompts(8, 12, seed=5):
        answer = greedy(model, p, 12, eos=10_000, pad=1)
        examples.append((p[0].tolist() + answer, [-100] * p.shape[1] + answer))
    cfg = MedusaConfig(num_heads=2, steps=8, batch_size=4, warmup_steps=1)
    heads, stats, accuracy = train_heads(model, examples[:9], examples[9:], cfg, ctx, pad_id=1)
    assert stats.steps == 8 and stats.tokens_seen > 0
    assert len(accuracy) == 2 and all(len(a) == 8 and sum(a) == pytest.approx(1.0) for a in accuracy)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(heads.w1, torch.zeros_like(heads.w1))  # the heads did learn


# ---- exact greedy output ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree_name", ["chain", "dense-2", "sparse-8", "sparse-16"])
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_reproduces_greedy_on_a_model_that_repeats_itself(tree_name, noise):
    """A 16-token random Llama falls into loops, where guesses are often right: output is still the greedy one,
    and passes accept guesses."""
    model = tiny_llama(16, seed=2)
    heads = heads_for(model, 3, noise)
    counters = Counters()
    dec = MedusaDecoder(model, heads, build_tree(tree_name, ACCURACY, 3), counters)
    total = 0
    for p in loopy_prompts(16, 5, seed=1):
        with torch.no_grad():
            got = dec.generate(p, 60, None)
        assert got == greedy(model, p, 60, eos=10_000, pad=0)
        total += len(got)
    assert counters.tokens == total and counters.calls == 5
    assert counters.extra.get("accept_depth_1", 0) > 0  # the acceptance path ran
    assert counters.forward_passes < total  # fewer target passes than tokens


@pytest.mark.parametrize("tree_name", ["chain", "dense-2", "sparse-16"])
def test_reproduces_greedy_with_the_arith_tokenizer(target, tokenizer, prompts, tree_name):
    """An 883-token random Llama: guesses are mostly wrong, so most passes reject every node."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    dec = MedusaDecoder(target, heads_for(target, 4, 0.3), build_tree(tree_name, ACCURACY + [[0.2]], 4), Counters())
    for ids in prompts:
        with torch.no_grad():
            assert dec.generate(ids, 40, eos) == greedy(target, ids, 40, eos, pad)


@pytest.mark.parametrize("max_new", [1, 2, 5, 17, 40])
def test_stops_at_eos_and_at_max_new_tokens(max_new):
    model = tiny_llama(16, seed=2)
    dec = MedusaDecoder(model, heads_for(model, 3, 0.2), build_tree("dense-2", ACCURACY, 3), Counters())
    for p in loopy_prompts(16, 4, seed=3):
        free = greedy(model, p, 40, eos=10_000, pad=0)
        for eos in (free[0], free[3], free[11], 10_000):  # first token, inside, later, never
            with torch.no_grad():
                got = dec.generate(p, max_new, eos)
            assert got == greedy(model, p, max_new, eos=eos, pad=0)
            assert len(got) <= max_new and eos not in got[:-1]


def test_a_tree_deeper_than_the_heads_is_refused():
    model = tiny_llama(16)
    with pytest.raises(ValueError, match="3 deep but there are 2 heads"):
        MedusaDecoder(model, build_heads(model, 2), build_tree("chain", ACCURACY, 3), Counters())


@pytest.mark.parametrize("name", TREES)
def test_every_preset_is_a_tree_within_the_heads(name):
    tree = build_tree(name, [[0.5, 0.3, 0.1, 0.05, 0.02]] * 4, 4)
    assert 1 <= tree.max_depth <= 4 and tree.size > 1
    if name.startswith("sparse-"):
        assert tree.size - 1 == int(name.split("-")[1])


# ---- apply: training, cache, cost, statistics ---------------------------------------------------------------

def test_apply_trains_caches_and_decodes_exactly(target, tokenizer, arith_task, prompts, smoke_ctx):
    model = copy.deepcopy(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    subject = Subject(model, "causal-lm", {"tokenizer": tokenizer})
    task = RowsTask(arith_task.train[:200])
    method = create_method("medusa", {"num_heads": "3", "tree": "sparse-8"})
    applied = method.apply(subject, task, smoke_ctx)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the reference is frozen
    assert applied.cost.steps == 20 and applied.cost.seconds > 0 and applied.cost.tokens_seen > 0
    assert "greedy answers" in applied.cost.description and "AdamW steps of 3 heads" in applied.cost.description
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids in prompts[:2]:
        with torch.no_grad():
            out = lm.generate_ids(applied.subject, ids, 30)
        assert out[0, :ids.shape[1]].tolist() == ids[0].tolist()
        assert out[0, ids.shape[1]:].tolist() == greedy(model, ids, 30, eos, pad)
    s = applied.stats()
    assert s["mean_accepted_length"] == pytest.approx(s["tokens"] / s["forward_passes"]) and s["calls"] == 2
    assert s["tree_nodes"] == 8 and s["head_macs_per_pass"] > 0 and s["target_seconds_per_pass"] > 0
    assert {f"heldout_top1_head_{k}" for k in (1, 2, 3)} <= set(s)
    assert all(0 <= s[f"accept_depth_{d}"] <= 1 for d in range(1, int(s["tree_depth"]) + 1))
    # a second apply reads the heads and their cost from the cache, whatever the tree
    again = create_method("medusa", {"num_heads": "3", "tree": "chain"})
    heads, meta, built = again.train(subject, task, smoke_ctx)
    first, _, _ = method.train(subject, task, smoke_ctx)
    assert not built and all(torch.equal(a, b) for a, b in zip(heads.parameters(), first.parameters()))
    assert again.apply(subject, task, smoke_ctx).cost.seconds == applied.cost.seconds


# ---- settings and contracts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [("tree", "sparse-12", "not one of"), ("num_heads", "0", "num_heads"),
                                             ("num_heads", "9", "num_heads"), ("decay", "1.5", "decay"),
                                             ("steps", "0", "steps"), ("lr", "0", "lr")])
def test_invalid_settings_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        create_method("medusa", {key: value})


def test_defaults_validate_and_name_a_preset():
    cfg = MedusaConfig()
    cfg.validate()
    assert cfg.tree in TREES


def test_an_attention_that_ignores_4d_masks_is_refused(target, tokenizer, ctx):
    model = copy.deepcopy(target)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        create_method("medusa").apply(Subject(model, "causal-lm", {"tokenizer": tokenizer}), RowsTask([]), ctx)


@pytest.mark.slow
def test_smoke_run_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "medusa", budget="smoke", results_root=results_root).result
    assert r.status == "ok"
    assert r.fidelity.value == 1.0 and r.quality.delta == 0  # greedy: the reference's answers, token for token
    s = r.method_stats
    assert s["mean_accepted_length"] >= 1 and s["forward_passes"] > 0 and 0 <= s["accept_depth_1"] <= 1
    assert r.cost.steps == 20 and r.cost.seconds > 0
