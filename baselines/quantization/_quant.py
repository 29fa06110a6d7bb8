"""Uniform integer quantization shared by the quantization methods (`int8-dynamic`, `weight-only`, `gptq`, `awq`,
`smoothquant`): settings checks, per-group scale and zero, quantize, dequantize, round-to-nearest fake
quantization, and the packed size of what a quantized model would store.

A group of values w is stored as b-bit codes q with one scale s and one zero z (GPTQ's and AWQ's convention):

    q = clamp(round(w / s) + z, 0, 2^b - 1)          (quantize)
    w_hat = (q - z) * s                               (dequantize)

- asymmetric (min/max): the range is [min(w, 0), max(w, 0)] (zero kept exactly representable, as GPTQ's
  `Quantizer` does), s = (max - min) / (2^b - 1), z = round(-min / s), an integer in [0, 2^b - 1];
- symmetric (absmax): s = max|w| / (2^(b-1) - 1), z = 2^(b-1), so w_hat lies in
  [-(2^(b-1) - 1), 2^(b-1) - 1] * s (int8: s = absmax / 127, the convention of LLM.int8 and SmoothQuant).

In both, s is clamped to at least `MIN_SCALE`, so an all-zero group quantizes to zeros instead of dividing by 0.

A Linear weight of shape (out, in) is quantized in groups of `group_size` consecutive input columns of each
output row (GPTQ/AWQ); `group_size=None` is one group per output row (per-channel). Torch is imported inside
the functions: module scope stays torch-free (`bench list` imports every method module).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bench.config import ConfigError

if TYPE_CHECKING:
    import torch

VALID_BITS = (2, 3, 4, 8)
MIN_SCALE = 1e-8  # a scale is never below this (an all-zero group would divide by zero)
SCALE_BYTES = 2  # each group's scale is stored as one float16


def check_bits(bits: int, valid: tuple[int, ...] = VALID_BITS) -> int:
    """`bits`, after checking it is one of `valid`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in valid:
        raise ConfigError(f"bits={bits!r} is not supported: use one of {', '.join(str(b) for b in valid)}")
    return bits


def check_group_size(group_size: int | None, in_features: int) -> int | None:
    """`group_size`, after checking it divides `in_features` (None: one group per output row)."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
            or in_features % group_size:
        divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
        raise ConfigError(f"group_size={group_size!r} does not divide the layer's {in_features} input features: "
                          f"use one of {', '.join(map(str, divisors))}, or none (one group per output row)")
    return group_size


def qmax(bits: int) -> int:
    """The largest code at `bits` bits: 2^b - 1."""
    return (1 << bits) - 1


def group_params(w: "torch.Tensor", bits: int, symmetric: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(scale, zero) of each row of `w` (rows x cols) over its columns, both rows x 1 in `w`'s float dtype (the
    zero holds an integer value in [0, 2^b - 1]). Asymmetric: min/max with 0 in the range; symmetric: absmax,
    zero 2^(b-1). See the module docstring for the equations."""
    import torch

    w = w.detach()
    if not w.is_floating_point():
        w = w.float()
    top = qmax(bits)
    if symmetric:
        absmax = w.abs().amax(dim=1, keepdim=True)
        scale = (absmax / ((1 << (bits - 1)) - 1)).clamp_min(MIN_SCALE)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    lo = w.amin(dim=1, keepdim=True).clamp_max(0)
    hi = w.amax(dim=1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / top).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale).clamp(0, top)
    return scale, zero


def quantize(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Codes clamp(round(w / scale) + zero, 0, 2^b - 1) as an integer tensor (uint8 for b <= 8); `scale` and
    `zero` broadcast against `w` (rows x 1 for per-row parameters)."""
    import torch

    q = torch.clamp(torch.round(w / scale) + zero, 0, qmax(bits))
    return q.to(torch.uint8 if bits <= 8 else torch.int32)


def dequantize(codes: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor") -> "torch.Tensor":
    """(codes - zero) * scale, in `scale`'s float dtype."""
    return (codes.to(scale.dtype) - zero) * scale


def fake_quantize(w: "torch.Tensor", bits: int, group_size: int | None, symmetric: bool = False) -> "torch.Tensor":
    """Round-to-nearest quantize-dequantize of `w` (out x in): groups of `group_size` consecutive input columns
    of each output row (None: the whole row), computed in float32 and returned in `w`'s dtype and shape."""
    check_bits(bits)
    rows, cols = w.shape[0], int(w[0].numel()) if w.shape[0] else 0
    g = check_group_size(group_size, cols) or cols
    flat = w.detach().reshape(rows * (cols // g), g).float()
    scale, zero = group_params(flat, bits, symmetric)
    return dequantize(quantize(flat, scale, zero, bits), scale, zero).reshape(w.shape).to(w.dtype)


def packed_bytes(numel: int, bits: int, groups: int, symmetric: bool = False) -> int:
    """Bytes a quantized tensor of `numel` values in `groups` groups would be stored in: the codes packed
    densely at `bits` bits (ceil(numel * bits / 8)), one float16 scale per group, and one zero per group packed
    at `bits` bits as the codes are (GPTQ's `qzeros`); symmetric quantization stores no zeros (z = 2^(b-1) is
    implied)."""
    codes = math.ceil(numel * bits / 8)
    zeros = 0 if symmetric else math.ceil(groups * bits / 8)
    return codes + groups * SCALE_BYTES + zeros


def quantized_model_bytes(model, quantized: dict[str, tuple[int, int, bool]]) -> int:
    """Bytes the model would be stored in once quantized, computed on its float state dict: each entry of
    `quantized` (a weight's state-dict key -> (bits, groups, symmetric)) at `packed_bytes`, every other tensor of
    the state dict at its own dtype's size, each storage once. Tensor data only: a container's header (names,
    shapes; safetensors writes one) is not counted."""
    state = model.state_dict()
    missing = sorted(set(quantized) - set(state))
    if missing:
        raise KeyError(f"not in the model's state dict: {', '.join(missing[:5])}")
    seen: set[int] = set()
    total = 0
    for key, t in state.items():
        if key in quantized:
            bits, groups, symmetric = quantized[key]
            total += packed_bytes(t.numel(), bits, groups, symmetric)
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total
