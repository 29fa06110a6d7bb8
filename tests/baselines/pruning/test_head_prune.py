"""`head-prune`: slicing no head leaves the outputs unchanged, slicing heads removes exactly their parameters
and computes what the unsliced model computes with those heads' outputs zeroed, and the importance is
Michel et al.'s |dL/d xi_h| computed directly."""

from __future__ import annotations

import pytest
import torch

from baselines.pruning import _calib
from baselines.pruning.head_prune import attention_modules, choose_heads, head_importance, prune_heads
from bench.config import ConfigError
from bench.registry import create_method


def head_params(hidden: int, d: int) -> int:
    return 3 * (d * hidden + d) + hidden * d  # Q, K, V rows with their biases, and the output columns


def masked_heads(model, remove: dict[int, list[int]]):
    """Hooks that zero the given heads' outputs in the unsliced model (what slicing must reproduce)."""
    handles = []
    for li, att in enumerate(attention_modules(model)):
        d, hs = att.self.attention_head_size, remove.get(li, [])

        def hook(m, args, _hs=hs, _d=d):
            x = args[0].clone()
            for h in _hs:
                x[..., h * _d:(h + 1) * _d] = 0
            return (x,)

        handles.append(att.output.dense.register_forward_pre_hook(hook))
    return handles


def test_no_head_removed_leaves_the_outputs_unchanged(bert_subject, nli, ctx):
    x = nli.test.x[:16]
    with torch.no_grad():
        before = bert_subject.model(x)
    out = create_method("head-prune", {"share": "0"}).apply(bert_subject, nli, ctx)
    prune_heads(bert_subject.model.hf, {0: [], 1: []})  # slicing an empty set is the identity too
    with torch.no_grad():
        assert torch.equal(out.subject.model(x), before) and torch.equal(bert_subject.model(x), before)
    assert out.stats()["heads_after"] == 8


def test_removing_heads_cuts_exactly_their_parameters_and_equals_zeroing_them(bert_subject, nli):
    model = bert_subject.model
    x = nli.test.x[:16]
    remove = {0: [1, 3], 1: [0]}
    handles = masked_heads(model.hf, remove)
    with torch.no_grad():
        want = model(x)
    for h in handles:
        h.remove()
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model.hf, remove)
    cfg = model.hf.config
    d = cfg.hidden_size // cfg.num_attention_heads
    assert sum(p.numel() for p in model.parameters()) == before - 3 * head_params(cfg.hidden_size, d)
    atts = attention_modules(model.hf)
    assert [a.self.num_attention_heads for a in atts] == [2, 3] and atts[0].self.query.out_features == 2 * d
    assert cfg.pruned_heads == {"0": [1, 3], "1": [0]}
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_importance_is_the_mean_absolute_gate_gradient(bert_subject, nli, ctx):
    hf = bert_subject.model.hf
    batches = _calib.calibration_batches(nli, bert_subject, ctx, 6, batch=3)
    got = head_importance(hf, batches)
    # directly: one example at a time, a gate per head on the context, |dL/dgate| averaged over examples
    atts = attention_modules(hf)
    want = [torch.zeros(4, dtype=torch.float64) for _ in atts]
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            one = {k: v[r:r + 1] for k, v in b.items()}
            gates = [torch.ones(4, requires_grad=True) for _ in atts]
            hs = [a.output.dense.register_forward_pre_hook(
                lambda m, a_, _g=g, _d=a.self.attention_head_size: (a_[0] * _g.repeat_interleave(_d),))
                for a, g in zip(atts, gates)]
            loss = hf(**_calib.model_kwargs(one)).logits.log_softmax(-1)[0, one["labels"][0]].neg()
            for w, g in zip(want, torch.autograd.grad(loss, gates)):
                w += g.abs().double() / 6
            for h in hs:
                h.remove()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-9)


def test_heads_are_chosen_globally_after_per_layer_normalisation_keeping_one_per_layer():
    imp = [torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.1, 0.2, 0.2, 0.1])]
    assert choose_heads(imp, 0.25) == {0: [2, 3], 1: []}
    removed = choose_heads(imp, 0.875)  # 7 of 8 asked, but every layer keeps one head
    assert {li: len(h) for li, h in removed.items()} == {0: 3, 1: 3}


def test_the_method_prunes_half_the_heads_and_is_smaller(bert_subject, nli, ctx):
    out = create_method("head-prune", {"calibration_samples": "32"}).apply(bert_subject, nli, ctx)
    stats = out.stats()
    assert stats["heads_before"] == 8 and stats["heads_after"] == 4
    ref_params = sum(p.numel() for p in bert_subject.model.parameters())
    assert sum(p.numel() for p in out.subject.model.parameters()) == ref_params - 4 * head_params(32, 8)
    with torch.no_grad():
        assert out.subject.model(nli.test.x[:4]).shape == (4, 2)


def test_a_model_without_bert_attention_is_refused(llama_subject, arith, ctx):
    with pytest.raises(ConfigError, match="BERT-style encoders"):
        attention_modules(llama_subject.model)
