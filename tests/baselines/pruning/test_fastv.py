"""fastv: keeping every visual token is the reference bit for bit; after layer K the later layers see and cache the
text plus round(R |V|) visual tokens, the ones the text attended to most in layer K (checked against eager
attention's own probabilities); MACs fall with R."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError


def applied(subject, task, **config):
    from baselines.pruning.fastv import FastV, FastVConfig
    from pruning_models import vlm_context

    return FastV(FastVConfig(**config)).apply(subject, task, vlm_context())


def two_image_question(task):
    return task.inputs(next(q for q in task.test if len(q["images"]) == 2), "test")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_keeping_every_visual_token_is_the_reference_bit_for_bit(vlm_subject, digits_vlm, k):
    from baselines.pruning import _visual
    from baselines.pruning.fastv import prune_after
    from tasks.digits_vlm import answer_ids

    out = applied(vlm_subject, digits_vlm, layer=k, keep_ratio=1.0)
    for q in digits_vlm.test[:6]:
        ids, pix = digits_vlm.inputs(q, "test")
        assert torch.equal(answer_ids(out.subject, ids, pix, 4), answer_ids(vlm_subject, ids, pix, 4))
    ids, pix = two_image_question(digits_vlm)
    with torch.no_grad():
        full = vlm_subject.model(input_ids=ids, pixel_values=pix, logits_to_keep=1).logits[0, -1]
        h, _ = _visual.prefill(vlm_subject.model, ids, pix, digits_vlm.image_token_id, prune_after(k, 1.0),
                               _visual.VisualCounts())
    assert torch.equal(_visual.next_logits(vlm_subject.model, h), full)


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.25), (3, 0.1), (2, 0.0)])
def test_after_layer_k_the_later_layers_see_and_cache_the_kept_tokens_only(vlm_subject, digits_vlm, k, ratio):
    from baselines.pruning import _visual
    from baselines.pruning.fastv import prune_after

    ids, pix = two_image_question(digits_vlm)
    length, visual = ids.shape[1], 128
    kept = length - visual + round(ratio * visual)
    layers = vlm_subject.model.model.language_model.layers
    seen = [[] for _ in layers]
    hooks = [l.register_forward_pre_hook(lambda m, a, kw, i=i: seen[i].append(kw["position_ids"].shape[1]),
                                         with_kwargs=True) for i, l in enumerate(layers)]
    counts = _visual.VisualCounts()
    try:
        with torch.no_grad():
            _, cache = _visual.prefill(vlm_subject.model, ids, pix, digits_vlm.image_token_id, prune_after(k, ratio),
                                       counts)
    finally:
        for hk in hooks:
            hk.remove()
    expect = [length if i < k else kept for i in range(4)]
    assert [s[0] for s in seen] == expect and [l.get_seq_length() for l in cache.layers] == expect
    assert counts.as_dict()["visual_kept_after_drop"] == round(ratio * visual) / visual


def test_the_kept_tokens_are_those_the_text_attends_to_most_in_layer_k(vlm_subject, digits_vlm):
    """FastV's score recomputed from the cached keys equals eager attention's probabilities of layer K, averaged
    over the heads and the text queries, and the kept visual positions are its top round(R |V|)."""
    from baselines.pruning import _visual
    from baselines.pruning.fastv import prune_after

    model = vlm_subject.model
    ids, pix = two_image_question(digits_vlm)
    visual = (ids[0] == digits_vlm.image_token_id)
    k, ratio = 2, 0.25
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            probs = model(input_ids=ids, pixel_values=pix, output_attentions=True).attentions[k - 1][0]
    finally:
        model.set_attn_implementation(previous)
    expected = probs[:, ~visual].mean(dim=(0, 1))[visual]
    captured = {}
    select = prune_after(k, ratio)

    def spy(i, h, vis, state):
        keep = select(i, h, vis, state)
        if keep is not None:
            captured["keep"] = keep
            layer = model.model.language_model.layers[k - 1]
            captured["scores"] = _visual.text_to_visual_attention(layer, captured["h"], vis, state,
                                                                  state.cache.layers[k - 1].keys)
        if i == k - 1:
            captured["h"] = h
        return keep

    with torch.no_grad():
        _visual.prefill(model, ids, pix, digits_vlm.image_token_id, spy, _visual.VisualCounts())
    torch.testing.assert_close(captured["scores"], expected.float(), rtol=1e-4, atol=1e-6)
    where = visual.nonzero().flatten()
    top = set(where[expected.topk(round(ratio * 128)).indices].tolist())
    kept_visual = set(captured["keep"].tolist()) & set(where.tolist())
    assert kept_visual == top and set((~visual).nonzero().flatten().tolist()) <= set(captured["keep"].tolist())


def test_macs_fall_as_fewer_visual_tokens_are_kept(vlm_subject, digits_vlm):
    from bench.measure import count_macs

    ids, pix = two_image_question(digits_vlm)
    macs = []
    for ratio in (1.0, 0.5, 0.25, 0.0):
        s = applied(vlm_subject, digits_vlm, layer=2, keep_ratio=ratio).subject
        macs.append(count_macs(lambda: s.extra["generate"](s, ids, pix, 1)))
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4


def test_bad_settings_and_models_are_refused_by_name(vlm_subject, digits_vlm, llama_subject, arith):
    with pytest.raises(ConfigError, match="1 <= layer <= 4"):
        applied(vlm_subject, digits_vlm, layer=5)
    with pytest.raises(ConfigError, match="layer"):
        applied(vlm_subject, digits_vlm, layer=0)
    with pytest.raises(ConfigError, match="0 <= keep_ratio <= 1"):
        applied(vlm_subject, digits_vlm, keep_ratio=1.5)
    with pytest.raises(ConfigError, match="LLaVA-style"):
        applied(llama_subject, arith)


def test_fastv_runs_end_to_end_and_records_what_it_kept(results_root):
    from bench.runner import run
    from bench.store import load_result

    r = load_result(run("digits-vlm", "fastv", budget="smoke", overrides={"layer": "2", "keep_ratio": "0.25"},
                        results_root=results_root).path, results_root)
    assert r.status == "ok" and r.method.family == "pruning"
    assert r.method_stats["visual_kept_after_drop"] == 0.25 and r.method_stats["layer"] == 2
    assert r.compute.method < r.compute.reference
