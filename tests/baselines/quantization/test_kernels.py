"""`_kernels`: each low-precision layer's output against its fake-quantized float twin. The int8 W8A8 kernel
(quantized::linear_dynamic) must equal the twin up to float rounding of its rescale (int32 accumulation is exact;
torch's own tests of the kernel compare against the same float reference); the weight-only kernels dequantize
inside the product, so they equal x @ w_hat^T up to float32 summation order."""

from __future__ import annotations

import pytest
import torch

from baselines.quantization import _kernels, _quant


def linear(n_in=192, n_out=768, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())





def test_int8_kernel_matches_its_float_twin():
    # at the engine's own activation range (7 bits on x86/fbgemm, whose u8 x s8 multiply-add saturates 16-bit
    # sums at the full 8-bit range: there the kernel is not the twin, which is why the engine reduces it)
    lin = linear()
    layer = _kernels.int8_linear_class().from_linear(lin)
    x = torch.randn(3, 7, 192) * 2
    y = layer(x)
    assert y.shape == (3, 7, 768) and layer.calls == 1
    assert rel(y, _kernels.float_twin(layer, x)) < 1e-5
    assert rel(y, lin(x)) > 1e-4  # it is quantized: the float layer differs by more than rounding
    assert torch.equal(layer.dequantized(), _quant.fake_quantize(lin.weight, 8, None, symmetric=True))


def test_int8_codes_and_scales_are_the_state():
    layer = _kernels.int8_linear_class().from_linear(linear(64, 32))
    state = layer.state_dict()
    assert state["weight_int8"].dtype == torch.int8 and state["weight_int8"].abs().max() <= 127
    assert state["scales"].shape == (32,)
    other = _kernels.int8_linear_class().from_linear(linear(64, 32, seed=1))
    other.load_state_dict(state)  # the packed form is rebuilt from the loaded codes
    x = torch.randn(4, 64)
    assert torch.equal(other(x), layer(x))


def test_weight_only_int8_matches_its_twin():
    lin = linear()
    w8, _ = _kernels.weight_only_classes()
    layer = w8(lin)
    x = torch.randn(2, 5, 192)
    assert torch.equal(layer.dequantized(), _quant.fake_quantize(lin.weight, 8, None, symmetric=True))
    assert rel(layer(x), torch.nn.functional.linear(x, layer.dequantized(), lin.bias)) < 1e-5


@pytest.mark.parametrize("group_size", [32, 64])
def test_weight_only_int4_matches_its_twin(group_size):
    lin = linear()
    _, w4 = _kernels.weight_only_classes()
    layer = w4(lin, group_size)
    x = torch.randn(2, 5, 192)
    twin = _quant.fake_quantize(lin.weight, 4, group_size)
    assert torch.allclose(layer.dequantized(), twin, atol=1e-6)  # tinygemm's offset m = (8 - z) s: the same grid
    assert rel(layer(x), torch.nn.functional.linear(x, twin, lin.bias)) < 1e-5
    assert int(layer.weight_int4.max()) <= 15


def test_the_kernels_macs_are_counted_as_the_float_linear():
    from torch.utils.flop_counter import FlopCounterMode

    lin = linear(64, 32)
    w8, w4 = _kernels.weight_only_classes()
    counts = []
    for m in (lin, _kernels.int8_linear_class().from_linear(lin), w8(lin), w4(lin, 32)):
        counter = FlopCounterMode(display=False)
        with counter:
            m(torch.randn(3, 64))
        counts.append(counter.get_total_flops())
    assert counts == [counts[0]] * 4 and counts[0] == 2 * 3 * 64 * 32
