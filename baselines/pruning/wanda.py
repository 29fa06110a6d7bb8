"""`wanda`: pruning by weights and activations (Sun, Liu, Bair and Kolter, 2024, "A Simple and Effective Pruning
Approach for Large Language Models", ICLR 2024, arXiv:2306.11695).

Every Linear layer inside the transformer blocks (attention projections and MLP; embeddings and heads stay
dense) is scored with the norm of its input feature over the calibration tokens,

    S_ij = |W_ij| * ||X_j||_2,      ||X_j||_2 = sqrt( sum_t x_tj^2 )  over the calibration tokens t,

and within each output row i the round(sparsity * in_features) lowest-scoring weights are set to zero (the
paper's per-output comparison group), so every row reaches exactly the requested sparsity. With
`structure=N:M` the comparison group is instead every M consecutive inputs of a row, of which the N highest
scores are kept (the paper's 2:4 / 4:8 setting). No weight update, no retraining.

Calibration (`baselines.pruning._calib`): `calibration_samples` examples of the task's training split, fed
block by block, so each block's statistics come from the outputs of the already-pruned blocks before it, as
in the authors' reference code. The sum of squares is accumulated in float32 over real tokens only.

Why hand-written: `llmcompressor`'s WandaPruningModifier pins transformers <= 5.17 and torch 2.14.0 (this
project runs transformers 5.23, torch 2.14.1), `torchao.sparsity`'s Wanda sparsifier was removed after
torchao 0.18, and `torch.ao.pruning` has no activation-aware sparsifier for this.

Sparsity and speed: unstructured or 2:4 zeros in dense matrices give no speedup on the CPU runtime that is
timed here; 2:4 would need NVIDIA's sparse tensor-core kernels (SM80+). The record says so:
`size.runtime_exploits_sparsity` is False, and `method_stats` carries the sparsity reached in the pruned layers
and, for N:M, whether every group conforms (`baselines.pruning._sparse`).
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Method
from baselines.pruning import _sparse
from bench.config import check_range
from bench.api import EncoderData, TrainingRows
from bench.registry import register_method

LM_MODALITIES = ("causal-lm", "text-classification")


@dataclass(frozen=True)
class WandaConfig:
    sparsity: float = 0.5  # share of each pruned row's weights set to zero (the paper's headline setting)
    structure: str = "unstructured"  # or "N:M", N kept of every M inputs (e.g. "2:4"; then sparsity = 1 - N/M)
    calibration_samples: int = 128  # training examples fed through the model (the paper's 128 sequences)

    def validate(self) -> None:
        _sparse.check_sparsity_and_structure(self.sparsity, self.structure)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def wanda_mask(weight, sq_norm, sparsity: float, structure: str = "unstructured"):
    """Keep-mask of one Linear weight [out, in] given the per-input sum of squares ||X_j||^2 [in]."""
    import torch

    scores = weight.detach().abs().float() * torch.sqrt(sq_norm.float()).unsqueeze(0)
    nm = _sparse.parse_structure(structure)
    return _sparse.nm_mask(scores, *nm) if nm else _sparse.per_row_mask(scores, sparsity)


def prune_model(model, batches, sparsity: float, structure: str) -> list:
    """Wanda over every block of `model` in place (`batches` from `_calib.calibration_batches`); returns the
    pruned Linear layers."""
    import torch

    from baselines.pruning import _calib

    pruned = []

    def prune_block(i, block, inputs):
        linears = _calib.block_linears(block)
        sq = {n: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
              for n, lin in linears.items()}

        def consume(name, x):
            sq[name] += (x * x).sum(dim=0)

        _calib.collect_linear_inputs(block, inputs, consume)
        with torch.no_grad():
            for name, lin in linears.items():
                lin.weight.mul_(wanda_mask(lin.weight, sq[name], sparsity, structure).to(lin.weight.dtype))
                pruned.append(lin)

    _calib.sequential_blocks(model, batches, prune_block)
    return pruned


@register_method("wanda", family="pruning", paper="Sun et al., A Simple and Effective Pruning Approach for Large "
                 "Language Models (Wanda)", year=2024, url="https://arxiv.org/abs/2306.11695",
                 modalities=LM_MODALITIES,
                 requires={"causal-lm": (TrainingRows,), "text-classification": (EncoderData,)},
                 summary="zero the weights with the lowest |W| * ||X||_2 per output row (or N:M), calibrated on "
                         "training data; no weight update")
class Wanda(Method):
    Config = WandaConfig

    def apply(self, subject, task, ctx) -> Applied:
        from baselines.pruning import _calib

        cfg = self.config
        return _calib.one_shot(subject, task, ctx, cfg,
                               lambda hf, batches: prune_model(hf, batches, cfg.sparsity, cfg.structure),
                               " through the model block by block, then masks")
