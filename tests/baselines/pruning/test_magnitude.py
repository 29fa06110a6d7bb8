from __future__ import annotations

import pytest
import torch

from baselines.pruning.magnitude import global_magnitude_masks, prunable
from bench.runner import run


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_masks_remove_exactly_the_requested_share(sparsity):
    weights = prunable(net())
    masks = global_magnitude_masks(weights, sparsity)
    n = sum(w.numel() for w in weights)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * n)


def test_masks_remove_the_smallest_weights_globally():
    weights = prunable(net())
    masks = global_magnitude_masks(weights, 0.5)
    kept = torch.cat([w.detach().abs()[m] for w, m in zip(weights, masks)])
    dropped = torch.cat([w.detach().abs()[~m] for w, m in zip(weights, masks)])
    assert dropped.max() <= kept.min()


def test_ties_are_broken_exactly():
    w = [torch.ones(10, 10)]
    (m,) = global_magnitude_masks(w, 0.37)
    assert int((~m).sum()) == 37


def test_sparsity_zero_is_the_reference(results_root):
    r = run("digits", "magnitude", overrides={"sparsity": "0"}, budget="smoke", results_root=results_root).result
    assert r.quality.delta == 0 and r.fidelity.value == 1.0 and r.size.sparsity == 0


def test_reported_sparsity_and_runtime_flag(results_root):
    r = run("digits", "magnitude", overrides={"sparsity": "0.7", "finetune_epochs": "1"}, budget="smoke",
            results_root=results_root).result
    weights = 159626 - (32 + 64 + 128 + 128 + 10)  # every weight but the biases is prunable
    assert r.size.method.parameters - r.size.method.nonzero_parameters == round(0.7 * weights)
    assert r.size.runtime_exploits_sparsity is False and r.cost.steps > 0
