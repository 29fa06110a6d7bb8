"""Low-precision Linear layers on this CPU's torch kernels: `Int8Linear` (W8A8, dynamic activations, on the
quantized engine's `torch.ops.quantized.linear_dynamic`; `int8-dynamic`, and `smoothquant`'s W8A8),
`Int8WeightOnlyLinear` (`torch.ops.aten._weight_int8pack_mm`) and `Int4WeightOnlyLinear`
(`torch.ops.aten._weight_int4pack_mm_for_cpu`) for `weight-only`.

Int8Linear:

    W_q[o, :] = round(W[o, :] / s_w[o]),  s_w[o] = max|W[o, :]| / 127      (per output channel, symmetric)
    x_q = clamp(round(x / s_x) + z_x, 0, Q),  s_x = (max(x, 0) - min(x, 0)) / Q,  z_x = round(-min(x, 0) / s_x)
    y = s_x * s_w[o] * sum_k (x_q[k] - z_x) * W_q[o, k] + b[o]             (int32 accumulation, float rescale)

The weight is quantized once; the activation per call, per tensor, by the kernel itself (dynamic
quantization), at Q = 127 on the x86/fbgemm engines (`reduce_range`: their u8 x s8 multiply-add saturates
16-bit sums at full 255 range) and Q = 255 on the others. `float_twin` computes the same equations in float
(fake quantization): the kernel's output equals it up to float rounding of the rescale and the activation's
rounding at exact .5 ties (tests check it).

`Int8Linear` keeps the int8 codes as a (frozen) Parameter and the per-channel scales as a buffer, so the state
dict, parameter count and serialized size are those of the int8 model; the engine's packed form is built from
them on first use (`torch.ao`'s own `quantize_dynamic` modules keep only the packed object, which neither
safetensors nor the runner's counters can read). torch marks its quantized tensor constructors deprecated
(pytorch/pytorch#184982); they still run on this torch, and their warning is silenced here.

Weight-only (activations stay float32; the kernels dequantize the weight inside the matrix product):

    int8: y = x @ (W_q * s_w[:, None])^T + b,  W_q in [-127, 127], s_w = max|W[o, :]| / 127 per output row
          (`_weight_int8pack_mm(x, W_q, s_w)`: per output channel only, no groups)
    int4: y = x @ W_hat^T + b,  W_hat[o, k] = (q[o, k] - 8) * s[g, o] + m[g, o],  g = k // group_size
          (`_weight_int4pack_mm_for_cpu`, the tinygemm convention: a float offset m per group instead of an
          integer zero; from `_quant`'s asymmetric (s, z): m = (8 - z) * s, so W_hat = (q - z) * s exactly).
          Group sizes 32, 64, 128, 256 (`INT4_GROUP_SIZES`); the codes are packed two a byte by
          `_convert_weight_to_int4pack_for_cpu`.

torchao wraps the same two aten kernels for the CPU (its Int8WeightOnly and Int4 "opaque" CPU layouts); they
are called directly here, so the project needs no further dependency. The codes are kept as frozen Parameters
(the state dict, parameter count and serialized size are the quantized model's); a kernel's packed copy is
built on first use and is not seen by the runner's peak-memory count. The kernels' multiply-accumulates are
registered with torch's flop counter (`_count_macs`), so the record's MACs count them as the float Linear's.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEPRECATED = ".*quantized tensor creation functions.*"


def engine_reduces_range(engine: str | None = None) -> bool:
    """Whether the quantized engine (default: the current one) quantizes activations to 7 bits (x86, fbgemm)."""
    import torch

    return (engine or torch.backends.quantized.engine) in ("x86", "fbgemm")


INT4_GROUP_SIZES = (32, 64, 128, 256)


def _count_macs() -> None:
    """Register the kernels' multiply-accumulates with torch's flop counter (2 x rows x in x out, as a float
    Linear), so the record's MACs count them; unregistered, the counter sees none."""
    import math

    import torch
    from torch.utils.flop_counter import register_flop_formula

    def flops(x_shape, *_args, out_shape=None, **_kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * out_shape[-1]

    for op in (torch.ops.quantized.linear_dynamic, torch.ops.aten._weight_int8pack_mm,
               torch.ops.aten._weight_int4pack_mm_for_cpu):
        register_flop_formula(op)(flops)


def _module():
    import torch
    from torch import nn

    from baselines.quantization import _quant

    class Int8Linear(nn.Module):
        """y = linear_dynamic(x, prepack(W_q, s_w, b)): int8 weights per output channel, activations quantized
        per call by the kernel. Built from a float `nn.Linear` by `from_linear`."""

        def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, reduce: bool):
            super().__init__()
            self.in_features, self.out_features = codes.shape[1], codes.shape[0]
            self.weight_int8 = nn.Parameter(codes.to(torch.int8), requires_grad=False)
            self.register_buffer("scales", scales.detach().float().reshape(-1).clone())
            self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
            self.reduce = reduce
            self._packed = None
            self.calls = 0  # forward passes run by the int8 kernel

        @classmethod
        def from_linear(cls, lin: nn.Linear, reduce: bool | None = None) -> "Int8Linear":
            w = lin.weight.detach().float().cpu()
            scale, zero = _quant.group_params(w, 8, symmetric=True)
            codes = _quant.quantize(w, scale, zero, 8).to(torch.int16) - int(zero[0, 0])  # in [-127, 127]
            return cls(codes, scale, lin.bias, engine_reduces_range() if reduce is None else reduce)

        def _load_from_state_dict(self, *args, **kwargs):
            self._packed = None
            return super()._load_from_state_dict(*args, **kwargs)

        def _pack(self):
            if self._packed is None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=DEPRECATED)
                    w = torch._make_per_channel_quantized_tensor(
                        self.weight_int8.detach().cpu(), self.scales.double().cpu(),
                        torch.zeros(self.out_features, dtype=torch.long), 0)
                bias = None if self.bias is None else self.bias.detach().float().cpu()
                self._packed = torch.ops.quantized.linear_prepack(w, bias)
            return self._packed

        @property
        def codes(self) -> torch.Tensor:
            return self.weight_int8

        def dequantized(self) -> torch.Tensor:
            """The float weight the codes stand for: W_q * s_w."""
            return self.weight_int8.float() * self.scales[:, None]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._pack(), self.reduce).to(x.dtype)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 (reduce_range=" \
                   f"{self.reduce})"

    class Int8WeightOnlyLinear(nn.Module):
        """y = x @ (W_q * s_w)^T + b on `_weight_int8pack_mm`: int8 weights per output channel, float input."""

        def __init__(self, lin: nn.Linear):
            super().__init__()
            w = lin.weight.detach().float().cpu()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            scale, zero = _quant.group_params(w, 8, symmetric=True)
            codes = _quant.quantize(w, scale, zero, 8).to(torch.int16) - int(zero[0, 0])
            self.weight_int8 = nn.Parameter(codes.to(torch.int8), requires_grad=False)
            self.register_buffer("scales", scale.reshape(-1).clone())
            self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().float().clone(),
                                                                    requires_grad=False)
            self.calls = 0

        @property
        def codes(self) -> torch.Tensor:
            return self.weight_int8

        def dequantized(self) -> torch.Tensor:
            return self.weight_int8.float() * self.scales[:, None]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            flat = x.reshape(-1, self.in_features).float().contiguous()
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    class Int4WeightOnlyLinear(nn.Module):
        """y = x @ W_hat^T + b on `_weight_int4pack_mm_for_cpu`: 4-bit codes, a scale and offset per group of
        `group_size` input columns of each output row (module docstring)."""

        def __init__(self, lin: nn.Linear, group_size: int):
            super().__init__()
            w = lin.weight.detach().float().cpu()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            self.group_size = group_size
            groups = w.reshape(-1, group_size)
            scale, zero = _quant.group_params(groups, 4, symmetric=False)
            codes = _quant.quantize(groups, scale, zero, 4).reshape(w.shape)
            self.weight_int4 = nn.Parameter(codes, requires_grad=False)  # one code a byte; packed on first use
            offset = (8 - zero) * scale  # tinygemm's float offset: (q - 8) * s + m == (q - z) * s
            g = self.in_features // group_size
            sz = torch.stack([scale.reshape(self.out_features, g), offset.reshape(self.out_features, g)], -1)
            self.register_buffer("scales_and_offsets", sz.transpose(0, 1).contiguous())  # g x out x 2
            self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().float().clone(),
                                                                    requires_grad=False)
            self._packed = None
            self.calls = 0

        def _load_from_state_dict(self, *args, **kwargs):
            self._packed = None
            return super()._load_from_state_dict(*args, **kwargs)

        @property
        def codes(self) -> torch.Tensor:
            return self.weight_int4

        def dequantized(self) -> torch.Tensor:
            s, m = self.scales_and_offsets[..., 0].T, self.scales_and_offsets[..., 1].T  # out x g
            q = self.weight_int4.float().reshape(self.out_features, -1, self.group_size)
            return ((q - 8) * s[..., None] + m[..., None]).reshape(self.out_features, self.in_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self._packed is None:
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    self.weight_int4.detach().to(torch.int32), 1)
            flat = x.reshape(-1, self.in_features).float().contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self._packed, self.group_size,
                                                              self.scales_and_offsets)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return Int8Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear


