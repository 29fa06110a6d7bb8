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


# ---- language models and encoders: per layer, over the blocks' Linear layers ------------------------------------

def test_layer_scope_prunes_every_block_linear_exactly_and_leaves_the_rest(llama_subject, arith, ctx):
    from baselines.pruning import _calib
    from bench.registry import create_method

    out = create_method("magnitude", {"sparsity": "0.6"}).apply(llama_subject, arith, ctx)  # auto: per layer
    model, ref = out.subject.model, llama_subject.model
    for lin, ref_lin in zip(_calib.all_block_linears(model), _calib.all_block_linears(ref)):
        removed = lin.weight == 0
        assert int(removed.sum()) == round(0.6 * lin.weight.numel())
        assert ref_lin.weight.abs()[removed].max() <= ref_lin.weight.abs()[~removed].min()
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert out.stats()["sparsity_of_pruned_layers"] == pytest.approx(0.6, abs=1e-4)
    assert "(layer)" in out.cost.description and out.runtime_exploits_sparsity is False


def test_scope_auto_is_global_on_images_and_layer_on_encoders(bert_subject, nli, ctx):
    from bench.registry import create_method

    out = create_method("magnitude", {"sparsity": "0.5"}).apply(bert_subject, nli, ctx)
    assert "(layer)" in out.cost.description
    assert torch.equal(out.subject.model.hf.classifier.weight, bert_subject.model.hf.classifier.weight)
    glob = create_method("magnitude", {"sparsity": "0.5", "scope": "global"}).apply(bert_subject, nli, ctx)
    assert "(global)" in glob.cost.description and glob.stats is None


def test_finetuning_an_lm_is_refused_with_the_tasks_that_allow_it(llama_subject, arith, ctx):
    from bench.config import ConfigError
    from bench.registry import create_method

    with pytest.raises(ConfigError, match="tasks that do: arith-nli, cifar10, digits"):
        create_method("magnitude", {"finetune_epochs": "1"}).apply(llama_subject, arith, ctx)
    with pytest.raises(ConfigError, match="'auto', 'global', 'layer'"):
        create_method("magnitude", {"scope": "row"})
