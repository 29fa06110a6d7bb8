"""`minilm`: L_AT and L_VR against a direct per-sequence computation on hand-made tensors (padding, unequal
widths and head counts); the relations of real BERTs are their attention probabilities and value relations;
a student equal to the teacher has zero loss; settings. The glue fixture runs are in test_full_tasks.py; a
smoke run on the real arith-nli is slow."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from baselines.distillation import _encoder as enc
from baselines.distillation.minilm import (MiniLMConfig, minilm_losses, relation_kl, resolve_relation_heads,
                                           stage_epochs)
from bench.config import ConfigError, apply_overrides
from distil_models import packed_batch, tiny_bert

KEYS = ("input_ids", "token_type_ids", "attention_mask")


def direct_kl(a_t, b_t, a_s, b_s, length: int, heads: int) -> float:
    """(1/(R |x|)) sum_r sum_t KL(softmax(a_t b_t^T / sqrt d_t) || softmax(a_s b_s^T / sqrt d_s)) of one
    sequence, row by row, on its first `length` (real) tokens only."""
    total = 0.0
    w_t, w_s = len(a_t[0]) // heads, len(a_s[0]) // heads
    for r in range(heads):
        for t in range(length):
            logits_t = [sum(a_t[t][r * w_t + i] * b_t[u][r * w_t + i] for i in range(w_t)) / math.sqrt(w_t)
                        for u in range(length)]
            logits_s = [sum(a_s[t][r * w_s + i] * b_s[u][r * w_s + i] for i in range(w_s)) / math.sqrt(w_s)
                        for u in range(length)]
            z_t, z_s = sum(math.exp(v) for v in logits_t), sum(math.exp(v) for v in logits_s)
            p = [math.exp(v) / z_t for v in logits_t]
            q = [math.exp(v) / z_s for v in logits_s]
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / (heads * length)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_losses_equal_a_direct_computation_with_padding_and_unequal_widths(heads):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1]
    teacher = [torch.randn(3, 5, 16, generator=gen, dtype=torch.float64) for _ in range(3)]  # Q, K, V: D_T 16
    student = [torch.randn(3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3)]  # D_S 8
    mask = torch.tensor([[i < n for i in range(5)] for n in lengths])
    got = minilm_losses(teacher, student, mask, heads)
    (q_t, k_t, v_t), (q_s, k_s, v_s) = [[t.tolist() for t in m] for m in (teacher, student)]
    at = sum(direct_kl(q_t[b], k_t[b], q_s[b], k_s[b], n, heads) for b, n in enumerate(lengths)) / 3
    vr = sum(direct_kl(v_t[b], v_t[b], v_s[b], v_s[b], n, heads) for b, n in enumerate(lengths)) / 3
    assert got["at"].item() == pytest.approx(at, rel=1e-9) and got["vr"].item() == pytest.approx(vr, rel=1e-9)
    assert at > 0 and vr > 0
    # padding is read nowhere: other values there change nothing, and the gradients there are zero (not NaN)
    padded = ~mask[:, :, None]
    noisy = [torch.where(padded, torch.randn(t.shape, generator=gen, dtype=t.dtype) * 50, t).requires_grad_()
             for t in student]
    again = minilm_losses(teacher, noisy, mask, heads)
    assert again["at"].item() == pytest.approx(at, rel=1e-9) and again["vr"].item() == pytest.approx(vr, rel=1e-9)
    (again["at"] + again["vr"]).backward()
    for t in noisy:
        assert torch.isfinite(t.grad).all() and t.grad[padded.expand_as(t)].abs().max() == 0
        assert t.grad.abs().sum() > 0


def test_relation_kl_is_zero_for_equal_relations_and_orders_its_arguments():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert relation_kl(a, a, mask).item() == 0.0
    assert relation_kl(a, b, mask).item() > 0
    assert relation_kl(a, b, mask).item() != pytest.approx(relation_kl(b, a, mask).item())  # KL(T || S), not S || T


def test_a_student_equal_to_the_teacher_has_zero_loss():
    teacher = enc.packed_class()(tiny_bert(layers=2), KEYS)
    student = copy.deepcopy(teacher)
    rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)
    x = packed_batch()
    student(x), teacher(x)
    mask = enc.token_mask(student, x)
    parts = minilm_losses(rec_t.projections(2), rec_s.projections(2), mask, 4)
    assert parts["at"].item() == 0.0 and parts["vr"].item() == 0.0
    other = enc.packed_class()(tiny_bert(layers=1, seed=1), KEYS)
    rec_o = enc.Recorder(other)
    other(x)
    parts = minilm_losses(rec_t.projections(2), rec_o.projections(1), mask, 4)
    assert parts["at"].item() > 0 and parts["vr"].item() > 0


def test_relations_of_real_berts_with_unequal_head_counts():
    """Teacher 4 heads of width 8, student 2 heads of width 8: at R = 2 the student's AT relation is its own
    attention (BERT's probabilities) and the teacher's relation head r joins its heads 2r and 2r + 1."""
    teacher = enc.packed_class()(tiny_bert(layers=2, hidden=32, heads=4), KEYS)
    student = enc.packed_class()(tiny_bert(layers=1, hidden=16, heads=2, seed=2), KEYS)
    rec_s, rec_t = enc.Recorder(student), enc.Recorder(teacher)
    x = packed_batch()
    kw = student.inputs(x)
    probs = student.hf(**kw, output_attentions=True).attentions[-1]
    teacher(x)
    mask = kw["attention_mask"].bool()
    heads = resolve_relation_heads(0, 2, 32, 16)
    assert heads == 2
    q, k, v = rec_s.projections(1)
    keys = mask[:, None, None, :]
    got = torch.softmax(enc.relation_scores(q, k, heads).masked_fill(~keys, float("-inf")), dim=-1)
    real = mask[:, None, :, None].expand_as(got)
    assert torch.allclose(got[real], probs[real], atol=1e-6)
    # the recorded V is what that attention weighs: probs @ V per head is the self-attention's output
    context = {}
    student.hf.bert.encoder.layer[0].attention.self.register_forward_hook(
        lambda m, a, out: context.update(out=out[0] if isinstance(out, tuple) else out))
    student(x)
    mixed = (probs @ enc.split_heads(v, 2)).transpose(1, 2).reshape(v.shape)
    assert torch.allclose(mixed[mask], context["out"][mask], atol=1e-5)
    # the teacher's relation head r: (s_2r + s_2r+1) / sqrt(2) of its own heads' scores s
    s = rec_t.scores(2)
    joined = enc.relation_scores(*rec_t.projections(2)[:2], heads)
    assert torch.allclose(joined, (s[:, 0::2] + s[:, 1::2]) / math.sqrt(2), atol=1e-5)
    loss = minilm_losses(rec_t.projections(2), rec_s.projections(1), mask, heads)
    (loss["at"] + loss["vr"]).backward()
    layer = student.hf.bert.encoder.layer[0]
    for p in (layer.attention.self.query.weight, layer.attention.self.value.weight,
              student.hf.bert.embeddings.word_embeddings.weight):
        assert p.grad.abs().sum() > 0


def test_relation_heads_must_divide_both_widths():
    assert resolve_relation_heads(0, 12, 768, 768) == 12 and resolve_relation_heads(8, 2, 128, 64) == 8
    with pytest.raises(ValueError, match=r"relation_heads=3 must divide .* 128 .* 64: one of \[1, 2, 4, 8, 16"):
        resolve_relation_heads(3, 2, 128, 64)


def test_stages_split_the_recipes_epochs():
    assert stage_epochs(4, 0.5) == (2, 2) and stage_epochs(4, 0.25) == (1, 3) and stage_epochs(4, 0.9) == (3, 1)
    assert stage_epochs(1, 0.5) == (1, 1) and stage_epochs(3, 0.5) == (2, 1)


@pytest.mark.parametrize("bad", [{"relation_heads": "-1"}, {"distil_share": "0"}, {"distil_share": "1"},
                                 {"distil_share": "1.5"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(MiniLMConfig(), bad)


@pytest.mark.slow
def test_smoke_run_on_arith_nli_through_the_runner(tmp_path, monkeypatch):
    from bench.runner import run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = run("arith-nli", "minilm", budget="smoke", results_root=tmp_path / "results")
    record = json.loads(out.path.read_text())
    assert record["status"] == "ok" and record["method"]["name"] == "minilm"
    stats = record["method_stats"]
    assert (stats["teacher_heads"], stats["student_heads"], stats["relation_heads"]) == (4.0, 2.0, 2.0)
    assert stats["distil_steps"] == stats["finetune_steps"] == 20 and record["cost"]["steps"] == 40
    assert stats["distil_final_at_loss"] < stats["distil_first_at_loss"]
    assert stats["distil_final_vr_loss"] < stats["distil_first_vr_loss"]
    assert [c["name"] for c in record["controls"]] == ["student_without_teacher"]
    assert record["size"]["method"]["parameters"] < record["size"]["reference"]["parameters"]
