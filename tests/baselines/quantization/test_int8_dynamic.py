"""`int8-dynamic`: every Linear of a tiny Llama becomes an int8 kernel layer whose outputs match the float twin,
the model's logits stay close to the float model's, and whole smoke runs on arith, arith-nli and digits carry the
record's quantization block with real low-precision kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from baselines.quantization import _kernels
from bench.config import ConfigError
from bench.registry import create_method
from bench.runner import run

sys.path.insert(0, str(Path(__file__).parent))  # quant_fixtures, under --import-mode=importlib

from quant_fixtures import arith, ctx, llama_subject, one_thread, prompt_ids  # noqa: E402,F401


def test_every_linear_runs_the_int8_kernel(llama_subject, arith, ctx, prompt_ids):
    out = create_method("int8-dynamic").apply(llama_subject, arith, ctx)
    model = out.subject.model
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the LM head included
    int8 = [m for m in model.modules() if isinstance(m, _kernels.int8_linear_class())]
    assert len(int8) == 3 * 7 + 1  # seven projections a block, and the head
    assert out.runtime_low_precision is True and out.quantization["weight_bits"] == 8
    assert out.quantization["activation_bits"] == (7 if _kernels.engine_reduces_range() else 8)
    with torch.no_grad():
        ref, got = llama_subject.model(prompt_ids).logits, model(prompt_ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05  # close, not equal: int8 activations
    assert out.stats()["int8_kernel_calls"] == len(int8) and out.stats()["int8_weight_share"] > 0.5
    assert llama_subject.model.model.layers[0].mlp.up_proj.__class__ is torch.nn.Linear  # the input is untouched


def test_serialized_size_is_about_a_byte_a_weight(llama_subject, arith, ctx):
    out = create_method("int8-dynamic").apply(llama_subject, arith, ctx)
    lin = [m for m in llama_subject.model.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in lin)
    others = sum(p.numel() for p in llama_subject.model.parameters()) - weights
    expected = weights + 2 * sum(m.out_features for m in lin) + 4 * others  # int8 codes, fp16 scales, fp32 rest
    assert out.quantization["serialized_bytes"] == expected


def test_a_gpu_or_bfloat16_run_is_refused(llama_subject, arith, ctx):
    from dataclasses import replace

    with pytest.raises(ValueError, match="CPU float32"):
        create_method("int8-dynamic").apply(llama_subject, arith, replace(ctx, dtype="bfloat16"))
    with pytest.raises(ConfigError, match="x86"):
        create_method("int8-dynamic", {"engine": "tpu"})


@pytest.mark.parametrize("task", ["arith", "arith-nli", "digits"])
def test_int8_dynamic_end_to_end(results_root, task):
    r = run(task, "int8-dynamic", budget="smoke", results_root=results_root).result
    assert r.status == "ok" and r.method.family == "quantization"
    z = r.size
    assert z.runtime_low_precision is True and z.quantization.weight_bits == 8
    assert z.quantization.serialized_bytes == z.method.bytes < z.reference.bytes
    assert z.method.parameters == z.reference.parameters  # the int8 codes are counted as the weights they are
    assert r.method_stats["int8_kernel_calls"] > 0
    assert r.compute.method == r.compute.reference  # the kernels' MACs counted as the float Linear's
