"""The second-order (OBS) layer machinery that `sparsegpt` (pruning) and `gptq` (quantization) share: both solve,
for every Linear inside the transformer blocks, the layer-wise reconstruction problem

    min_{W'} || W X - W' X ||_2^2     (X: the layer's calibration inputs, [in, tokens])

column by column, W' constrained (sparse, or on a quantization grid), from the same Hessian of that objective

    H = 2 X X^T                     accumulated in float32 over the real calibration tokens   (`hessians`)
    H <- H + lambda I,  lambda = dampening * mean(diag(H))                                      (the papers' 1%)
    U = chol(H^-1)^T                the upper Cholesky factor of the inverse Hessian            (`inverse_cholesky`)

Row j of U holds, up to a scale, the inverse Hessian of the columns j.. not yet treated once columns < j are
fixed (SparseGPT section 3.2; GPTQ section 4, "Cholesky reformulation"), so one factorisation serves every
column: fixing column j to q and spreading its error over the later columns is

    delta W_{:, j:} = - ((w_j - q_j) / U_jj) * U_{j, j:}

Inputs that were zero on every calibration token (diag(H) = 0) carry no information: their Hessian diagonal is
set to 1 and their weights to 0, as in both authors' reference code (`drop_dead_inputs`).

The layer-by-layer pass (`layer_by_layer`): blocks one after another (`baselines.pruning._calib.sequential_blocks`),
each block's Hessians accumulated from its inputs as produced by the already-treated blocks before it, then each
of its Linear layers replaced by what the method makes of (W, H).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def hessians(block, inputs) -> dict[str, "torch.Tensor"]:
    """H = 2 X X^T [in, in] (float32) of every Linear in `block`, by name, over the real tokens of `inputs`
    (`_calib.BlockInput`s)."""
    import torch

    from baselines.pruning import _calib

    linears = _calib.block_linears(block)
    hess = {n: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)
            for n, lin in linears.items()}

    def consume(name, x):
        hess[name] += 2 * x.T @ x

    _calib.collect_linear_inputs(block, inputs, consume)
    return hess


def drop_dead_inputs(W: "torch.Tensor", H: "torch.Tensor") -> None:
    """In place: the inputs never active in calibration get diag(H) = 1 and weights 0."""
    import torch

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0


def inverse_cholesky(H: "torch.Tensor", dampening: float) -> "torch.Tensor":
    """U, the upper Cholesky factor of (H + dampening * mean(diag(H)) I)^-1; H is dampened in place."""
    import torch

    H += dampening * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def layer_by_layer(model, batches, treat: Callable[[str, "torch.nn.Linear", "torch.Tensor"], "torch.Tensor"]
                   ) -> list:
    """Over every block of `model` in place: each Linear's weight becomes `treat(name, linear, H)` (a float
    tensor of the weight's shape). Returns the treated Linear layers in order."""
    import torch

    from baselines.pruning import _calib

    treated = []

    def treat_block(i, block, inputs):
        hess = hessians(block, inputs)
        with torch.no_grad():
            for name, lin in _calib.block_linears(block).items():
                lin.weight.copy_(treat(name, lin, hess[name]).to(lin.weight.dtype))
                treated.append(lin)

    _calib.sequential_blocks(model, batches, treat_block)
    return treated
