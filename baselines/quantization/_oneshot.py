"""The apply that the calibrated weight quantizers (`gptq`, `awq`) share: a float copy of the model, calibration
examples from the task's training split (`baselines.pruning._calib.calibration_batches`, through the capabilities
the task declares), the method's pass over the blocks, and the record's cost, quantization block and stats.

Runtime: where the grid is one the CPU's int4 weight-only kernel takes (4 bits, asymmetric, groups of 32, 64,
128 or 256 input columns, a CPU float32 profile) and the method hands over each layer's grid, the quantized
Linears become `_kernels.Int4WeightOnlyLinear` holding exactly the method's codes, scales and zeros (checked
against the fake-quantized weight), and the record says `runtime_low_precision: true`; otherwise the weights
stay fake-quantized float32 (false).

Serialized size (`serialized_bytes`): every quantized Linear weight at its packed size (`_quant.packed_bytes`:
codes at `bits` bits, a float16 scale and a packed zero per group), every other tensor of the state dict at its
own dtype's size (`_quant.quantized_model_bytes`), plus `extra_bytes` (e.g. GPTQ's act-order group indices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from baselines.base import Applied
    from tasks.base import RunContext, Subject, Task


def serialized_bytes(model, quantized: list, bits: int, group_size: int | None, symmetric: bool,
                     extra_bytes: int = 0) -> int:
    """The packed size of `model` with the weights of the `quantized` Linears stored at `bits` bits
    (`_quant.quantized_model_bytes`), plus `extra_bytes`."""
    from baselines.quantization import _quant

    ids = {id(lin.weight) for lin in quantized}
    keys = {name: (bits, p.shape[0] * (p.shape[1] // (group_size or p.shape[1])), symmetric)
            for name, p in model.named_parameters() if id(p) in ids}
    return _quant.quantized_model_bytes(model, keys) + extra_bytes


def int4_kernel_fits(cfg, ctx) -> bool:
    """Whether the CPU's int4 weight-only kernel (`_kernels.Int4WeightOnlyLinear`) can run `cfg`'s grid: 4 bits,
    asymmetric, a group size it takes, on a CPU float32 profile."""
    from baselines.quantization import _kernels

    return (cfg.bits == 4 and not cfg.symmetric and cfg.group_size in _kernels.INT4_GROUP_SIZES
            and ctx.device == "cpu" and ctx.dtype == "float32")


def to_int4_kernels(model, params: dict, group_size: int) -> list[str]:
    """Swap every Linear of `model` whose id is in `params` for an `Int4WeightOnlyLinear` holding exactly its
    quantized weight: `params[id]` = (scale, zero), each [rows * groups, 1] in (row, group) order, the grid the
    weight (already on it) was quantized to. Returns the swapped names."""
    import torch

    from baselines.quantization import _kernels, _quant

    _, int4 = _kernels.weight_only_classes()

    def make(name, lin):
        if id(lin) not in params:
            return None
        scale, zero = params[id(lin)]
        layer = int4(lin, group_size)
        w = lin.weight.detach().float().cpu()
        rows, g = w.shape[0], w.shape[1] // group_size
        with torch.no_grad():  # the codes and tinygemm's (scale, offset) of the method's own grid
            layer.weight_int4.copy_(_quant.quantize(w.reshape(-1, group_size), scale, zero, 4).reshape(w.shape))
            sz = torch.stack([scale.reshape(rows, g), ((8 - zero) * scale).reshape(rows, g)], -1)
            layer.scales_and_offsets.copy_(sz.transpose(0, 1))
        if not torch.allclose(layer.dequantized(), w, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"{name}: the int4 kernel's weight differs from the quantized one")
        return layer

    return _kernels.swap_linears(model, make)


def one_shot(subject: "Subject", task: "Task", ctx: "RunContext", cfg, quantize: Callable[..., list], what: str,
             extra_bytes: Callable[[list], int] = lambda layers: 0,
             stats: Callable[[], dict] | None = None, params: dict | None = None) -> "Applied":
    """`quantize(hf_model, batches)` on a float copy of the subject's model with `cfg.calibration_samples`
    calibration examples; it returns the quantized Linears (fake-quantized float weights on the grid of
    `cfg.bits`, `cfg.group_size`, `cfg.symmetric`) and, when it fills `params` (id of a Linear -> its grid's
    (scale, zero)) and the int4 CPU kernel fits (`int4_kernel_fits`), those Linears then run on that kernel
    (`runtime_low_precision: true`). `what` ends the cost's description."""
    import copy
    import time

    from baselines.base import Applied, Cost
    from baselines.pruning import _calib
    from baselines.quantization import _kernels

    t0 = time.perf_counter()
    model = copy.deepcopy(subject.model).float()
    batches = _calib.calibration_batches(task, task.prepare(model, ctx), ctx, cfg.calibration_samples)
    hf = _calib.hf_model(model)
    layers = quantize(hf, batches)
    size = serialized_bytes(model, layers, cfg.bits, cfg.group_size, cfg.symmetric, extra_bytes(layers))
    kernels = to_int4_kernels(hf, params, cfg.group_size) if params and int4_kernel_fits(cfg, ctx) else []
    tokens = _calib.token_count(batches)
    cost = Cost(time.perf_counter() - t0, len(batches), sum(len(b["input_ids"]) for b in batches),
                f"one-shot: {tokens} calibration tokens{what}")
    summary = {"quantized_layers": len(layers), "calibration_tokens": tokens, **(stats() if stats else {})}
    calls0 = _kernels.kernel_calls(model)

    def all_stats() -> dict:
        return {**summary, "int4_kernel_layers": len(kernels),
                "int4_kernel_calls": _kernels.kernel_calls(model) - calls0}

    return Applied(task.prepare(model, ctx), cost, runtime_low_precision=bool(kernels),
                   quantization={"weight_bits": cfg.bits, "activation_bits": None, "group_size": cfg.group_size,
                                 "serialized_bytes": size},
                   stats=all_stats)
