from __future__ import annotations

import torch

from bench.measure import count_macs, count_parameters, peak_memory, serialized_bytes


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(100, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))


def test_parameters_and_nonzeros():
    m = mlp()
    assert count_parameters(m) == (111010, 111010)
    with torch.no_grad():
        m[0].weight[:50].zero_()
    assert count_parameters(m) == (111010, 111010 - 50 * 100)


def test_macs_of_a_linear_stack():
    m, x = mlp(), torch.randn(64, 100)
    assert count_macs(lambda: m(x)) == 64 * (100 * 1000 + 1000 * 10)


def test_cpu_peak_counts_weights_and_live_activations():
    """Weights (444,040 B) plus the two 64x1000 fp32 activations alive together at the ReLU (512,000 B)."""
    m, x = mlp(), torch.randn(64, 100)
    peak, how = peak_memory(m, lambda: m(x), "cpu")
    assert peak == 111010 * 4 + 2 * 64 * 1000 * 4
    assert "live tensor" in how


def test_freed_activations_do_not_accumulate():
    m, x = mlp(), torch.randn(64, 100)
    one, _ = peak_memory(m, lambda: m(x), "cpu")
    many, _ = peak_memory(m, lambda: [m(x).sum().item() for _ in range(10)], "cpu")
    assert many == one


def test_serialized_size_is_dense():
    m = mlp()
    dense = serialized_bytes(m)
    with torch.no_grad():
        m[0].weight.zero_()
    assert serialized_bytes(m) == dense > 111010 * 4
