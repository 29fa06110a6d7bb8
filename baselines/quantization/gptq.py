"""`gptq`: one-shot weight quantization with second-order error compensation (Frantar, Ashkboos, Hoefler and
Alistarh, 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023,
arXiv:2210.17323).

For each Linear layer in the transformer blocks, with calibration inputs X ([in, tokens]), GPTQ solves the
layer-wise problem  argmin_{W'} || W X - W' X ||_2^2  with W' on the quantization grid, quantizing one input
column at a time and moving each column's error onto the columns not yet quantized (Optimal Brain Quantization,
eq. 2-3 of the paper):

    q_j = quant(w_j),        delta W_{:, F} = - ((w_j - q_j) / [H_F^-1]_jj) * [H_F^-1]_{j, F}

with H = 2 X X^T the Hessian of the objective and F the columns still free. The paper's three steps, as here:
  - arbitrary order (section 4, step 1): the same column order for every row, so H_F^-1 is shared by all rows;
    `act_order` (the authors' later "--act-order" heuristic) takes the columns by decreasing diag(H) instead;
  - lazy batch updates (step 2): inside a block of `block_size` columns (the paper's B = 128) the updates are
    applied column by column, and to the columns after the block in one matrix product at the block's end;
  - Cholesky reformulation (step 3): [H_F^-1]_{j, F} is row j of U, the upper Cholesky factor of
    (H + lambda I)^-1, lambda = `dampening` * mean(diag(H)) (the paper's 1%); no inverse is ever updated.
Group-wise quantization (section 5, "grouping"): the scale and zero of each group of `group_size` consecutive
columns (consecutive in processing order) are computed when the group's first column is reached, from the
weights as updated by the quantization of the columns before it (the grid adapts to the compensation). Blocks are
aligned to whole groups so a group's weights are all up to date when it starts. With `act_order` the groups are
consecutive in the permuted order (the reference's default with grouping): a serialized layer then also needs the
group index of every input column (`g_idx`, int32), which the serialized size counts.

The Hessians, dead-input handling, damped inverse Cholesky and the block-by-block pass are `sparsegpt`'s, shared
in `baselines._hessian`; blocks are quantized one after the other on the outputs of the already-quantized blocks,
as in the authors' reference code. The grid (asymmetric min-max by default, or symmetric) is
`baselines.quantization._quant`'s round-to-nearest one, so at dampening -> infinity GPTQ is round-to-nearest.

Why hand-written: `auto-gptq` is archived and needs CUDA extensions, `gptqmodel` and `llmcompressor` pin other
torch and transformers versions than this project's (torch 2.14.1, transformers 5.23), and `optimum`'s GPTQ
path wraps `gptqmodel`. At 4 bits, asymmetric, in groups the CPU's int4 kernel takes (32-256)
and without act-order (whose permuted groups it cannot index), the codes run on that kernel
(`_oneshot.to_int4_kernels`, `runtime_low_precision: true`); otherwise the weights are fake-quantized (float32 on
the grid, false). `serialized_bytes` is the size of the packed codes, the per-group scales and zeros and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from bench.api import EncoderData, TrainingRows
from bench.config import check_range
from bench.registry import register_method


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4  # weight bits (the paper's headline 4-bit; 3 and 2 are its low-bit settings)
    group_size: int | None = 64  # input columns sharing one scale and zero; none: one per output row (the
    # paper's g128 does not divide the arith reference's 192 features)
    symmetric: bool = False  # zero point at 0 (symmetric grid) instead of min-max asymmetric (the paper's)
    act_order: bool = False  # columns by decreasing diag(H) (the authors' later heuristic; off in the paper)
    block_size: int = 128  # columns per lazy-update block (the paper's B = 128)
    dampening: float = 0.01  # lambda as a share of the mean diagonal of H (the paper's 1%)
    calibration_samples: int = 128  # training examples fed through the model (the paper's 128 segments)

    def validate(self) -> None:
        from baselines.quantization import _quant

        _quant.check_bits(self.bits)
        if self.group_size is not None:
            check_range("group_size", self.group_size, lo=1)
        check_range("block_size", self.block_size, lo=1)
        check_range("dampening", self.dampening, lo=0, lo_open=True)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def gptq_quantize(weight, hessian, bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
                  act_order: bool = False, block_size: int = 128, dampening: float = 0.01, grids: list | None = None):
    """The quantized (and dequantized) weight [out, in] in float32 from the layer's H = 2 X X^T [in, in];
    `group_size` None is one group per output row. `grids`, if given, receives each group's (scale, zero)
    (rows x 1 each) in processing order."""
    import torch

    from baselines import _hessian
    from baselines.quantization import _quant

    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, cols = W.shape
    gs = _quant.check_group_size(group_size, cols) or cols
    if block_size % gs:
        block_size = max(gs, block_size - block_size % gs)  # groups never straddle two blocks
    _hessian.drop_dead_inputs(W, H)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _hessian.inverse_cholesky(H, dampening)
    Q = torch.zeros_like(W)
    scale = zero = None
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for j in range(b1 - b0):
            if (b0 + j) % gs == 0:  # the group starts: its grid from the weights as updated so far
                scale, zero = _quant.group_params(W1[:, j:j + gs], bits, symmetric)
                if grids is not None:
                    grids.append((scale, zero))
            w = W1[:, j:j + 1]
            q = _quant.dequantize(_quant.quantize(w, scale, zero, bits), scale, zero).flatten()
            err = (w.flatten() - q) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) @ U1[j, j:].unsqueeze(0)
            Q[:, b0 + j] = q
            Err1[:, j] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def quantize_model(model, batches, cfg: GPTQConfig, params: dict | None = None) -> list:
    """GPTQ over every block of `model` in place; returns the quantized Linear layers. `params`, if given and
    without act-order, receives each layer's grid: id(layer) -> (scale, zero), [rows * groups, 1] each."""
    import torch

    from baselines import _hessian

    def treat(name, lin, hess):
        grids = [] if params is not None and not cfg.act_order else None
        q = gptq_quantize(lin.weight, hess, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_order,
                          cfg.block_size, cfg.dampening, grids)
        if grids is not None:
            params[id(lin)] = tuple(torch.cat([g[k] for g in grids], dim=1).reshape(-1, 1) for k in (0, 1))
        return q

    return _hessian.layer_by_layer(model, batches, treat)


@register_method("gptq", family="quantization", paper="Frantar et al., GPTQ: Accurate Post-Training Quantization "
                 "for Generative Pre-trained Transformers", year=2023, url="https://arxiv.org/abs/2210.17323",
                 modalities=("causal-lm", "text-classification"),
                 requires={"causal-lm": (TrainingRows,), "text-classification": (EncoderData,)},
                 summary="group-wise low-bit weights quantized column by column with OBS error compensation "
                         "from the calibration Hessian 2XX^T (lazy blocks, Cholesky form)")
class GPTQ(Method):
    Config = GPTQConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.quantization import _oneshot

        cfg = self.config
        g_idx = cfg.act_order and cfg.group_size is not None  # the group of each input column, int32
        params: dict = {}
        return _oneshot.one_shot(subject, task, ctx, cfg, lambda hf, batches: quantize_model(hf, batches, cfg, params),
                                 ", Hessians and OBQ updates block by block",
                                 extra_bytes=lambda layers: sum(4 * lin.in_features for lin in layers) if g_idx else 0,
                                 params=params)
