"""`int8-dynamic`: dynamic int8 quantization of every Linear layer, run on torch's int8 CPU kernels (the
baseline of PyTorch's dynamic quantization tutorials; Jacob et al., CVPR 2018, for the integer arithmetic).

Each Linear becomes `_kernels.Int8Linear`:

    W_q[o, :] = round(W[o, :] / s_w[o]),  s_w[o] = max|W[o, :]| / 127          (weights once, per output channel)
    x_q = clamp(round(x / s_x) + z_x, 0, Q),  s_x = (max(x, 0) - min(x, 0)) / Q   (activations per call, per tensor)
    y = s_x * s_w[o] * sum_k (x_q[k] - z_x) * W_q[o, k] + b[o]                   (int32 accumulation)

with Q = 127 on the x86/fbgemm engines (reduce_range) and 255 on onednn/qnnpack. No calibration: the
activation's range is taken from each call's own input, so the method costs only the rounding of the weights.
The kernel is `torch.ops.quantized.linear_dynamic` (torch.ao's quantized engine, `engine` a setting); the
timed runtime really runs it, so the record says `runtime_low_precision: true`, and `method_stats` counts the
int8 kernel's calls during the evaluation (`int8_kernel_calls`) with the share of the model's weights held in
int8 (`int8_weight_share`). Convolutions, embeddings, norms and biases stay float32: torch's dynamic
quantization covers Linear layers only, so on a convolutional network (an image classifier) only its
fully connected layers run in int8.

`torch.ao.quantization.quantize_dynamic` builds the same kernels but keeps the weights only in the engine's
opaque packed object, which safetensors and the runner's parameter and memory counters cannot read; the
modules here keep the int8 codes and scales as tensors and pack them on first use. The serialized size is the
int8 codes (one byte a weight) with a float16 scale per output row, every other tensor as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError
from bench.registry import register_method

ENGINES = ("auto", "x86", "fbgemm", "onednn", "qnnpack")


@dataclass(frozen=True)
class Int8DynamicConfig:
    # torch's quantized engine: auto keeps the current one (x86 on this machine); the others as torch names them
    engine: Literal["auto", "x86", "fbgemm", "onednn", "qnnpack"] = "auto"

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r} is not one of {', '.join(ENGINES)}")


def check_cpu_float32(name: str, ctx) -> None:
    """The int8 CPU kernels take float32 activations on the CPU; any other device or dtype is refused."""
    if ctx.device != "cpu" or ctx.dtype != "float32":
        raise ValueError(f"{name}'s int8 kernels are torch's CPU kernels on float32 activations; run it under a "
                         f"CPU float32 profile (e.g. cpu), not on {ctx.device!r} in {ctx.dtype}")


@register_method("int8-dynamic", family="quantization", paper="Jacob et al., Quantization and Training of Neural "
                 "Networks for Efficient Integer-Arithmetic-Only Inference", year=2018,
                 url="https://arxiv.org/abs/1712.05877",
                 modalities=("image-classification", "causal-lm", "text-classification"),
                 summary="every Linear to int8 weights (per channel) with activations quantized per call, on "
                         "torch's int8 CPU kernels")
class Int8Dynamic(Method):
    Config = Int8DynamicConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy
        import time

        import torch

        from baselines.quantization import _kernels, _quant

        self.config.validate()
        check_cpu_float32("int8-dynamic", ctx)
        if self.config.engine != "auto":
            if self.config.engine not in torch.backends.quantized.supported_engines:
                raise ConfigError(f"engine={self.config.engine!r} is not available in this torch build: use one "
                                  f"of {', '.join(torch.backends.quantized.supported_engines)} or auto")
            torch.backends.quantized.engine = self.config.engine
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.model).float().cpu().eval()
        int8 = _kernels.int8_linear_class()
        names: list[str] = []
        packed = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                packed[f"{name}.weight"] = (8, m.out_features, True)  # per output row, symmetric: no zeros
        size = _quant.quantized_model_bytes(model, packed)
        total = sum(p.numel() for p in model.parameters())
        names = _kernels.swap_linears(model, lambda _name, lin: int8.from_linear(lin))
        if not names:
            raise ValueError("int8-dynamic: the model has no Linear layer to quantize")
        int8_weights = sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, int8))
        seconds = time.perf_counter() - t0
        out = task.prepare(model, ctx)
        calls0 = _kernels.kernel_calls(model)
        engine = torch.backends.quantized.engine

        def stats() -> dict[str, float]:
            return {"int8_linear_layers": float(len(names)), "int8_weight_share": int8_weights / max(1, total),
                    "int8_kernel_calls": float(_kernels.kernel_calls(model) - calls0),
                    "activation_range_bits": 7.0 if _kernels.engine_reduces_range(engine) else 8.0}

        return Applied(out, Cost(seconds, 0, 0, f"round {len(names)} Linear weights to int8 (no calibration; "
                                                f"engine {engine})"),
                       runtime_low_precision=True, stats=stats,
                       quantization={"weight_bits": 8, "group_size": None,
                                     "activation_bits": 7 if _kernels.engine_reduces_range(engine) else 8,
                                     "serialized_bytes": size})
