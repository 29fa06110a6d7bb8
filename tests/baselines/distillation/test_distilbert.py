"""`distilbert`: the student copies exactly every other teacher layer (and everything outside the layers), on a
plain Hugging Face BERT and on arith-nli's pair classifier; the loss against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.distillation import _encoder as enc
from baselines.distillation.distilbert import DistilBERTConfig, distilbert_loss, every_other_layer
from bench.config import ConfigError, apply_overrides
from distil_models import packed_batch, tiny_bert


def arith_nli_classifier(layers: int):
    from tasks.arith_nli import EncoderArch, pair_classifier_class

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return pair_classifier_class()(EncoderArch(hidden=32, layers=layers, heads=4, intermediate=64).config(60, 0))


@pytest.mark.parametrize("layers", [4, 5])
def test_student_copies_exactly_every_other_teacher_layer(layers):
    teacher = enc.packed_class()(tiny_bert(layers=layers), ("input_ids", "token_type_ids", "attention_mask"))
    student = every_other_layer(teacher)
    kept = list(range(0, layers, 2))
    assert student.hf.config.num_hidden_layers == len(kept) == len(student.hf.bert.encoder.layer)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    expected = {}
    for name, tensor in t_state.items():
        if ".encoder.layer." in name:
            head, rest = name.split(".encoder.layer.")
            i, tail = rest.split(".", 1)
            if int(i) in kept:
                expected[f"{head}.encoder.layer.{kept.index(int(i))}.{tail}"] = tensor
        else:
            expected[name] = tensor  # embeddings, pooler, classifier
    assert s_state.keys() == expected.keys()
    assert all(torch.equal(s_state[k], expected[k]) for k in expected)
    assert all(s.data_ptr() != t.data_ptr() for s, t in zip(student.parameters(), teacher.parameters()))
    assert student(packed_batch()).shape == (3, 2)  # and it runs


def test_on_arith_nlis_pair_classifier_too():
    teacher = arith_nli_classifier(layers=2)
    student = every_other_layer(teacher)
    assert type(student) is type(teacher) and len(student.hf.bert.encoder.layer) == 1
    assert all(torch.equal(a, b) for a, b in zip(student.hf.bert.encoder.layer[0].parameters(),
                                                  teacher.hf.bert.encoder.layer[0].parameters()))
    x = torch.stack([packed_batch()[:, 0], packed_batch()[:, 1]], dim=1)
    assert student(x).shape == (3, 2)


def test_loss_equals_a_direct_computation():
    cfg = DistilBERTConfig(temperature=2.0, alpha_ce=5.0, alpha_label=2.0, alpha_cos=1.0)
    z_s, z_t, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([1])
    h_s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]]])
    h_t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-9.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding

    def sm(z, t):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    p, q = sm([3.0, 0.0], 2.0), sm([1.0, -1.0], 2.0)
    soft = 4.0 * sum(a * math.log(a / b) for a, b in zip(p, q))
    hard = -math.log(sm([1.0, -1.0], 1.0)[1])
    cos = ((1 - 0.0) + (1 - 1.0)) / 2  # orthogonal, then parallel
    want = 5.0 * soft + 2.0 * hard + 1.0 * cos
    assert distilbert_loss(z_s, z_t, y, h_s, h_t, mask, cfg).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bad", [{"temperature": "0"}, {"alpha_cos": "-1"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(DistilBERTConfig(), bad)
