"""`weight-only`: round-to-nearest weight-only quantization, int8 or int4, group-wise (the RTN baseline of the
GPTQ and AWQ papers; Dettmers and Zettlemoyer, "The case for 4-bit precision", ICML 2023, study its bits and
group sizes).

Every Linear layer but the model's output head (the LM head, as GPTQ and AWQ leave it; a model without one has
every Linear quantized) gets, per group of `group_size` consecutive input columns of each output row:

    asymmetric: s = (max(w, 0) - min(w, 0)) / (2^b - 1),  z = round(-min(w, 0) / s)
    symmetric:  s = max|w| / (2^(b-1) - 1),              z = 2^(b-1)
    q = clamp(round(w / s) + z, 0, 2^b - 1),  w_hat = (q - z) * s

Activations stay float32: the saving is in storage and memory traffic, not in the arithmetic. Where a CPU
kernel exists for the layer's settings (`_kernels`: int8 per output row and symmetric, on
`aten._weight_int8pack_mm`; int4 with group size 32/64/128/256 and an output size divisible by 16, on
`aten._weight_int4pack_mm_for_cpu`, the kernels torchao's CPU layouts call), the timed layer runs it; any other
layer (int8 group-wise, 2 or 3 bits, a shape the kernel refuses) runs `w_hat` as a float32 weight (fake
quantization). The record says `runtime_low_precision: true` only when every quantized layer runs a kernel,
and `method_stats` counts both kinds of layer (`kernel_layers`, `fake_quantized_layers`). With `kernel=fake`
every layer is fake-quantized: the same w_hat, so the same quality, timed in float32.

The serialized size is what would be stored: codes packed at b bits, a float16 scale and (asymmetric) a b-bit
zero per group (`_quant.packed_bytes`), every unquantized tensor as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError
from bench.registry import register_method

KERNELS = ("auto", "fake")


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4  # weight bits: 8 or 4 (CPU kernels where the layer fits them), or 3 or 2 (fake-quantized only)
    group_size: int | None = 64  # input columns sharing a scale and zero; none: one per output row
    symmetric: bool = False  # absmax with zero 2^(b-1) instead of min/max (int8 kernels need symmetric, per row)
    kernel: Literal["auto", "fake"] = "auto"  # auto: the CPU kernel where one fits the layer; fake: float w_hat

    def validate(self) -> None:
        from baselines.quantization import _quant

        _quant.check_bits(self.bits)
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 1):
            raise ConfigError(f"group_size={self.group_size!r} must be a positive integer or none")
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel={self.kernel!r} is not one of {', '.join(KERNELS)}")


def quantized_linears(model) -> list[tuple[str, object]]:
    """(name, Linear) of every Linear layer but the model's output head (`get_output_embeddings()`)."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def kernel_for(lin, bits: int, group_size: int | None, symmetric: bool) -> str | None:
    """Which CPU kernel runs `lin` at these settings ('int8', 'int4'), or None (fake quantization)."""
    from baselines.quantization._kernels import INT4_GROUP_SIZES

    if bits == 8 and group_size is None and symmetric:
        return "int8"
    if bits == 4 and group_size in INT4_GROUP_SIZES and lin.in_features % group_size == 0 \
            and lin.out_features % 16 == 0:
        return "int4"
    return None


@register_method("weight-only", family="quantization", paper="Dettmers and Zettlemoyer, The case for 4-bit "
                 "precision: k-bit Inference Scaling Laws", year=2023, url="https://arxiv.org/abs/2212.09720",
                 modalities=("image-classification", "causal-lm", "text-classification"),
                 summary="round-to-nearest int8/int4 weights in groups, activations float; CPU int8/int4 "
                         "weight-only kernels where they fit, fake quantization elsewhere")
class WeightOnly(Method):
    Config = WeightOnlyConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy
        import time

        import torch

        from baselines.quantization import _kernels, _quant
        from baselines.quantization.int8_dynamic import check_cpu_float32

        cfg = self.config
        cfg.validate()
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.model).float().cpu().eval()
        layers = quantized_linears(model)
        if not layers:
            raise ValueError("weight-only: the model has no Linear layer to quantize (its output head is kept)")
        for name, lin in layers:
            try:
                _quant.check_group_size(cfg.group_size, lin.in_features)
            except ConfigError as e:
                raise ConfigError(f"layer {name}: {e}") from None
        kernels = {name: kernel_for(lin, cfg.bits, cfg.group_size, cfg.symmetric) if cfg.kernel == "auto" else None
                   for name, lin in layers}
        if any(kernels.values()):
            check_cpu_float32("weight-only's kernels (or kernel=fake)", ctx)
        packed = {f"{name}.weight": (cfg.bits, lin.out_features * (lin.in_features // (cfg.group_size
                                                                                        or lin.in_features)),
                                     cfg.symmetric) for name, lin in layers}
        size = _quant.quantized_model_bytes(model, packed)
        total = sum(p.numel() for p in model.parameters())
        quantized = sum(lin.weight.numel() for _, lin in layers)
        w8, w4 = _kernels.weight_only_classes()

        def make(name, lin):
            if name not in kernels:
                return None
            if kernels[name] == "int8":
                return w8(lin)
            if kernels[name] == "int4":
                return w4(lin, cfg.group_size)
            with torch.no_grad():
                lin.weight.copy_(_quant.fake_quantize(lin.weight, cfg.bits, cfg.group_size, cfg.symmetric))
            return None

        _kernels.swap_linears(model, make)
        n_kernel = sum(1 for k in kernels.values() if k)
        seconds = time.perf_counter() - t0
        out = task.prepare(model, ctx)
        calls0 = _kernels.kernel_calls(model)

        def stats() -> dict[str, float]:
            return {"kernel_layers": float(n_kernel), "fake_quantized_layers": float(len(layers) - n_kernel),
                    "quantized_weight_share": quantized / max(1, total),
                    "kernel_calls": float(_kernels.kernel_calls(model) - calls0)}

        how = ", ".join(sorted({k for k in kernels.values() if k})) or "none"
        return Applied(out, Cost(seconds, 0, 0, f"round {len(layers)} Linear weights to {cfg.bits} bits (no "
                                                f"calibration; kernels: {how})"),
                       runtime_low_precision=n_kernel == len(layers), stats=stats,
                       quantization={"weight_bits": cfg.bits, "activation_bits": None,
                                     "group_size": cfg.group_size, "serialized_bytes": size})
