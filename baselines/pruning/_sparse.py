"""Masks and statistics shared by the unstructured and N:M pruning methods (`magnitude` per layer, `wanda`,
`sparsegpt`).

N:M follows NVIDIA's convention: N non-zeros kept in every group of M consecutive weights along the input
dimension (2:4: two of every four, sparsity 0.5). Ties in a score are broken by position (stable sorts), so
the number of weights removed is exact and the choice deterministic.

What the runtime can exploit: unstructured zeros give no speedup on dense kernels (the timed models here are
dense PyTorch), and 2:4 speeds up only with sparse tensor-core kernels on NVIDIA SM80+ GPUs, of which there is
no CPU equivalent. The record says so in fields: `size.runtime_exploits_sparsity` (False: the timed runtime
multiplies every zero) and `method_stats` (`nm_n`, `nm_m`, `nm_conforming`: whether every group satisfies the
pattern, so that a 2:4 sparse kernel could run it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from bench.config import ConfigError

if TYPE_CHECKING:
    import torch

STRUCTURES = "'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4', '4:8')"


def parse_structure(structure: str) -> tuple[int, int] | None:
    """None for unstructured, else (N kept, M group size)."""
    if structure == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", structure)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"structure={structure!r} is not valid: use {STRUCTURES}")
    return int(m.group(1)), int(m.group(2))


def check_sparsity_and_structure(sparsity: float, structure: str) -> None:
    from bench.config import check_range

    check_range("sparsity", sparsity, lo=0, hi=1, hi_open=True)
    nm = parse_structure(structure)
    if nm is not None and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise ConfigError(f"structure={structure} keeps {nm[0]} of every {nm[1]} weights, sparsity "
                          f"{1 - nm[0] / nm[1]:g}; set sparsity={1 - nm[0] / nm[1]:g} with it, or use "
                          f"structure=unstructured")


def lowest_k_mask(scores: "torch.Tensor", k: int) -> "torch.Tensor":
    """Boolean keep-mask of a 1-D score vector with the k lowest removed (ties by position)."""
    import torch

    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return keep.view_as(scores)


def per_row_mask(scores: "torch.Tensor", sparsity: float) -> "torch.Tensor":
    """Remove round(sparsity * columns) lowest scores in every row (Wanda's comparison group)."""
    import torch

    k = int(round(sparsity * scores.shape[1]))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def nm_mask(scores: "torch.Tensor", n: int, m: int) -> "torch.Tensor":
    """Keep the n highest scores in every group of m consecutive columns (the columns must divide by m)."""
    import torch

    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features do not split into groups of {m} for {n}:{m} sparsity")
    g = scores.reshape(rows, cols // m, m)
    order = g.sort(dim=2, stable=True).indices  # ascending: the first m - n are removed
    keep = torch.ones(g.shape, dtype=torch.bool, device=g.device)
    keep.scatter_(2, order[:, :, :m - n], False)
    return keep.reshape(rows, cols)


def nm_conforming(weight: "torch.Tensor", n: int, m: int) -> bool:
    """Every group of m consecutive weights in a row has at most n non-zeros."""
    rows, cols = weight.shape
    return cols % m == 0 and bool(((weight.reshape(rows, cols // m, m) != 0).sum(dim=2) <= n).all())


def pruning_stats(model, linears: list, structure: str, target: float) -> dict[str, float]:
    """What the record says about the sparsity reached (see the module docstring)."""
    weights = [lin.weight for lin in linears]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    params = sum(p.numel() for p in model.parameters())
    nm = parse_structure(structure)
    out = {"target_sparsity": target, "sparsity_of_pruned_layers": zeros / max(1, total),
           "pruned_layers": float(len(weights)), "share_of_parameters_in_pruned_layers": total / max(1, params),
           "nm_n": float(nm[0]) if nm else 0.0, "nm_m": float(nm[1]) if nm else 0.0}
    if nm:
        out["nm_conforming"] = float(all(nm_conforming(w.detach(), *nm) for w in weights))
    return out
