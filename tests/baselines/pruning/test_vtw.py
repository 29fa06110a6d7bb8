"""vtw: withdrawal after the last layer is the reference bit for bit; after layer K the later layers see and cache
the text tokens only, and MACs fall with K; the KL criterion picks the shallowest layer within its threshold."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError

QUESTIONS = 6


def answers(subject, task, n=QUESTIONS):
    from tasks.digits_vlm import answer_ids

    return [answer_ids(subject, *task.inputs(q, "test"), 4) for q in task.test[:n]]


def applied(subject, task, **config):
    from baselines.pruning.vtw import VTW, VTWConfig
    from pruning_models import vlm_context

    return VTW(VTWConfig(**config)).apply(subject, task, vlm_context())


def seen_lengths(model, fn):
    """The sequence length each decoder layer is called with, per call, while `fn` runs."""
    layers = model.model.language_model.layers
    seen = [[] for _ in layers]
    hooks = [l.register_forward_pre_hook(lambda m, a, k, i=i: seen[i].append((a[0] if a else k["hidden_states"])
                                                                           .shape[1]), with_kwargs=True)
             for i, l in enumerate(layers)]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_withdrawal_after_the_last_layer_is_the_reference_bit_for_bit(vlm_subject, digits_vlm):
    from baselines.pruning import _visual
    from baselines.pruning.vtw import withdraw_at

    n = vlm_subject.extra["num_layers"]
    out = applied(vlm_subject, digits_vlm, layer=n)
    assert all(torch.equal(a, b) for a, b in zip(answers(out.subject, digits_vlm), answers(vlm_subject, digits_vlm)))
    model = vlm_subject.model
    for q in digits_vlm.test[:3]:  # the prefill's logits too, against LLaVA's own forward
        ids, pix = digits_vlm.inputs(q, "test")
        with torch.no_grad():
            full = model(input_ids=ids, pixel_values=pix, logits_to_keep=1).logits[0, -1]
            h, _ = _visual.prefill(model, ids, pix, digits_vlm.image_token_id, withdraw_at(n), _visual.VisualCounts())
            assert torch.equal(_visual.next_logits(model, h), full)
    assert out.stats()["visual_token_layers_kept"] == 1.0 and out.stats()["kv_kept_fraction"] == 1.0


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_after_layer_k_the_later_layers_see_and_cache_the_text_only(vlm_subject, digits_vlm, k):
    from baselines.pruning import _visual
    from baselines.pruning.vtw import withdraw_at

    q = next(q for q in digits_vlm.test if len(q["images"]) == 2)
    ids, pix = digits_vlm.inputs(q, "test")
    length, visual = ids.shape[1], int((ids == digits_vlm.image_token_id).sum())
    assert visual == 128
    out = applied(vlm_subject, digits_vlm, layer=k)
    result = {}
    seen = seen_lengths(vlm_subject.model, lambda: result.setdefault(
        "ids", out.subject.extra["generate"](out.subject, ids, pix, 3)))
    new = result["ids"].shape[1] - length
    for i, calls in enumerate(seen):  # the prefill, then one token per decoding step
        assert calls == [length if i < k else length - visual] + [1] * (new - 1)
    counts = _visual.VisualCounts()
    with torch.no_grad():
        _, cache = _visual.prefill(vlm_subject.model, ids, pix, digits_vlm.image_token_id, withdraw_at(k), counts)
    assert [l.get_seq_length() for l in cache.layers] == [length if i < k else length - visual for i in range(4)]
    assert counts.as_dict()["visual_token_layers_kept"] == k / 4 and counts.drop_layers == [k]


def test_macs_fall_with_every_layer_withdrawn_earlier(vlm_subject, digits_vlm):
    from bench.measure import count_macs

    ids, pix = digits_vlm.inputs(digits_vlm.test[1], "test")
    macs = []
    for k in range(5):
        s = applied(vlm_subject, digits_vlm, layer=k).subject
        macs.append(count_macs(lambda: s.extra["generate"](s, ids, pix, 1)))
    assert macs == sorted(macs) and len(set(macs)) == 5


def test_the_kl_criterion_takes_the_shallowest_layer_within_the_threshold(vlm_subject, digits_vlm):
    from baselines.pruning.vtw import choose_layer, kl_by_layer

    assert choose_layer([3.0, 0.5, 0.004, 0.02, 0.0], 0.01) == 2
    assert choose_layer([3.0, 0.5, 0.2, 0.02, 0.0], 0.01) == 4
    examples = vlm_subject.extra["calibration"](4, 0)
    kls = kl_by_layer(vlm_subject.model, examples, digits_vlm.image_token_id, vlm_subject.extra["stop"].eos_ids, 4)
    assert len(kls) == 5 and kls[-1] == 0.0 and all(v >= 0 for v in kls)
    assert kls[0] > 0.1  # with no image at all, the answers' distributions move
    out = applied(vlm_subject, digits_vlm, calibration_samples=4, kl_threshold=1e9)  # everything passes: K = 0
    assert out.stats()["layer"] == 0 and out.cost.samples_seen == 4 and out.cost.seconds > 0
    out = applied(vlm_subject, digits_vlm, calibration_samples=4)
    assert out.stats()["layer"] == choose_layer(kls, 0.01)


def test_bad_settings_and_models_are_refused_by_name(vlm_subject, digits_vlm, llama_subject, arith):
    with pytest.raises(ConfigError, match="0 <= layer <= 4"):
        applied(vlm_subject, digits_vlm, layer=5)
    with pytest.raises(ConfigError, match="layer"):
        applied(vlm_subject, digits_vlm, layer=-1)
    with pytest.raises(ConfigError, match="LLaVA-style"):
        applied(llama_subject, arith, layer=1)


def test_vtw_runs_end_to_end_and_records_what_it_kept(results_root):
    from bench.runner import run
    from bench.store import load_result

    r = load_result(run("digits-vlm", "vtw", budget="smoke", overrides={"layer": "2"},
                        results_root=results_root).path, results_root)
    assert r.status == "ok" and r.method.family == "pruning"
    assert r.method_stats["visual_token_layers_kept"] == 0.5 and r.method_stats["visual_kept_after_drop"] == 0.0
    assert r.compute.method < r.compute.reference
