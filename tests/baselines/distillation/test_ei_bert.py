"""`ei-bert`: vocabulary pruning keeps every token the data uses (no new unknown tokens in arith-nli's test split)
and the pruned student reads the original ids; token importance is the attention each token receives; LSQ is
exact on representable values with its STE and step gradient; the int8 runtime (torch.ao's kernels) matches its
fake-quantized float twin and serializes at about a byte a weight; the losses equal direct computations;
settings. The glue fixture runs are in test_full_tasks.py; a real run on arith-nli is slow."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.distillation import _ei_bert as ei
from baselines.distillation import _encoder as enc
from baselines.distillation.ei_bert import EIBertConfig, cross_losses, integrate_head, kl, plain_kd_loss
from bench.config import ConfigError, apply_overrides
from bench.measure import serialized_bytes
from distil_models import packed_batch, tiny_bert

KEYS = ("input_ids", "token_type_ids", "attention_mask")


def packed(model):
    return enc.packed_class()(model, KEYS)


# ---- stage 1 ------------------------------------------------------------------------------------------------

def test_kept_tokens_rank_by_importance_keep_specials_and_drop_unused():
    importance = torch.tensor([0.0, 0.0, 5.0, 1.0, 3.0, 0.0, 2.0, 9.0], dtype=torch.float64)
    counts = torch.tensor([10, 0, 4, 4, 4, 9, 4, 0])  # 1 and 7 unused; 5 used but never attended (ties by count)
    assert ei.kept_tokens(importance, counts, [0, 1], max_vocab=100).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert ei.kept_tokens(importance, counts, [0, 1], max_vocab=4).tolist() == [0, 1, 2, 4]
    assert ei.kept_tokens(importance, counts, [0, 1], max_vocab=6).tolist() == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="special"):
        ei.kept_tokens(importance, counts, [0, 1, 2], max_vocab=2)
    table = ei.remap_table(torch.tensor([0, 1, 2, 4]), vocab=8, unk_id=1)
    assert table.dtype == torch.int16 and table.tolist() == [0, 1, 2, 1, 3, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown"):
        ei.remap_table(torch.tensor([0, 2]), vocab=8, unk_id=1)


def test_token_importance_is_the_attention_each_token_receives():
    model = packed(tiny_bert(layers=2, vocab=60))  # eager attention: the model returns its probabilities
    x = packed_batch(n=4, length=9, vocab=60)
    got = ei.token_importance(model, x, vocab=60, batch=3)  # two batches
    want = torch.zeros(60, dtype=torch.float64)
    kw = model.inputs(x)
    with torch.no_grad():
        atts = model.hf(**kw, output_attentions=True).attentions
    for b in range(x.shape[0]):
        n = int(kw["attention_mask"][b].sum())
        for a in atts:
            for j in range(n):
                want[int(kw["input_ids"][b, j])] += float(a[b, :, :n, j].sum())
    assert torch.allclose(got, want, atol=1e-5) and got.sum() > 0
    # every real query row sums to one per layer and head: the total is sentences' tokens x layers x heads
    assert float(got.sum()) == pytest.approx(float(kw["attention_mask"].sum()) * 2 * 4, rel=1e-5)


def test_pruned_student_reads_the_original_ids():
    hf = tiny_bert(layers=1, vocab=60)
    x = packed_batch(n=3, length=9, vocab=60)
    kept = torch.tensor(sorted({0, 1} | set(x[:, 0].flatten().tolist())))
    pruned = copy.deepcopy(hf)
    ei.prune_embeddings(pruned, kept)
    vp = ei.VocabPruned(pruned, ei.remap_table(kept, 60, unk_id=1))
    assert pruned.get_input_embeddings().num_embeddings == kept.numel() < 60
    with torch.no_grad():  # the kept tokens read the same rows: the same logits as the unpruned model
        assert torch.allclose(packed(vp)(x), packed(hf)(x), atol=1e-6)
        kw = packed(hf).inputs(x)
        assert torch.equal(vp(**kw).logits, packed(vp)(x))  # the Hugging Face calling convention too
        # a dropped token reads the unknown token's row
        x2 = x.clone()
        x2[0, 0, 1] = 59 if 59 not in kept else 58
        x_unk = x.clone()
        x_unk[0, 0, 1] = 1
        assert torch.allclose(packed(vp)(x2), packed(hf)(x_unk), atol=1e-6)
    assert "remap" in vp.state_dict()


def test_default_pruning_leaves_no_new_unknown_tokens_in_the_test_split():
    """With the default budget on the embedded task: every token the test pairs use is either kept or was
    unknown already (the ranking's importance cannot drop a used token while the budget holds them all)."""
    from tasks.arith_nli import ArithNLI

    task = ArithNLI()
    task.load()
    tok, train, test = task.tokenizer, task.training_split(), task.test
    vocab, unk = len(tok), tok.unk_token_id
    counts = torch.bincount(train.x[:, 0].flatten(), minlength=vocab)
    importance = torch.rand(vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kept = ei.kept_tokens(importance, counts, tok.all_special_ids, EIBertConfig().max_vocab)
    table = ei.remap_table(kept, vocab, unk)
    ids = test.x[:, 0]
    new = table.long()[ids]
    assert torch.equal(new == int(table[unk]), ids == unk)
    assert kept.numel() <= EIBertConfig().max_vocab and kept.numel() < vocab  # something is pruned
    assert int(table[tok.pad_token_id]) == kept.tolist().index(tok.pad_token_id)


# ---- stage 3: LSQ and the int8 runtime ---------------------------------------------------------------------

def test_lsq_is_exact_on_representable_values_with_ste_and_scaled_step_gradient():
    s = torch.tensor(2.0 ** -6, requires_grad=True)
    codes = torch.arange(-128, 128, dtype=torch.float32)
    w = (codes * s.detach()).requires_grad_()
    q = ei.lsq_quantize(w, s)
    assert torch.equal(q.detach(), w.detach())  # representable values come back bit for bit
    assert torch.equal(ei.int8_codes(w, s).to(torch.float32), codes)
    # off-grid and out-of-range values: round to the grid, clamp to [-128, 127] steps
    v = torch.tensor([0.3, -0.7, 10.0, -10.0]) * s.detach() * 1 + torch.tensor([0.0, 0.0, 500.0, -500.0]) * s.detach()
    v.requires_grad_()
    out = ei.lsq_quantize(v, s)
    assert out.detach().div(s.detach()).tolist() == [0.0, -1.0, 127.0, -128.0]
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # STE inside the range, zero where clamped
    # d w_hat / d s = (round(v/s) - v/s) inside, -Q_N / Q_P at the clamps; scaled by g = 1 / sqrt(N Q_P)
    r = (v.detach() / s.detach())
    inside = torch.round(r) - r
    want = float(inside[0] + inside[1] + 127 - 128) / math.sqrt(4 * 127)
    assert float(s.grad) == pytest.approx(want, rel=1e-5)
    assert float(ei.lsq_init(torch.tensor([1.0, -3.0]))) == pytest.approx(2 * 2 / math.sqrt(127))


def test_int8_linear_runs_the_quantized_kernel_and_matches_its_float_twin():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = ei.QLinear(lin, ei.reduce_range())
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        twin = q(x)
    int8 = ei.Int8Linear(ei.int8_codes(q.weight, q.step), q.step, q.bias, q.reduce)
    assert int8.weight_int8.dtype == torch.int8 and int8.calls == 0
    got = int8(x)
    assert int8.calls == 1
    assert torch.allclose(got, twin, atol=1e-5)  # the kernel's int32 sums rescaled: float rounding only
    # and not merely the float weights: the activations were quantized too
    assert not torch.allclose(got, lin(x).detach(), atol=1e-5)


def test_int8_model_matches_its_fake_quantized_twin_and_serializes_small():
    teacher = packed(tiny_bert(layers=2, hidden=32, vocab=60))
    student = tiny_bert(layers=1, hidden=16, heads=2, seed=3, vocab=60)
    integrate_head(student, teacher.hf)
    vp = ei.VocabPruned(student, ei.remap_table(torch.arange(60), 60, unk_id=1))
    float_bytes = serialized_bytes(vp)
    n = ei.to_fake_quant(vp.hf, ei.reduce_range())
    assert n == sum(1 for m in vp.modules() if isinstance(m, (ei.QLinear, ei.QEmbedding)))
    twin = copy.deepcopy(vp).eval()
    assert ei.to_int8(vp.hf) == n
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in vp.modules())
    x = packed_batch(n=3, length=9, vocab=60)
    with torch.inference_mode():
        z8, zf = packed(vp)(x), packed(twin)(x)
    assert torch.allclose(z8, zf, atol=1e-4, rtol=1e-4)
    assert ei.int8_calls(vp) > 0
    # about a byte a weight: the float32 model's bytes over 4, plus scales, biases and LayerNorms
    nbytes = serialized_bytes(vp)
    assert nbytes < 0.45 * float_bytes
    # the state dict alone rebuilds the int8 model (the engine's packed form is not in it)
    again = copy.deepcopy(vp)
    for m in again.modules():
        if isinstance(m, ei.Int8Linear):
            m.weight_int8.data.zero_()
            m._packed = None
    again.load_state_dict(vp.state_dict())
    with torch.inference_mode():
        assert torch.equal(packed(again)(x), z8)


# ---- stage 2: the losses --------------------------------------------------------------------------------------

def test_losses_equal_direct_computations():
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(4, 3, generator=gen, requires_grad=True)
    z_t = torch.randn(4, 3, generator=gen, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1])
    h_s = torch.randn(4, 5, 6, generator=gen, requires_grad=True)
    h_t = torch.randn(4, 5, 6, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    cfg = EIBertConfig(temperature=2.0, alpha_mse=0.5, alpha_kl=3.0)
    got = cross_losses(z_s, z_t, y, h_s, h_t, mask, cfg)

    def direct_kl(p_logits, q_logits, t):
        total = 0.0
        for a, b in zip(p_logits.tolist(), q_logits.tolist()):
            p = [math.exp(v / t) / sum(math.exp(u / t) for u in a) for v in a]
            q = [math.exp(v / t) / sum(math.exp(u / t) for u in b) for v in b]
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        return total / len(p_logits) * t * t

    def ce(z):
        return sum(-math.log(math.exp(z[i][y[i]]) / sum(math.exp(v) for v in z[i])) for i in range(4)) / 4

    zs, zt = z_s.tolist(), z_t.tolist()
    real = [(b, l) for b in range(4) for l in range(5) if mask[b, l]]
    hid = sum(float(((h_s[b, l] - h_t[b, l]).detach() ** 2).sum()) for b, l in real) / (len(real) * 6)
    logit_mse = sum((a - b) ** 2 for ra, rb in zip(zs, zt) for a, b in zip(ra, rb)) / 12
    want_s = ce(zs) + 0.5 * (hid + logit_mse) + 3.0 * direct_kl(z_t.detach(), z_s.detach(), 2.0)
    want_t = ce(zt) + 3.0 * direct_kl(z_s.detach(), z_t.detach(), 2.0)
    assert got["student"].item() == pytest.approx(want_s, rel=1e-5)
    assert got["teacher"].item() == pytest.approx(want_t, rel=1e-5)
    # each loss trains its own model only
    got["student"].backward(retain_graph=True)
    assert z_t.grad is None and h_t.grad is None and z_s.grad is not None and h_s.grad is not None
    z_s.grad = None
    got["teacher"].backward()
    assert z_s.grad is None and z_t.grad is not None
    # the control's plain KD
    kd = plain_kd_loss(z_s, z_t, y, cfg)
    assert kd.item() == pytest.approx(ce(zs) + 3.0 * direct_kl(z_t.detach(), z_s.detach(), 2.0), rel=1e-5)
    assert kl(z_s, z_s, 2.0).abs().item() < 1e-7


def test_integrated_head_is_the_teachers_behind_a_map():
    teacher = tiny_bert(layers=2, hidden=32, vocab=60)
    student = tiny_bert(layers=1, hidden=16, heads=2, seed=3, vocab=60)
    proj = integrate_head(student, teacher)
    assert proj.in_features == 16 and proj.out_features == 32
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student.classifier.weight is not teacher.classifier.weight  # copied: the teacher trains its own
    assert torch.equal(student.bert.pooler.dense[1].weight, teacher.bert.pooler.dense.weight)
    x = packed_batch(n=2, length=9, vocab=60)
    z = packed(student)(x)
    assert z.shape == (2, 2)


def test_train_pair_moves_the_teacher_at_its_own_rate():
    from bench.api import RunContext
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks._kit.classification import Split, TrainRecipe

    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter())
    student, teacher = nn.Linear(4, 2), nn.Linear(4, 2)
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    data = Split(torch.randn(16, 4), torch.randint(0, 2, (16,)))

    def losses(x, y):
        return F.cross_entropy(student(x), y), F.cross_entropy(teacher(x), y)

    stats = ei.train_pair(student, teacher, data, TrainRecipe(epochs=1, lr=1e-2, batch_size=4), ctx, 3, 0, 1e-4,
                          losses, "test")
    assert stats.steps == 3 and stats.samples_seen == 12
    ds = (student.weight - s0.weight).abs().max().item()
    dt = (teacher.weight - t0.weight).abs().max().item()
    assert 0 < dt < ds / 20  # Adam's steps are about the learning rate: 1e-4 against 1e-2


# ---- settings and a real run ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"max_vocab": "4"}, {"importance_rows": "0"}, {"distill_epochs": "0"},
                                 {"qat_epochs": "-1"}, {"teacher_lr_ratio": "-0.1"}, {"temperature": "0"},
                                 {"alpha_mse": "-1"}, {"alpha_kl": "-1"}, {"no_such": "1"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(EIBertConfig(), bad).validate()


@pytest.mark.slow
def test_real_run_on_arith_nli(results_root):
    """The default settings on the embedded task: int8 kernels ran, the student serializes small, no used token
    was dropped, and the control is the plain-KD student."""
    from bench.runner import run
    from bench.store import load_result

    r = load_result(run("arith-nli", "ei-bert", results_root=results_root).path, results_root)
    s = r.method_stats
    assert r.status == "ok" and s["runtime_int8"] == 1.0 and s["int8_kernel_calls"] > 0
    assert s["used_tokens_dropped"] == 0 and s["vocab_kept"] < s["vocab_original"]
    assert r.size.method.bytes < r.size.reference.bytes / 10
    assert s["int8_vs_float_twin_label_agreement"] > 0.95
    assert [c.name for c in r.controls] == ["plain_kd_same_student"]
    assert r.quality.value > 0.5
