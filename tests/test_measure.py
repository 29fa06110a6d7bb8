from __future__ import annotations

import pytest
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


# ---- each arm is charged for its own state only (issue 26) ---------------------------------------------------

def subject_of(model, **extra):
    from bench.api import Subject

    return Subject(model, "test", extra)


def test_an_arms_figure_does_not_change_when_the_other_arms_model_is_resident():
    m, x = mlp(), torch.randn(64, 100)
    alone, _ = peak_memory(subject_of(m), lambda: m(x), "cpu")
    other = torch.nn.Linear(2000, 2000)  # 16 MB of the other arm's weights, resident while this arm is measured
    beside, _ = peak_memory(subject_of(m), lambda: m(x), "cpu")
    assert beside == alone and other.weight.numel() > 0


def test_a_draft_held_in_the_subjects_procedure_is_the_arms_own_state():
    m, x = mlp(), torch.randn(64, 100)
    draft = torch.nn.Linear(100, 10)

    def generate():  # a closure, as a decoding method's generate holds its draft
        return m(x) + draft(x)

    bare, _ = peak_memory(subject_of(m), lambda: m(x), "cpu")
    with_draft, _ = peak_memory(subject_of(m, generate=generate), generate, "cpu")
    draft_bytes = (100 * 10 + 10) * 4
    assert with_draft >= bare + draft_bytes


def test_a_cache_left_from_the_last_call_is_dropped_first_and_counted_once():
    m, x = mlp(), torch.randn(64, 100)
    cache: dict = {}

    def call():
        cache["features"] = torch.ones(1000, 1000)  # 4 MB the arm keeps between calls
        return m(x)

    subject = subject_of(m, on_batch_start=cache.clear, call=call)
    first, _ = peak_memory(subject, call, "cpu")
    again, _ = peak_memory(subject, call, "cpu")  # the 4 MB from the first call are resident now
    assert first == again >= 4_000_000 + 111010 * 4


def test_the_project_walk_finds_modules_in_method_objects_not_in_library_objects():
    from bench.measure import arm_state

    class Holder:  # defined in a test module: not entered (only bench, baselines, tasks objects are)
        def __init__(self):
            self.big = torch.zeros(1000)

    m = mlp()
    assert sum(arm_state(subject_of(m, holder=Holder())).values()) == 111010 * 4
    assert sum(arm_state(subject_of(m, tensors=[torch.zeros(1000)])).values()) == 111010 * 4 + 4000


@pytest.mark.gpu
def test_on_cuda_an_arms_figure_does_not_change_when_the_other_arms_model_is_resident():
    m, x = mlp().cuda(), torch.randn(64, 100, device="cuda")
    alone, how = peak_memory(subject_of(m), lambda: m(x), "cuda")
    other = torch.nn.Linear(4000, 4000).cuda()  # 64 MB of the other arm's weights on the device
    beside, _ = peak_memory(subject_of(m), lambda: m(x), "cuda")
    assert beside == alone and "memory_allocated just before" in how and other.weight.is_cuda
    assert alone >= 111010 * 4
