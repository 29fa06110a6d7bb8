"""`sparsegpt`: one-shot pruning with OBS weight reconstruction (Frantar and Alistarh, 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", ICML 2023, arXiv:2301.00774).

For each Linear layer in the transformer blocks, with calibration inputs X ([in, tokens]), SparseGPT solves the
layer-wise problem  min_{M, W'} || W X - (M * W') X ||_2^2  approximately, row by row, from the Hessian

    H = 2 X X^T  (accumulated in float32 over the calibration tokens),  H <- H + lambda I,
    lambda = dampening * mean(diag(H)),

(the Hessians, the damped inverse Cholesky factor and the layer-by-layer pass are shared with `gptq`, in
`baselines._hessian`).

Going through the columns j = 1..in in blocks of `block_size` (the paper's 128), with H^-1 the upper Cholesky
factor of the inverse Hessian (so that its row j holds the inverse Hessian of the columns not yet treated):
  - the mask of a block is chosen at its start from the OBS saliency  w_ij^2 / [H^-1]_jj^2  (the paper's
    adaptive mask selection; exactly the share of the layer's weights that the block must remove, so the layer
    reaches the requested sparsity exactly), or with `structure=N:M` in every group of M columns;
  - each column's pruned weights are removed and the error is spread over the columns after it with the OBS
    update   delta_i = - (w_ij / [H^-1]_jj) * [H^-1]_{j, j:}   (eq. 3 of the paper), inside the block
    immediately and on the later blocks in one matrix product at the block's end (the lazy batched update).
Blocks are pruned one after the other on the outputs of the already-pruned blocks (`_calib.sequential_blocks`),
as in the authors' reference code.

Why hand-written: `llmcompressor`'s SparseGPTModifier pins transformers <= 5.17 and torch 2.14.0 (this project
runs transformers 5.23, torch 2.14.1); `torch.ao.pruning` has no second-order sparsifier.

Sparsity and speed: as for `wanda`, dense CPU kernels multiply the zeros (`size.runtime_exploits_sparsity` is
False); 2:4 needs NVIDIA's sparse tensor-core kernels (SM80+). `method_stats` carries the sparsity reached and
the N:M conformity (`baselines.pruning._sparse`).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from baselines.pruning import _sparse
from bench.config import check_range
from bench.api import EncoderData, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class SparseGPTConfig:
    sparsity: float = 0.5  # share of each pruned layer's weights set to zero (the paper's headline setting)
    structure: str = "unstructured"  # or "N:M", N kept of every M inputs (e.g. "2:4"; then sparsity = 1 - N/M)
    block_size: int = 128  # columns per lazy-update block (the paper's B = 128)
    dampening: float = 0.01  # lambda as a share of the mean diagonal of H (the paper's 1%)
    calibration_samples: int = 128  # training examples fed through the model (the paper's 128 sequences)

    def validate(self) -> None:
        _sparse.check_sparsity_and_structure(self.sparsity, self.structure)
        check_range("block_size", self.block_size, lo=1)
        check_range("dampening", self.dampening, lo=0, lo_open=True)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def sparsegpt_prune(weight, hessian, sparsity: float, structure: str = "unstructured", block_size: int = 128,
                    dampening: float = 0.01):
    """The pruned and reconstructed weight [out, in] (float32) from the layer's H = 2 X X^T [in, in]."""
    import torch

    from baselines import _hessian

    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, cols = W.shape
    nm = _sparse.parse_structure(structure)
    if nm and cols % nm[1]:
        raise ValueError(f"{cols} input features do not split into groups of {nm[1]} for {structure} sparsity")
    if nm and block_size % nm[1]:
        block_size = max(nm[1], block_size - block_size % nm[1])  # groups never straddle two blocks
    _hessian.drop_dead_inputs(W, H)  # inputs that were always zero: their weights can go at no cost
    Hinv = _hessian.inverse_cholesky(H, dampening)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        if nm:
            keep = torch.ones_like(W1, dtype=torch.bool)
        else:  # exact count: what the layer must have removed by the block's end, less what it has removed
            k = int(round(sparsity * b1 * rows)) - int(round(sparsity * b0 * rows))
            keep = _sparse.lowest_k_mask(W1 ** 2 / d.unsqueeze(0) ** 2, k)
        for j in range(b1 - b0):
            if nm and j % nm[1] == 0:  # choose this group's mask from the weights as updated so far
                m = nm[1]
                keep[:, j:j + m] = _sparse.nm_mask(W1[:, j:j + m] ** 2 / d[j:j + m].unsqueeze(0) ** 2, nm[0], m)
            w = W1[:, j]
            q = torch.where(keep[:, j], w, torch.zeros_like(w))
            err = (w - q) / d[j]
            W1[:, j:] -= err.unsqueeze(1) @ Hinv1[j, j:].unsqueeze(0)
            W1[:, j] = q
            Err1[:, j] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return W


def prune_model(model, batches, sparsity: float, structure: str, block_size: int, dampening: float) -> list:
    """SparseGPT over every block of `model` in place; returns the pruned Linear layers."""
    from baselines import _hessian

    return _hessian.layer_by_layer(model, batches, lambda name, lin, hess: sparsegpt_prune(
        lin.weight, hess, sparsity, structure, block_size, dampening))


@register_method("sparsegpt", family="pruning", paper="Frantar and Alistarh, SparseGPT: Massive Language Models "
                 "Can Be Accurately Pruned in One-Shot", year=2023, url="https://arxiv.org/abs/2301.00774",
                 modalities=("causal-lm", "text-classification"),
                 requires={"causal-lm": (TrainingRows,), "text-classification": (EncoderData,)},
                 summary="one-shot unstructured or N:M pruning with OBS weight updates from the calibration "
                         "Hessian 2XX^T, in column blocks")
class SparseGPT(Method):
    Config = SparseGPTConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.pruning import _calib

        cfg = self.config
        return _calib.one_shot(subject, task, ctx, cfg,
                               lambda hf, batches: prune_model(hf, batches, cfg.sparsity, cfg.structure,
                                                               cfg.block_size, cfg.dampening),
                               ", Hessians and OBS updates block by block")
