"""`layer-drop`: block influence equals a direct computation, dropping no block leaves the outputs unchanged,
and dropped blocks are really gone (fewer parameters, a smaller KV cache, generation still works)."""

from __future__ import annotations

import pytest
import torch

from baselines.pruning import _calib
from baselines.pruning.layer_drop import block_influence, drop_blocks
from bench.config import ConfigError
from bench.registry import create_method


def direct_influence(model, blocks, batches) -> list[float]:
    """1 - mean cos(input, output) of each block over the real tokens, from hidden states the model itself
    returns (`output_hidden_states`); the last block's output is taken before any final norm, by a hook."""
    last = []
    h = blocks[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out))
    sums, counts = [0.0] * len(blocks), 0
    with torch.no_grad():
        for b in batches:
            last.clear()
            hs = model(**_calib.model_kwargs(b), output_hidden_states=True).hidden_states
            states = list(hs[:len(blocks)]) + [last[0]]
            mask = b["attention_mask"].bool()
            for i in range(len(blocks)):
                sums[i] += float(torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)[mask]
                                 .double().sum())
            counts += int(mask.sum())
    h.remove()
    return [1 - s / counts for s in sums]


def test_block_influence_matches_a_direct_computation_on_a_llama(llama_subject, arith, ctx):
    model = llama_subject.model
    batches = _calib.calibration_batches(arith, llama_subject, ctx, 12, batch=5)
    got = block_influence(model, batches)
    want = direct_influence(model, model.model.layers, batches)
    assert got == pytest.approx(want, abs=1e-5) and len(got) == 3


def test_block_influence_matches_a_direct_computation_on_a_bert(bert_subject, nli, ctx):
    hf = bert_subject.model.hf
    batches = _calib.calibration_batches(nli, bert_subject, ctx, 12, batch=5)
    assert block_influence(hf, batches) == pytest.approx(direct_influence(hf, hf.bert.encoder.layer, batches),
                                                         abs=1e-5)


def test_dropping_no_block_leaves_the_outputs_unchanged(llama_subject, arith, ctx, prompt_ids):
    out = create_method("layer-drop", {"layers": "0"}).apply(llama_subject, arith, ctx)
    with torch.no_grad():
        assert torch.equal(out.subject.model(prompt_ids).logits, llama_subject.model(prompt_ids).logits)
    assert out.stats()["blocks_after"] == 3


def test_the_lowest_influence_blocks_are_removed_for_real(llama_subject, arith, ctx, prompt_ids):
    from tasks._kit import lm

    ref = llama_subject.model
    out = create_method("layer-drop", {"layers": "2"}).apply(llama_subject, arith, ctx)
    stats = out.stats()
    bi = [stats[f"block_influence_{i}"] for i in range(3)]
    (kept,) = [i for i in range(3) if i not in (stats["dropped_block_0"], stats["dropped_block_1"])]
    assert bi[kept] == max(bi)
    model = out.subject.model
    assert len(model.model.layers) == model.config.num_hidden_layers == 1
    assert model.model.layers[0].self_attn.layer_idx == 0  # its KV-cache slot, renumbered
    per_block = sum(p.numel() for p in ref.model.layers[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters()) - 2 * per_block
    for k, v in model.model.layers[0].state_dict().items():  # the kept block's weights are untouched
        assert torch.equal(v, ref.model.layers[kept].state_dict()[k])
    ids = lm.generate_ids(out.subject, prompt_ids, 6)  # generation with a one-block KV cache
    manual = prompt_ids
    with torch.no_grad():
        for _ in range(ids.shape[1] - prompt_ids.shape[1]):
            manual = torch.cat([manual, model(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ids, manual)


def test_dropping_every_block_is_refused_with_the_valid_range(llama_subject, arith, ctx):
    with pytest.raises(ConfigError, match="valid: 0 to 2"):
        create_method("layer-drop", {"layers": "3"}).apply(llama_subject, arith, ctx)


def test_drop_blocks_on_a_bert_keeps_it_running(bert_subject, nli):
    hf = bert_subject.model.hf
    drop_blocks(hf, [0])
    assert len(hf.bert.encoder.layer) == hf.config.num_hidden_layers == 1
    with torch.no_grad():
        assert bert_subject.model(nli.test.x[:4]).shape == (4, 2)
