"""`tinybert`: every loss is zero for a student equal to the teacher with identity maps; the recorded attention
scores are the ones BERT's softmax takes; layer mapping and head grouping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from baselines.distillation import _encoder as enc
from baselines.distillation.tinybert import (TinyBERTConfig, group_heads, intermediate_losses, layer_map,
                                             prediction_loss)
from bench.config import ConfigError, apply_overrides
from distil_models import packed_batch, tiny_bert

KEYS = ("input_ids", "token_type_ids", "attention_mask")


def identity(d: int) -> nn.Linear:
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    return lin


def test_losses_are_zero_for_a_student_equal_to_the_teacher():
    teacher = enc.packed_class()(tiny_bert(layers=2), KEYS)
    student = copy.deepcopy(teacher)
    rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)
    x = packed_batch()
    z_s, z_t = student(x), teacher(x)
    parts = intermediate_losses(rec_s, rec_t, identity(32), identity(32), layer_map(2, 2), enc.token_mask(student, x))
    assert {k: float(v.detach()) for k, v in parts.items()} == {"embd": 0.0, "attn": 0.0, "hidn": 0.0}
    assert prediction_loss(z_s, z_t, 1.0).abs().item() < 1e-7
    # and they are not zero for another student
    other = enc.packed_class()(tiny_bert(layers=2, seed=1), KEYS)
    rec_o = enc.Recorder(other)
    other(x)
    parts = intermediate_losses(rec_o, rec_t, identity(32), identity(32), [1, 2], enc.token_mask(other, x))
    assert all(float(v.detach()) > 0 for v in parts.values())


def test_recorded_scores_are_what_the_attention_softmax_takes():
    teacher = enc.packed_class()(tiny_bert(layers=2), KEYS)  # eager attention: probabilities are returned
    rec = enc.Recorder(teacher)
    x = packed_batch()
    kw = teacher.inputs(x)
    probs = teacher.hf(**kw, output_attentions=True).attentions
    mask = kw["attention_mask"].bool()
    for layer in (1, 2):
        scores = rec.scores(layer).masked_fill(~mask[:, None, None, :], float("-inf"))
        got = torch.softmax(scores, dim=-1)
        real = mask[:, None, :, None].expand_as(got)
        assert torch.allclose(got[real], probs[layer - 1][real], atol=1e-6)
    rec.remove()
    teacher(x)
    assert rec.hidden[0] is not None  # removing the hooks leaves the last values; no new ones are recorded


def test_layer_map_is_uniform_and_heads_group_in_consecutive_blocks():
    assert layer_map(6, 12) == [2, 4, 6, 8, 10, 12] and layer_map(1, 2) == [2] and layer_map(4, 12) == [3, 6, 9, 12]
    scores = torch.arange(2 * 4 * 1 * 1, dtype=torch.float).view(2, 4, 1, 1)
    assert group_heads(scores, 2)[0].flatten().tolist() == [0.5, 2.5]
    assert group_heads(scores, 4) is scores
    with pytest.raises(ValueError, match="multiple"):
        group_heads(scores, 3)


def test_projection_maps_a_narrower_student_into_the_teacher_space():
    teacher = enc.packed_class()(tiny_bert(layers=2, hidden=32), KEYS)
    student = enc.packed_class()(tiny_bert(layers=1, hidden=16, heads=2, seed=2), KEYS)
    rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)
    x = packed_batch()
    student(x)
    teacher(x)
    parts = intermediate_losses(rec_s, rec_t, nn.Linear(16, 32), nn.Linear(16, 32), layer_map(1, 2),
                                enc.token_mask(student, x))
    total = parts["embd"] + parts["attn"] + parts["hidn"]
    total.backward()  # gradients reach the student and both maps
    assert student.hf.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [{"temperature": "0"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(TinyBERTConfig(), bad)
