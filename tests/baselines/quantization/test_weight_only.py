"""`weight-only`: int4 and int8 on the CPU kernels where the layer fits them and fake-quantized elsewhere, the
same weights either way, the record's flag saying which, the LM head kept, and a smoke run on arith."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from baselines.quantization import _kernels, _quant
from bench.config import ConfigError
from bench.registry import create_method
from bench.runner import run

sys.path.insert(0, str(Path(__file__).parent))  # quant_fixtures, under --import-mode=importlib

from quant_fixtures import arith, ctx, llama_subject, one_thread, prompt_ids  # noqa: E402,F401


def effective_weights(model) -> dict[str, torch.Tensor]:
    """Each quantized or float Linear's weight as the runtime multiplies by it."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, tuple(_kernels.weight_only_classes())):
            out[name] = m.dequantized()
        elif isinstance(m, torch.nn.Linear):
            out[name] = m.weight.detach()
    return out


@pytest.mark.parametrize("settings,kernel", [({}, "int4"), ({"bits": "8", "group_size": "none",
                                                              "symmetric": "true"}, "int8")])
def test_kernels_run_where_they_fit_and_equal_fake_quantization(llama_subject, arith, ctx, prompt_ids, settings,
                                                                kernel):
    # the tiny Llama is 32 wide: int4 groups of 32 fit (64 does not divide 32)
    settings = {"group_size": "32", **settings}
    real = create_method("weight-only", settings).apply(llama_subject, arith, ctx)
    fake = create_method("weight-only", {**settings, "kernel": "fake"}).apply(llama_subject, arith, ctx)
    assert real.runtime_low_precision is True and fake.runtime_low_precision is False
    assert real.stats()["fake_quantized_layers"] == 0 and fake.stats()["kernel_layers"] == 0
    assert real.quantization == fake.quantization
    a, b = effective_weights(real.subject.model), effective_weights(fake.subject.model)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    head = real.subject.model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and torch.equal(head.weight, llama_subject.model.lm_head.weight)
    with torch.no_grad():
        za, zb = real.subject.model(prompt_ids).logits, fake.subject.model(prompt_ids).logits
    assert float((za - zb).abs().max() / zb.abs().max()) < 1e-4
    assert real.stats()["kernel_calls"] > 0


def test_settings_without_a_kernel_are_fake_quantized_and_say_so(llama_subject, arith, ctx):
    out = create_method("weight-only", {"bits": "3", "group_size": "16"}).apply(llama_subject, arith, ctx)
    assert out.runtime_low_precision is False and out.stats()["kernel_layers"] == 0
    lin = out.subject.model.model.layers[0].self_attn.q_proj
    ref = llama_subject.model.model.layers[0].self_attn.q_proj
    assert torch.equal(lin.weight, _quant.fake_quantize(ref.weight.float(), 3, 16))
    assert out.quantization == {"weight_bits": 3, "activation_bits": None, "group_size": 16,
                                "serialized_bytes": out.quantization["serialized_bytes"]}


def test_serialized_size_is_the_packed_size(llama_subject, arith, ctx):
    out = create_method("weight-only", {"group_size": "32"}).apply(llama_subject, arith, ctx)
    model = llama_subject.model
    head = model.get_output_embeddings()
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    packed = sum(_quant.packed_bytes(m.weight.numel(), 4, m.weight.numel() // 32) for m in lin)
    rest = 4 * (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in lin))
    assert out.quantization["serialized_bytes"] == packed + rest


def test_a_group_size_that_does_not_divide_a_layer_is_refused(llama_subject, arith, ctx):
    with pytest.raises(ConfigError, match="does not divide"):
        create_method("weight-only", {"group_size": "48"}).apply(llama_subject, arith, ctx)
    with pytest.raises(ConfigError, match="2, 3, 4, 8"):
        create_method("weight-only", {"bits": "5"}).apply(llama_subject, arith, ctx)


def test_weight_only_end_to_end_on_arith(results_root):
    r = run("arith", "weight-only", budget="smoke", results_root=results_root).result
    assert r.status == "ok" and r.method.family == "quantization"
    z = r.size
    assert z.runtime_low_precision is True  # arith's 192/768-wide layers fit the int4 kernel at groups of 64
    assert z.quantization.weight_bits == 4 and z.quantization.group_size == 64
    assert z.method.bytes == z.quantization.serialized_bytes < z.reference.bytes / 3
    assert r.method_stats["kernel_calls"] > 0 and r.compute.method == r.compute.reference
