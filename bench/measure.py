"""Size, compute and memory of a model: parameters, non-zeros, serialized bytes, MACs and peak memory.

Peak memory on the CPU has no allocator counter like CUDA's `max_memory_allocated`, and process RSS is
dominated by the Python and torch runtime and by what the allocator keeps from earlier work. So on the CPU
we count what CUDA's counter counts: the bytes of tensor storage alive at the worst moment of one workload
call, parameters and buffers included. A `TorchDispatchMode` sees every tensor an operator returns; each
storage is counted once (views share it) and uncounted when its last tensor dies. Temporaries a single
C++ kernel allocates and frees internally are not seen, which also holds for any per-operator counter.
On CUDA we use `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
"""

from __future__ import annotations

import io
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CPU_MEMORY_MEASURE = "peak bytes of live tensor storage during one workload call (dispatch-mode count), " \
                     "parameters and buffers included"
CUDA_MEMORY_MEASURE = "torch.cuda.max_memory_allocated during one workload call"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each shared tensor once."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()).item())
    return total, nonzero


def serialized_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state dict saved as safetensors (dense: zeros cost as much as any weight)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for k in list(state):  # safetensors refuses shared storage; store each storage once
        ptr = state[k].data_ptr()
        if ptr in seen:
            state[k] = state[k].clone()
        seen[ptr] = k
    return len(save(state))


def count_macs(fn: Callable[[], object]) -> float:
    """Multiply-accumulates of one call, from torch's flop counter (1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 2


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self, baseline: int, known: set[int]):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, live tensor wrappers]
        self.known = known  # storages already counted in the baseline (weights)
        self.current = baseline
        self.peak = baseline

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.known:
                continue
            entry = self.live.get(ptr)
            if entry is None:
                entry = self.live[ptr] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


def _model_storages(model: torch.nn.Module) -> tuple[int, set[int]]:
    known: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        known[s.data_ptr()] = s.nbytes()
    return sum(known.values()), set(known)


def peak_memory(model: torch.nn.Module, fn: Callable[[], object], device: str) -> tuple[int, str]:
    """(peak bytes of one call of `fn`, description of the measure) on `device`."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()), CUDA_MEMORY_MEASURE
    baseline, known = _model_storages(model)
    mode = _LiveTensorBytes(baseline, known)
    with torch.no_grad(), mode:
        out = fn()
    del out
    return int(mode.peak), CPU_MEMORY_MEASURE
