"""`smoothquant`: W8A8 after migrating activation outliers into the weights (Xiao, Lin, Seznec, Wu, Demouth and
Han, 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models", ICML 2023,
arXiv:2211.10438).

Activations have a few input channels with outliers 10-100x the rest, which a per-tensor or per-token int8 grid
cannot hold; weights are easy to quantize. A per-input-channel scale moves the difficulty from X to W without
changing the product (eq. 3):

    Y = (X diag(s)^-1) (diag(s) W),     s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (eq. 4)

max|X_j| over the calibration tokens, max|W_j| over the output rows of every Linear reading X (column j of W
here, whose weight is [out, in]), alpha the migration strength (the paper's 0.5; s clamped to at least 1e-5 as
in the authors' code). As in the authors' `smooth_lm`, only the Linears that read a norm directly are smoothed
(q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`), where diag(s)^-1 folds into the norm's
weight (and bias) and costs nothing at run time (`_smooth`); o_proj and down_proj are quantized unsmoothed. A
model without such norms (a post-norm BERT, whose norms also feed the residual) is refused: causal LMs only.
Statistics come block by block from the float model (the smoothed blocks compute the same function).

Then W8A8 (section 4, "SmoothQuant-O1..O3"): every block Linear's weight in int8 per output channel, its input
activations quantized per call, the product in int8 with int32 accumulation, on `int8-dynamic`'s kernels
(`_kernels.Int8Linear`, torch's quantized CPU engine; embeddings and the LM head stay float, as in the paper).
Activations are quantized per tensor, dynamically: the paper's SmoothQuant-O2 (O1 is per-token dynamic, O3 per-
tensor static), at 7 bits on the x86/fbgemm engines (their reduce_range). On a CPU float32 profile the timed
runtime runs those kernels (`runtime_low_precision: true`); elsewhere the same codes and activation grid run in
float (`_kernels.float_twin`) and the record says false.

Why hand-written: the authors' `smoothquant` package is not on the registry and its int8 kernels (`torch-int`)
need CUDA; `llmcompressor`'s SmoothQuantModifier pins other torch and transformers versions than this project's.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from bench.api import TrainingRows
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 leaves activations as they are, 1 moves all of it into the weights
    calibration_samples: int = 512  # training examples fed through the model (the paper's 512 sentences)

    def validate(self) -> None:
        check_range("alpha", self.alpha, lo=0, hi=1)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def smooth_scale(act_max, weights: list, alpha: float):
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (eq. 4), max|W_j| over every weight [out, in] in `weights`."""
    import torch

    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def smooth_model(model, batches, alpha: float) -> int:
    """Fold the smoothing scales of every norm-read group of Linears into `model` in place (the function is
    unchanged); returns the number of Linears smoothed."""
    import torch

    from baselines.pruning import _calib
    from baselines.quantization import _smooth

    smoothed = [0]

    def smooth_block(i, block, inputs):
        groups = [g for g in _smooth.groups(block) if g.kind == "norm"]
        act_max = {g.names[0]: None for g in groups}

        def consume(name, x):
            if name in act_max:
                m = x.abs().amax(dim=0)
                act_max[name] = m if act_max[name] is None else torch.maximum(act_max[name], m)

        _calib.collect_linear_inputs(block, inputs, consume)
        mods = dict(block.named_modules())
        for g in groups:
            if act_max[g.names[0]] is None:
                continue
            _smooth.apply_scale(block, g, smooth_scale(act_max[g.names[0]], [mods[n].weight for n in g.names],
                                                       alpha))
            smoothed[0] += len(g.names)

    _calib.sequential_blocks(model, batches, smooth_block)
    return smoothed[0]


_FAKE = None


def _fake_int8_class():
    """`FakeInt8Linear` (built once, on first use: module scope stays torch-free)."""
    global _FAKE
    if _FAKE is not None:
        return _FAKE
    import torch.nn as nn

    class FakeInt8Linear(nn.Module):
        """W8A8 in float where no int8 kernel runs: `_kernels.float_twin` of an `Int8Linear` (the same codes,
        scales and per-tensor activation grid), on any device and dtype."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            from baselines.quantization import _kernels

            return _kernels.float_twin(self.layer, x).to(x.dtype)

    _FAKE = FakeInt8Linear
    return _FAKE


@register_method("smoothquant", family="quantization", paper="Xiao et al., SmoothQuant: Accurate and Efficient "
                 "Post-Training Quantization for Large Language Models", year=2023,
                 url="https://arxiv.org/abs/2211.10438", modalities=("causal-lm",),
                 requires={"causal-lm": (TrainingRows,)},
                 summary="activation outliers migrated into the weights by s = max|X|^alpha / max|W|^(1-alpha) "
                         "folded into the norms, then int8 weights and activations (int8 CPU kernels)")
class SmoothQuant(Method):
    Config = SmoothQuantConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy
        import time

        import torch

        from baselines.base import Cost
        from baselines.pruning import _calib
        from baselines.quantization import _kernels, _oneshot, _smooth

        cfg = self.config
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.model).float()
        batches = _calib.calibration_batches(task, task.prepare(model, ctx), ctx, cfg.calibration_samples)
        hf = _calib.hf_model(model)
        smoothed = smooth_model(hf, batches, cfg.alpha) if cfg.alpha > 0 else 0
        if cfg.alpha > 0 and not smoothed:
            raise ValueError(f"smoothquant: no Linear of {type(hf).__name__}'s blocks reads a norm it can be folded "
                             f"into (it folds into {', '.join(g[0] for g in _smooth.LLAMA_GROUPS if g[1] == 'norm')} "
                             f"of a pre-norm Llama/Qwen/Mistral block); alpha=0 is plain W8A8")
        linears = _calib.all_block_linears(hf)
        size = _oneshot.serialized_bytes(model, linears, 8, None, True)
        real = ctx.device == "cpu" and ctx.dtype == "float32" and "none" != torch.backends.quantized.engine
        int8 = _kernels.int8_linear_class()
        ids = {id(lin) for lin in linears}
        if real:
            make = lambda name, lin: int8.from_linear(lin) if id(lin) in ids else None  # noqa: E731
        else:
            fake = _fake_int8_class()
            make = lambda name, lin: fake(int8.from_linear(lin, reduce=False).to(lin.weight.device)) \
                if id(lin) in ids else None  # noqa: E731
        swapped = _kernels.swap_linears(hf, make)
        model = model.to(ctx.device)
        reduce = real and _kernels.engine_reduces_range()
        tokens = _calib.token_count(batches)
        cost = Cost(time.perf_counter() - t0, len(batches), sum(len(b["input_ids"]) for b in batches),
                    f"one-shot: {tokens} calibration tokens for the activation maxima, {smoothed} Linears smoothed "
                    f"into their norms, {len(swapped)} to int8")
        calls0 = _kernels.kernel_calls(model)

        def stats() -> dict[str, float]:
            return {"smoothed_linears": float(smoothed), "int8_linear_layers": float(len(swapped)),
                    "int8_kernel_calls": float(_kernels.kernel_calls(model) - calls0),
                    "calibration_tokens": float(tokens)}

        return Applied(task.prepare(model, ctx), cost, runtime_low_precision=real, stats=stats,
                       quantization={"weight_bits": 8, "activation_bits": 7 if reduce else 8, "group_size": None,
                                     "serialized_bytes": size})
