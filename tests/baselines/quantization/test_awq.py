"""`awq`: all scales 1 is round-to-nearest, the folded scales leave the float model's function unchanged, the
searched scales never do worse than round-to-nearest on the calibration data (and do better with outlier
channels), the Llama quantized with its norms carrying the scales, and a whole smoke run on arith."""

from __future__ import annotations

import sys
from pathlib import Path
import copy

import pytest
import torch

from baselines.quantization import _quant, _smooth
from baselines.quantization.awq import awq_scale, scaled_fake_quantize, search_alpha
from bench.config import ConfigError
from bench.registry import create_method

sys.path.insert(0, str(Path(__file__).parent))  # quant_fixtures, under --import-mode=importlib

from quant_fixtures import (arith, calibration_layer, ctx, layer_error, llama_subject,  # noqa: E402,F401
                            one_thread, prompt_ids)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 16, False), (3, None, False), (4, 32, True)])
def test_all_scales_one_is_round_to_nearest(bits, group_size, symmetric):
    w, x, _ = calibration_layer()
    ones = awq_scale(x.abs().mean(dim=0), 0.0)
    assert torch.equal(ones, torch.ones(64))
    assert torch.equal(scaled_fake_quantize(w, ones, bits, group_size, symmetric),
                       _quant.fake_quantize(w, bits, group_size, symmetric))


def test_alpha_zero_quantizes_the_llama_exactly_as_round_to_nearest(llama_subject, arith, ctx):
    out = create_method("awq", {"alpha": "0", "group_size": "16", "calibration_samples": "8"}).apply(
        llama_subject, arith, ctx)
    for (k, a), b in zip(llama_subject.model.state_dict().items(), out.subject.model.state_dict().values()):
        block_linear = ".layers." in k and k.endswith("_proj.weight")
        assert torch.equal(b, _quant.fake_quantize(a, 4, 16) if block_linear else a), k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,group_size", [(4, 16), (3, 32), (4, None)])
def test_searched_scales_beat_round_to_nearest_on_outlier_channels(seed, bits, group_size):
    w, x, _ = calibration_layer(seed=seed)
    alpha, s, losses = search_alpha([w], x, bits, group_size)
    assert sorted(losses) == [k / 20 for k in range(20)] and losses[alpha] == min(losses.values())
    err = layer_error(w, scaled_fake_quantize(w, s, bits, group_size), x)
    assert alpha > 0 and err < layer_error(w, _quant.fake_quantize(w, bits, group_size), x)


@pytest.mark.parametrize("folding", [True, False])
def test_folded_scales_leave_the_float_model_unchanged(llama_subject, prompt_ids, folding):
    """Random scales on every group (norms, v->o and up->down rows, or input multipliers) before quantization."""
    model = copy.deepcopy(llama_subject.model)
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for block in model.model.layers:
        for g in _smooth.groups(block, folding=folding):
            n_in = dict(block.named_modules())[g.names[0]].in_features
            _smooth.apply_scale(block, g, torch.rand(n_in, generator=gen) * 4 + 0.1)
            kinds.add(g.kind)
    assert kinds == ({"norm", "rows"} if folding else {None})
    with torch.no_grad():
        a = llama_subject.model(prompt_ids).logits
        b = model(prompt_ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    if folding:  # nothing left behind as a multiplier, and the Llama's four groups per block
        assert not any(isinstance(m, _smooth.InputScaled) for m in model.modules())
        assert [g.kind for g in _smooth.groups(model.model.layers[0])] == ["norm", "rows", "norm", "rows"]


def test_quantizes_a_llama_with_searched_scales_and_keeps_it_running(llama_subject, arith, ctx, prompt_ids):
    from baselines.pruning import _calib
    from tasks._kit import lm

    out = create_method("awq", {"group_size": "16", "calibration_samples": "32"}).apply(llama_subject, arith, ctx)
    model = out.subject.model
    for lin in _calib.all_block_linears(model):
        groups = lin.weight.reshape(lin.out_features, -1, 16)
        assert max(len(torch.unique(groups[r, g])) for r in range(groups.shape[0])
                   for g in range(groups.shape[1])) <= 16
    ref_norm = llama_subject.model.model.layers[0].input_layernorm.weight
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, ref_norm)  # scales folded there
    assert out.runtime_low_precision is False and out.quantization["weight_bits"] == 4
    s = out.stats()
    assert s["scaled_groups"] == 4 * len(model.model.layers) and 0 <= s["mean_alpha"] < 1
    assert lm.generate_ids(out.subject, prompt_ids, 5).shape[1] > prompt_ids.shape[1]


def test_four_bits_in_kernel_groups_run_on_the_int4_kernel_as_the_fake_quantized_weights(llama_subject, arith, ctx,
                                                                                         prompt_ids):
    from baselines.quantization import _kernels

    out = create_method("awq", {"group_size": "32", "calibration_samples": "8"}).apply(llama_subject, arith, ctx)
    _, int4 = _kernels.weight_only_classes()
    model = out.subject.model
    layers = [m for m in model.modules() if isinstance(m, int4)]
    assert out.runtime_low_precision is True and len(layers) == 7 * len(model.model.layers)
    twin = copy.deepcopy(model)  # the same codes as float Linears
    for name, m in list(twin.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, int4):
                lin = torch.nn.Linear(c.in_features, c.out_features, bias=c.bias is not None)
                lin.weight.data = c.dequantized()
                setattr(m, cname, lin)
    with torch.no_grad():
        a, b = model(prompt_ids).logits, twin(prompt_ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert out.stats()["int4_kernel_calls"] >= len(layers) and out.stats()["int4_kernel_layers"] == len(layers)


@pytest.mark.parametrize("bad,word", [({"bits": "6"}, "2, 3, 4, 8"), ({"alpha": "1.5"}, "alpha"),
                                      ({"group_size": "0"}, "group_size")])
def test_bad_settings_name_the_valid_ones(bad, word):
    with pytest.raises(ConfigError, match=word):
        create_method("awq", bad)


@pytest.mark.slow  # minutes: the runner times the reference and the method in pairs
def test_smoke_run_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "awq", budget="smoke", results_root=results_root).result
    assert r.status == "ok" and r.method.family == "quantization"
    assert r.size.runtime_low_precision is True and r.method_stats["int4_kernel_calls"] > 0  # 4-bit g64
    q = r.size.quantization
    assert q.weight_bits == 4 and q.group_size == 64 and q.serialized_bytes == r.size.method.bytes
    assert r.size.method.bytes < r.size.reference.bytes / 2 and r.method_stats["scaled_groups"] > 0
