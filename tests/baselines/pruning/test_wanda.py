"""`wanda`: the score |W_ij| * ||X_j||_2 compared within each output row, exact per-row sparsity, exact N:M groups,
the reference unchanged at sparsity 0, and calibration on the task's training split, block by block."""

from __future__ import annotations

import pytest
import torch

from baselines.pruning import _calib, _sparse
from baselines.pruning.wanda import wanda_mask
from bench.registry import create_method
from pruning_models import correlated_inputs


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.99])
def test_every_row_reaches_exactly_the_requested_sparsity(sparsity):
    w = torch.randn(24, 40)
    mask = wanda_mask(w, (correlated_inputs(40, 100) ** 2).sum(0), sparsity)
    assert ((~mask).sum(dim=1) == round(sparsity * 40)).all()


def test_the_lowest_scores_of_each_row_are_removed():
    w = torch.randn(16, 32)
    x = correlated_inputs(32, 200)
    sq = (x * x).sum(dim=0)
    mask = wanda_mask(w, sq, 0.5)
    score = w.abs() * torch.linalg.norm(x, dim=0)  # the paper's |W_ij| * ||X_j||_2, computed directly
    for i in range(16):
        assert score[i][~mask[i]].max() <= score[i][mask[i]].min()


def test_activations_change_the_choice_that_magnitude_would_make():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq = torch.tensor([100.0, 1.0, 1.0, 0.01])  # a large input feature protects the smallest weight
    assert wanda_mask(w, sq, 0.5).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_n_m_groups_keep_exactly_n(structure):
    n, m = _sparse.parse_structure(structure)
    w = torch.randn(8, 64)
    mask = wanda_mask(w, torch.rand(64), 1 - n / m, structure)
    assert (mask.reshape(8, -1, m).sum(dim=2) == n).all()


def test_sparsity_zero_leaves_the_model_unchanged(llama_subject, arith, ctx):
    out = create_method("wanda", {"sparsity": "0"}).apply(llama_subject, arith, ctx)
    for (k, a), b in zip(llama_subject.model.state_dict().items(), out.subject.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_prunes_each_row_of_every_block_linear_and_records_it(llama_subject, arith, ctx):
    out = create_method("wanda", {"sparsity": "0.6"}).apply(llama_subject, arith, ctx)
    model = out.subject.model
    for lin in _calib.all_block_linears(model):
        assert ((lin.weight == 0).sum(dim=1) == round(0.6 * lin.in_features)).all()
    assert torch.equal(model.model.embed_tokens.weight, llama_subject.model.model.embed_tokens.weight)
    stats = out.stats()
    assert stats["sparsity_of_pruned_layers"] == pytest.approx(0.6, abs=0.01) and stats["nm_m"] == 0
    assert out.runtime_exploits_sparsity is False


def test_the_first_block_is_calibrated_on_training_problems(llama_subject, arith, ctx):
    """Block 0's statistics equal a direct computation on the embedded training problems."""
    from tasks._kit import lm

    batches = _calib.calibration_batches(arith, llama_subject, ctx, 8)
    texts = [lm.prompt_of(p["question"]) + " " + p["answer"] for p in arith.train]
    seqs = [b["input_ids"][r][b["attention_mask"][r].bool()].tolist()
            for b in batches for r in range(len(b["input_ids"]))]
    eos = arith.tokenizer.eos_token_id
    assert all(s[-1] == eos for s in seqs)
    decoded = {arith.tokenizer.decode(s[:-1]) for s in seqs}
    assert len(decoded) == 8 and decoded <= set(texts)
    model = llama_subject.model
    block = model.model.layers[0]
    inputs = _calib.capture_block_inputs(model, batches)
    got = {}
    _calib.collect_linear_inputs(block, inputs, lambda n, x: got.setdefault(n, []).append(x))
    with torch.no_grad():
        direct = torch.cat([block.input_layernorm(model.model.embed_tokens(b["input_ids"]))[b["attention_mask"].bool()]
                            for b in batches])
    torch.testing.assert_close(torch.cat(got["self_attn.q_proj"]), direct)
    assert _calib.token_count(batches) == direct.shape[0]
