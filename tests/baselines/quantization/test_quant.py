"""`_quant`: quantize-dequantize round trips exact on representable values, codes in range, the group layout of
fake quantization, settings errors that list the valid values, and the packed size's arithmetic."""

from __future__ import annotations

import pytest
import torch

from baselines.quantization import _quant
from bench.config import ConfigError

BITS = (2, 3, 4, 8)


def representable(rows: int, cols: int, bits: int, symmetric: bool, seed: int = 0):
    """A weight whose every row is exactly on its own grid, (q - z) * s, with the extreme codes present so that
    the row's parameters recovered from it are the grid's."""
    gen = torch.Generator().manual_seed(seed)
    top = _quant.qmax(bits)
    lo = 1 if symmetric else 0  # symmetric grids use [1, 2^b - 1] around z = 2^(b-1)
    q = torch.randint(lo, top + 1, (rows, cols), generator=gen)
    q[:, 0], q[:, 1] = lo, top
    z = torch.full((rows, 1), float(1 << (bits - 1))) if symmetric else \
        torch.randint(1, top, (rows, 1), generator=gen).float()
    s = 2.0 ** -torch.randint(2, 6, (rows, 1), generator=gen).float()  # powers of two: exact in float32
    return (q.float() - z) * s, q, s, z


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_is_exact_on_representable_values(bits, symmetric):
    w, q, s, z = representable(6, 16, bits, symmetric)
    codes = _quant.quantize(w, s, z, bits)
    assert torch.equal(codes.long(), q) and torch.equal(_quant.dequantize(codes, s, z), w)
    scale, zero = _quant.group_params(w, bits, symmetric)  # the parameters found from w are its grid's
    assert torch.allclose(scale, s, rtol=1e-6) and torch.equal(zero, z)
    assert torch.equal(_quant.fake_quantize(w, bits, None, symmetric), w)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_is_idempotent_and_bounded(bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    once = _quant.fake_quantize(w, bits, 16)
    assert torch.allclose(_quant.fake_quantize(once, bits, 16), once, atol=1e-6)
    scale, _ = _quant.group_params(w.reshape(-1, 16), bits, False)
    assert ((w - once).abs().reshape(-1, 16) <= scale / 2 + 1e-6).all()  # within half a step of its group's grid


def test_codes_stay_in_range_and_zero_is_exact():
    w = torch.randn(5, 32) * 3
    for bits in BITS:
        scale, zero = _quant.group_params(w, bits, False)
        codes = _quant.quantize(w * 10, scale, zero, bits)  # far outside the range: clamped
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
        assert ((zero >= 0) & (zero <= 2 ** bits - 1) & (zero == zero.round())).all()
        assert (_quant.dequantize(_quant.quantize(torch.zeros(5, 1), scale, zero, bits), scale, zero) == 0).all()


def test_groups_are_consecutive_input_columns_of_each_row():
    w = torch.randn(4, 32)
    w[:, :8] *= 100  # one large group per row: with groups of 8, the others keep their fine steps
    grouped = _quant.fake_quantize(w, 4, 8)
    by_hand = torch.cat([_quant.fake_quantize(w[:, i:i + 8].contiguous(), 4, None) for i in range(0, 32, 8)], 1)
    assert torch.equal(grouped, by_hand)
    assert (w - grouped)[:, 8:].abs().max() < (w - _quant.fake_quantize(w, 4, None))[:, 8:].abs().max()


def test_an_all_zero_row_quantizes_to_zeros():
    w = torch.zeros(2, 8)
    assert torch.equal(_quant.fake_quantize(w, 4, None), w)
    assert torch.equal(_quant.fake_quantize(w, 8, None, symmetric=True), w)


def test_settings_errors_list_the_valid_values():
    with pytest.raises(ConfigError, match="2, 3, 4, 8"):
        _quant.check_bits(5)
    with pytest.raises(ConfigError, match="1, 2, 3, 4, 6, 8, 12, 24"):
        _quant.check_group_size(5, 24)
    assert _quant.check_group_size(None, 24) is None and _quant.check_group_size(8, 24) == 8


def test_packed_bytes():
    assert _quant.packed_bytes(64, 4, 2) == 32 + 2 * 2 + 1  # codes, two float16 scales, two 4-bit zeros
    assert _quant.packed_bytes(64, 4, 2, symmetric=True) == 36
    assert _quant.packed_bytes(10, 3, 1) == 4 + 2 + 1


def test_quantized_model_bytes_counts_packed_and_float_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 4))
    size = _quant.quantized_model_bytes(model, {"0.weight": (4, 16 * 2, False)})
    assert size == _quant.packed_bytes(512, 4, 32) + 16 * 4 + (64 + 4) * 4
    with pytest.raises(KeyError, match="nope"):
        _quant.quantized_model_bytes(model, {"nope": (4, 1, False)})