_CLASSES = None


def _classes():
    global _CLASSES
    if _CLASSES is None:
        _count_macs()
        _CLASSES = _module()
    return _CLASSES


def int8_linear_class():
    """The `Int8Linear` class (built on first use, so this module stays torch-free at import)."""
    return _classes()[0]


def weight_only_classes():
    """(`Int8WeightOnlyLinear`, `Int4WeightOnlyLinear`), built on first use."""
    return _classes()[1:]


def kernel_calls(model) -> int:
    """Forward calls run by this module's low-precision layers in `model` so far."""
    return sum(m.calls for m in model.modules() if isinstance(m, _classes()))


def float_twin(layer, x: "torch.Tensor") -> "torch.Tensor":
    """What `layer` (an Int8Linear) computes, in float: x fake-quantized per tensor as the kernel quantizes it
    (asymmetric, 0 in range, Q = 127 or 255), times the dequantized weight, plus the bias."""
    import torch

    from baselines.quantization import _quant

    bits = 7 if layer.reduce else 8
    flat = x.detach().float().reshape(1, -1)
    scale, zero = _quant.group_params(flat, bits, symmetric=False)
    xq = _quant.dequantize(_quant.quantize(flat, scale, zero, bits), scale, zero).reshape(x.shape)
    return torch.nn.functional.linear(xq, layer.dequantized(), layer.bias)


def swap_linears(model, make) -> list[str]:
    """Replace every `nn.Linear` m of `model` for which make(name, m) returns a module; the replaced names."""
    from torch import nn

    done = []
    for name, child in list(model.named_modules()):
        for cname, c in list(child.named_children()):
            if isinstance(c, nn.Linear):
                full = f"{name}.{cname}" if name else cname
                new = make(full, c)
                if new is not None:
                    setattr(child, cname, new)
                    done.append(full)
    return done
