"""The apply that the calibrated weight quantizers (`gptq`, `awq`) share: a float copy of the model, calibration
examples from the task's training split (`baselines.pruning._calib.calibration_batches`, through the capabilities
the task declares), the method's pass over the blocks, and the record's cost, quantization block and stats.

Serialized size (`serialized_bytes`): every quantized Linear weight at its packed size (`_quant.packed_bytes`:
codes at `bits` bits, a float16 scale and a packed zero per group), plus `extra_bytes` (e.g. GPTQ's act-order
group indices), plus every other tensor of the state dict at its own dtype's size (embeddings, norms, biases,
the LM head), a tensor shared by two names (tied embeddings) counted once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from baselines.base import Applied
    from tasks.base import RunContext, Subject, Task


def serialized_bytes(model, quantized: list, bits: int, group_size: int | None, symmetric: bool,
                     extra_bytes: int = 0) -> int:
    """The packed size of `model` with the weights of the `quantized` Linears stored at `bits` bits."""
    from baselines.quantization import _quant

    q_ptrs = {lin.weight.data_ptr() for lin in quantized}
    total, seen = extra_bytes, set()
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.data_ptr() in q_ptrs:
            rows, cols = t.shape
            total += _quant.packed_bytes(t.numel(), bits, rows * (cols // (group_size or cols)), symmetric)
        else:
            total += t.numel() * t.element_size()
    return total


def one_shot(subject: "Subject", task: "Task", ctx: "RunContext", cfg, quantize: Callable[..., list], what: str,
             extra_bytes: Callable[[list], int] = lambda layers: 0,
             stats: Callable[[], dict] | None = None) -> "Applied":
    """`quantize(hf_model, batches)` on a float copy of the subject's model with `cfg.calibration_samples`
    calibration examples; it returns the quantized Linears (fake-quantized float weights on the grid of
    `cfg.bits`, `cfg.group_size`, `cfg.symmetric`). `what` ends the cost's description."""
    import copy
    import time

    from baselines.base import Applied, Cost
    from baselines.pruning import _calib

    t0 = time.perf_counter()
    model = copy.deepcopy(subject.model).float()
    batches = _calib.calibration_batches(task, task.prepare(model, ctx), ctx, cfg.calibration_samples)
    hf = _calib.hf_model(model)
    layers = quantize(hf, batches)
    tokens = _calib.token_count(batches)
    cost = Cost(time.perf_counter() - t0, len(batches), sum(len(b["input_ids"]) for b in batches),
                f"one-shot: {tokens} calibration tokens{what}")
    size = serialized_bytes(model, layers, cfg.bits, cfg.group_size, cfg.symmetric, extra_bytes(layers))
    summary = {"quantized_layers": len(layers), "calibration_tokens": tokens, **(stats() if stats else {})}
    return Applied(task.prepare(model, ctx), cost, runtime_low_precision=False,
                   quantization={"weight_bits": cfg.bits, "activation_bits": None, "group_size": cfg.group_size,
                                 "serialized_bytes": size},
                   stats=lambda: summary)
