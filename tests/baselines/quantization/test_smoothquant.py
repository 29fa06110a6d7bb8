"""`smoothquant`: the smoothed (folded) model is the original before quantization, the scales balance each
channel's activation and weight maxima at alpha 0.5, W8A8 on the int8 kernels with the record's fields, a model
without foldable norms refused, and a whole smoke run on arith."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from baselines.pruning import _calib
from baselines.quantization import _kernels, _smooth
from baselines.quantization.smoothquant import smooth_model, smooth_scale
from bench.config import ConfigError
from bench.registry import create_method

sys.path.insert(0, str(Path(__file__).parent))  # quant_fixtures, under --import-mode=importlib

from quant_fixtures import arith, ctx, llama_subject, one_thread, prompt_ids  # noqa: E402,F401


def norm_group_inputs(model, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs [tokens, in] of the first Linear of every norm-read group, by (block, name), from the model as is."""
    out: dict = {}
    inputs = _calib.capture_block_inputs(model, batches)
    for i, block in enumerate(_calib.find_blocks(model)[2]):
        names = {g.names[0] for g in _smooth.groups(block) if g.kind == "norm"}
        _calib.collect_linear_inputs(block, inputs, lambda n, x: n in names and out.setdefault((i, n), []).append(x))
        outs = _calib.run_block(block, inputs)
        inputs = [type(inp)(h, inp.args, inp.kwargs, inp.mask) for inp, h in zip(inputs, outs)]
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.fixture
def batches(arith, llama_subject, ctx):
    return _calib.calibration_batches(arith, llama_subject, ctx, 16)


@pytest.mark.parametrize("alpha", [0.5, 0.85, 1.0])
def test_the_smoothed_model_is_the_original_before_quantization(llama_subject, batches, prompt_ids, alpha):
    model = copy.deepcopy(llama_subject.model)
    assert smooth_model(model, batches, alpha) == 5 * len(model.model.layers)  # q, k, v, gate, up
    ref_norm = llama_subject.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, ref_norm)
    with torch.no_grad():
        a, b = llama_subject.model(prompt_ids).logits, model(prompt_ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, _smooth.InputScaled) for m in model.modules())  # all folded into norms


def test_at_alpha_one_half_each_channel_has_equal_activation_and_weight_maxima(llama_subject, batches):
    """max|X_j / s_j| = max|X_j|^(1/2) max|W_j|^(1/2) = max|W_j s_j|: the difficulty split evenly (section 4)."""
    model = copy.deepcopy(llama_subject.model)
    smooth_model(model, batches, 0.5)
    for (i, name), x in norm_group_inputs(model, batches).items():
        block = model.model.layers[i]
        g = next(g for g in _smooth.groups(block) if g.names[0] == name)
        w_max = torch.stack([dict(block.named_modules())[n].weight.abs().amax(dim=0) for n in g.names]).amax(dim=0)
        assert torch.allclose(x.abs().amax(dim=0), w_max, rtol=1e-4, atol=1e-6), (i, name)


def test_smooth_scale_is_equation_four():
    x_max, w1, w2 = torch.tensor([8.0, 1.0, 0.5]), torch.tensor([[2.0, -1.0, 4.0]]), torch.tensor([[-3.0, 0.5, 1.0]])
    s = smooth_scale(x_max, [w1, w2], 0.75)
    assert torch.allclose(s, x_max ** 0.75 / torch.tensor([3.0, 1.0, 4.0]) ** 0.25)


def test_w8a8_runs_on_the_int8_kernels(llama_subject, arith, ctx, prompt_ids):
    from tasks._kit import lm

    out = create_method("smoothquant", {"calibration_samples": "16"}).apply(llama_subject, arith, ctx)
    model = out.subject.model
    int8 = _kernels.int8_linear_class()
    layers = [m for m in model.modules() if isinstance(m, int8)]
    assert len(layers) == 7 * len(model.model.layers) and isinstance(model.lm_head, torch.nn.Linear)
    assert out.runtime_low_precision is True
    q = out.quantization
    assert q["weight_bits"] == 8 and q["activation_bits"] in (7, 8) and q["group_size"] is None
    float_bytes = sum(p.numel() * 4 for p in llama_subject.model.parameters())
    int8_bytes = sum(m.weight_int8.numel() + 2 * m.out_features for m in layers)  # codes and float16 scales
    assert q["serialized_bytes"] == float_bytes - 4 * sum(m.weight_int8.numel() for m in layers) + int8_bytes
    assert lm.generate_ids(out.subject, prompt_ids, 5).shape[1] > prompt_ids.shape[1]
    s = out.stats()
    assert s["smoothed_linears"] == 5 * len(model.model.layers) and s["int8_kernel_calls"] >= len(layers)
    with torch.no_grad():  # the quantized model stays close to the original on a prompt
        a, b = llama_subject.model(prompt_ids).logits, model(prompt_ids).logits
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


def test_a_model_without_foldable_norms_is_refused(arith, ctx):
    from quant_fixtures import tiny_llama

    model = tiny_llama(arith.tokenizer)
    for block in model.model.layers:
        block.input_layernorm = torch.nn.Identity()
        block.post_attention_layernorm = torch.nn.Identity()
    with pytest.raises(ValueError, match="input_layernorm, post_attention_layernorm"):
        create_method("smoothquant", {"calibration_samples": "4"}).apply(arith.prepare(model, ctx), arith, ctx)


@pytest.mark.parametrize("bad,word", [({"alpha": "1.5"}, "alpha"), ({"calibration_samples": "0"}, "calibration")])
def test_bad_settings_name_the_valid_ones(bad, word):
    with pytest.raises(ConfigError, match=word):
        create_method("smoothquant", bad)


@pytest.mark.slow  # minutes: the runner times the reference and the method in pairs
def test_smoke_run_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "smoothquant", budget="smoke", results_root=results_root).result
    assert r.status == "ok" and r.method.family == "quantization"
    assert r.size.runtime_low_precision is True
    q = r.size.quantization
    assert q.weight_bits == 8 and q.serialized_bytes == r.size.method.bytes < r.size.reference.bytes
    assert r.method_stats["int8_kernel_calls"] > 0 and r.method_stats["smoothed_linears"] > 0


def test_without_the_int8_kernels_the_same_w8a8_runs_in_float_and_says_so(llama_subject, arith, ctx, prompt_ids):
    """A profile the int8 CPU kernels do not serve (here bfloat16): the same codes and activation grid through
    `_kernels.float_twin`, and `runtime_low_precision: false`."""
    import dataclasses

    from baselines.quantization.smoothquant import _fake_int8_class

    bf16 = dataclasses.replace(ctx, dtype="bfloat16")
    out = create_method("smoothquant", {"calibration_samples": "8"}).apply(llama_subject, arith, bf16)
    fake = [m for m in out.subject.model.modules() if isinstance(m, _fake_int8_class())]
    assert out.runtime_low_precision is False and out.quantization["activation_bits"] == 8
    assert len(fake) == 7 * len(out.subject.model.model.layers) and out.stats()["int8_kernel_calls"] == 0
    x = torch.randn(2, 5, fake[0].layer.in_features)
    assert torch.equal(fake[0](x), _kernels.float_twin(fake[0].layer, x))
