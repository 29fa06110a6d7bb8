"""`awq`: activation-aware weight quantization (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, 2024,
"AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration", MLSys 2024,
arXiv:2306.00978).

The weights that matter are those whose input channels carry large activations. Rather than keeping them in
float, AWQ scales those input channels up before round-to-nearest quantization, which lowers their relative
rounding error, and divides their input by the same scale (section 3.2):

    Q(W diag(s)) (diag(s)^-1 X)

with the per-input-channel scale from the mean activation magnitude over the calibration tokens (eq. 5)

    s = s_X ^ alpha,     s_X_j = mean_t |x_tj|,     normalised  s <- s / sqrt(max(s) * min(s))  (as the authors'
                                                                                                    code does)
    alpha* = argmin_{alpha in {0, 1/20, ..., 19/20}}  || Q(W diag(s)) (diag(s)^-1 X) - W X ||^2

searched per group of Linears that read the same input (the authors' grid of 20; alpha = 0 is s = 1, plain
round-to-nearest, so the search never does worse than it on the calibration data). The loss here is the summed
output error of the group's quantized scaled Linears; the authors' code measures it after the attention or MLP
module that holds them (the same for o_proj and down_proj, where the module is the Linear).

Scales are folded into the previous operation where that is exact (`_smooth`: the RMSNorm/LayerNorm before
q/k/v and gate/up, v_proj's rows before o_proj without grouped-query attention, up_proj's rows before down_proj),
otherwise kept as an input multiplier. Statistics come block by block from the float model's outputs (the scaled
blocks compute the same function; the weights are quantized after the pass, as in the authors' `run_awq`), then
every block Linear is quantized to `bits` bits in groups of `group_size` input columns with
`_quant.fake_quantize` (round-to-nearest, asymmetric min-max by default, the paper's INT4-g128 setting).
The authors' weight-clipping search (`auto_clip`, not in the paper's method section) is not done.

Why hand-written: `autoawq` is archived (deprecated in 2025) and pins older torch and transformers; `llmcompressor`'s
AWQModifier pins other torch and transformers versions than this project's (torch 2.14.1, transformers 5.23).
At 4 bits, asymmetric, in groups the CPU's int4 weight-only kernel takes
(32-256), the codes run on that kernel (`_oneshot.to_int4_kernels`, `runtime_low_precision: true`); otherwise the
weights are fake-quantized (float32 on the grid, false). `serialized_bytes` counts the packed codes, scales and
zeros (`_oneshot.serialized_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from bench.api import EncoderData, TrainingRows
from bench.config import check_range
from bench.registry import register_method

GRID = 20  # the authors' n_grid: alpha in {0, 1/20, ..., 19/20}


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4  # weight bits (the paper's INT4; 3 is its low-bit setting)
    group_size: int | None = 64  # input columns sharing one scale and zero; none: one per output row (the
    # paper's g128 does not divide the arith reference's 192 features)
    symmetric: bool = False  # zero point at 0 instead of the paper's asymmetric min-max grid
    alpha: float | None = None  # a fixed exponent for every group; none: grid-searched per group (the paper's)
    calibration_samples: int = 128  # training examples fed through the model (the paper's 128 sequences)

    def validate(self) -> None:
        from baselines.quantization import _quant

        _quant.check_bits(self.bits)
        if self.group_size is not None:
            check_range("group_size", self.group_size, lo=1)
        if self.alpha is not None:
            check_range("alpha", self.alpha, lo=0, hi=1)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def awq_scale(mean_abs, alpha: float):
    """s = s_X^alpha, normalised by sqrt(max(s) * min(s)) (eq. 5 and the authors' code)."""
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quantize(weight, s, bits: int, group_size: int | None, symmetric: bool = False):
    """Q(W diag(s)) diag(s)^-1: what the scaled, quantized Linear computes on the unscaled input."""
    from baselines.quantization import _quant

    return _quant.fake_quantize(weight.float() * s.unsqueeze(0), bits, group_size, symmetric) / s.unsqueeze(0)


def search_alpha(weights: list, x, bits: int, group_size: int | None, symmetric: bool = False, grid: int = GRID):
    """(alpha*, s*, {alpha: loss}) over the grid for Linears of weights `weights` reading inputs x [tokens, in]."""
    import torch

    weights = [w.detach().float() for w in weights]
    mean_abs = x.abs().mean(dim=0)
    ref = [x @ w.T for w in weights]
    losses = {}
    best = (float("inf"), 0.0, None)
    for k in range(grid):
        alpha = k / grid
        s = awq_scale(mean_abs, alpha)
        loss = sum(float(torch.sum((x @ scaled_fake_quantize(w, s, bits, group_size, symmetric).T - r) ** 2))
                   for w, r in zip(weights, ref))
        losses[alpha] = loss
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[1], best[2], losses


def quantize_model(model, batches, cfg: AWQConfig, params: dict | None = None) -> tuple[list, list[float]]:
    """AWQ over every block of `model` in place; returns the quantized Linear layers and each group's alpha.
    `params`, if given, receives each layer's grid: id(layer) -> (scale, zero), [rows * groups, 1] each."""
    import torch

    from baselines.pruning import _calib
    from baselines.quantization import _quant, _smooth

    alphas: list[float] = []

    def scale_block(i, block, inputs):
        groups = _smooth.groups(block)
        first = {g.names[0] for g in groups}
        xs: dict[str, list] = {n: [] for n in first}

        def consume(name, x):
            if name in first:
                xs[name].append(x)

        _calib.collect_linear_inputs(block, inputs, consume)
        mods = dict(block.named_modules())
        for g in groups:
            x = torch.cat(xs[g.names[0]])
            if cfg.alpha is None:
                alpha, s, _ = search_alpha([mods[n].weight for n in g.names], x, cfg.bits, cfg.group_size,
                                           cfg.symmetric)
            else:
                alpha, s = cfg.alpha, awq_scale(x.abs().mean(dim=0), cfg.alpha)
            _smooth.apply_scale(block, g, s)
            alphas.append(alpha)

    _calib.sequential_blocks(model, batches, scale_block)
    layers = _calib.all_block_linears(model)
    with torch.no_grad():
        for lin in layers:
            if params is not None:
                params[id(lin)] = _quant.group_params(lin.weight.reshape(-1, cfg.group_size or lin.in_features),
                                                      cfg.bits, cfg.symmetric)
            lin.weight.copy_(_quant.fake_quantize(lin.weight, cfg.bits, cfg.group_size, cfg.symmetric))
    return layers, alphas


@register_method("awq", family="quantization", paper="Lin et al., AWQ: Activation-aware Weight Quantization for "
                 "On-Device LLM Compression and Acceleration", year=2024, url="https://arxiv.org/abs/2306.00978",
                 modalities=("causal-lm", "text-classification"),
                 requires={"causal-lm": (TrainingRows,), "text-classification": (EncoderData,)},
                 summary="group-wise low-bit weights after per-input-channel scales s_X^alpha (alpha grid-searched "
                         "on calibration data) folded into the previous norm or Linear")
class AWQ(Method):
    Config = AWQConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.quantization import _oneshot

        cfg = self.config
        alphas: list[float] = []
        params: dict = {}

        def quantize(hf, batches):
            layers, found = quantize_model(hf, batches, cfg, params)
            alphas.extend(found)
            return layers

        def stats():
            return {"scaled_groups": len(alphas), "mean_alpha": sum(alphas) / max(1, len(alphas))}

        return _oneshot.one_shot(subject, task, ctx, cfg, quantize,
                                 ", activation scales searched and folded block by block", stats=stats,
                                 params=params)
