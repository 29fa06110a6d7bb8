"""Size, compute and memory of a model: parameters, non-zeros, serialized bytes, MACs and peak memory.

Peak memory on the CPU has no allocator counter like CUDA's `max_memory_allocated`, and process RSS is
dominated by the Python and torch runtime and by what the allocator keeps from earlier work. So on the CPU
we count what CUDA's counter counts: the bytes of tensor storage alive at the worst moment of one workload
call, parameters and buffers included. A `TorchDispatchMode` sees every tensor an operator returns; each
storage is counted once (views share it) and uncounted when its last tensor dies. Temporaries a single
C++ kernel allocates and frees internally are not seen, which also holds for any per-operator counter.

Each arm is charged for its own state only, never for what the other arm keeps resident: its persistent bytes
are the storages reachable from its subject (`arm_state`: the model, and every module or tensor its `extra`
holds, through closures and the method's own objects: a draft, a copied denoiser, a cache), each counted once,
plus what one call allocates on top. On CUDA the allocator's counter sees everything on the device, so the
call's part is `max_memory_allocated` after `reset_peak_memory_stats` minus `memory_allocated` just before
the call, and the arm's state is added from the walk. Before either measure the arm's leftover caches are
dropped (its `on_batch_start`), so a cache kept from the last timed call is neither charged to the next arm
nor subtracted from this one's rebuild.
"""

from __future__ import annotations

import io
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CPU_MEMORY_MEASURE = "peak bytes of live tensor storage during one workload call (dispatch-mode count), " \
                     "the arm's own weights and persistent tensors (its subject's model, draft, copies, caches) " \
                     "included, the other arm's excluded"
CUDA_MEMORY_MEASURE = "the arm's own weights and persistent tensors (its subject's model, draft, copies, caches), " \
                      "plus torch.cuda.max_memory_allocated during one workload call minus memory_allocated just " \
                      "before it (the other arm's state excluded; leftover caches dropped first)"


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


_WALK_DEPTH = 8  # closures inside method objects inside dicts: deep enough for every subject in baselines/


def reachable(subject) -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    """(modules, tensors) an arm keeps resident: its model, and the modules and tensors reachable from its
    `extra` through containers, function closures, bound methods and the objects of this project's own modules
    (bench, baselines, tasks). Library objects other than modules and tensors are not entered (a tokenizer
    holds no weights); a module is not entered either (its parameters and buffers are its tensors)."""
    import types

    model = subject if isinstance(subject, torch.nn.Module) else subject.model
    extra = {} if isinstance(subject, torch.nn.Module) else subject.extra
    modules: list[torch.nn.Module] = []
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(obj, depth: int) -> None:
        if depth > _WALK_DEPTH or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, torch.nn.Module):
            modules.append(obj)
        elif isinstance(obj, dict):
            for v in list(obj.values()):
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in list(obj):
                walk(v, depth + 1)
        elif isinstance(obj, types.MethodType):
            walk(obj.__self__, depth + 1)
            walk(obj.__func__, depth + 1)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    walk(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    pass
        elif type(obj).__module__.split(".")[0] in ("bench", "baselines", "tasks") and hasattr(obj, "__dict__"):
            walk(vars(obj), depth + 1)

    walk(model, 0)
    walk(extra, 0)
    return modules, tensors


def arm_state(subject) -> dict[int, int]:
    """{storage pointer: bytes} of every tensor an arm keeps resident (`reachable`): the parameters and buffers
    of its modules and the tensors it holds, each storage once."""
    modules, tensors = reachable(subject)
    found: dict[int, int] = {}
    for t in [p for m in modules for p in list(m.parameters()) + list(m.buffers())] + tensors:
        s = t.untyped_storage()
        if s.data_ptr():
            found[s.data_ptr()] = s.nbytes()
    return found


def _drop_leftover_caches(subject) -> None:
    start = None if isinstance(subject, torch.nn.Module) else subject.extra.get("on_batch_start")
    if callable(start):
        start()


def peak_memory(subject, fn: Callable[[], object], device: str) -> tuple[int, str]:
    """(peak bytes of one call of `fn` for the arm `subject` (a `Subject`, or a bare model), how it was measured)
    on `device`: the arm's own resident state plus what the call allocates on top (module docstring)."""
    _drop_leftover_caches(subject)
    state = arm_state(subject)
    resident = sum(state.values())
    if device == "cuda":
        import gc

        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return int(resident + max(0, torch.cuda.max_memory_allocated() - before)), CUDA_MEMORY_MEASURE
    mode = _LiveTensorBytes(resident, set(state))
    with torch.no_grad(), mode:
        out = fn()
    del out
    return int(mode.peak), CPU_MEMORY_MEASURE
