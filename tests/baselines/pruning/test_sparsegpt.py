"""`sparsegpt`: exact per-layer sparsity, exact N:M masks, the reference at sparsity 0, and a layer
reconstruction error below Wanda's and magnitude's on the same layer and calibration data."""

from __future__ import annotations

import pytest
import torch

from baselines.pruning import _sparse
from baselines.pruning.sparsegpt import sparsegpt_prune
from baselines.pruning.wanda import wanda_mask
from bench.config import ConfigError
from bench.registry import create_method
from pruning_models import correlated_inputs, layer_error


def layer(out_f: int = 48, in_f: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    x = correlated_inputs(in_f, 512, seed=seed + 1)
    return w, x, 2 * x.T @ x


@pytest.mark.parametrize("sparsity,block", [(0.5, 128), (0.5, 16), (0.3, 24), (0.9, 7), (0.77, 64)])
def test_reaches_exactly_the_requested_sparsity_per_layer(sparsity, block):
    w, _, h = layer()
    new = sparsegpt_prune(w, h, sparsity, block_size=block)
    assert int((new == 0).sum()) == round(sparsity * w.numel())


@pytest.mark.parametrize("structure", ["2:4", "4:8", "1:4"])
def test_n_m_masks_keep_exactly_n_in_every_group(structure):
    n, m = _sparse.parse_structure(structure)
    w, _, h = layer()
    new = sparsegpt_prune(w, h, 1 - n / m, structure, block_size=30)  # blocks are rounded to whole groups
    groups = (new != 0).reshape(w.shape[0], -1, m).sum(dim=2)
    assert (groups == n).all()


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_is_below_wandas_and_magnitudes(structure, seed):
    w, x, h = layer(seed=seed)
    nm = _sparse.parse_structure(structure)
    sq = (x * x).sum(dim=0)
    sgpt = sparsegpt_prune(w, h, 0.5, structure)
    wanda = w * wanda_mask(w, sq, 0.5, structure)
    mag_scores = w.abs()
    mag = w * (_sparse.nm_mask(mag_scores, *nm) if nm else _sparse.lowest_k_mask(mag_scores, w.numel() // 2))
    e_sgpt, e_wanda, e_mag = (layer_error(w, p, x) for p in (sgpt, wanda, mag))
    assert e_sgpt < e_wanda and e_sgpt < e_mag
    assert e_wanda < e_mag  # the activation-aware score beats |W| alone when features differ in scale


def test_sparsity_zero_leaves_the_model_unchanged(llama_subject, arith, ctx, prompt_ids):
    out = create_method("sparsegpt", {"sparsity": "0"}).apply(llama_subject, arith, ctx)
    for (k, a), b in zip(llama_subject.model.state_dict().items(), out.subject.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_prunes_every_block_linear_of_a_llama_and_keeps_it_running(llama_subject, arith, ctx, prompt_ids):
    from baselines.pruning import _calib
    from tasks._kit import lm

    out = create_method("sparsegpt", {"structure": "2:4"}).apply(llama_subject, arith, ctx)
    model = out.subject.model
    for lin in _calib.all_block_linears(model):
        assert _sparse.nm_conforming(lin.weight, 2, 4) and int((lin.weight == 0).sum()) == lin.weight.numel() // 2
    assert torch.equal(model.lm_head.weight, llama_subject.model.lm_head.weight)  # outside the blocks: dense
    stats = out.stats()
    assert stats["nm_conforming"] == 1.0 and stats["sparsity_of_pruned_layers"] == 0.5 and not \
        out.runtime_exploits_sparsity
    assert out.cost.steps > 0 and stats["calibration_tokens"] > 0
    assert lm.generate_ids(out.subject, prompt_ids, 5).shape[1] > prompt_ids.shape[1]
    assert llama_subject.model.model.layers[0].mlp.up_proj.weight.count_nonzero() > 0  # the reference is intact


@pytest.mark.parametrize("bad", [{"structure": "2-4"}, {"structure": "4:2"}, {"structure": "2:4", "sparsity": "0.7"},
                                 {"dampening": "0"}, {"sparsity": "1"}])
def test_bad_settings_name_the_valid_ones(bad):
    with pytest.raises(ConfigError) as e:
        create_method("sparsegpt", bad)
    assert any(w in str(e.value) for w in ("N:M", "sparsity", "dampening"))
