"""`minitron`: the aggregation by hand, the importance ranking on hand-made layers (neurons, heads, channels with
the largest activations win), slicing with nothing removed is the reference bit for bit, the pruned network's
parameter count equals a formula written from its config (Llama and a grouped-KV Qwen2 with biases and tied
embeddings), the target shape, the settings' ranges, `apply` on a stand-in task (controls, curves, the scratch
measurement), and a smoke run through the runner on arith (slow)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from baselines.distillation import _minitron as M
from baselines.distillation.minitron import Minitron, MinitronConfig, prune, student_params
from baselines.pruning import _calib
from bench.config import ConfigError, apply_overrides
from bench.registry import get_method_spec

from distil_models import tiny_llama


def batches(vocab: int, n: int = 3, length: int = 7, seed: int = 0):
    """Right-padded random token batches, as `_calib.calibration_batches` gives them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return [{"input_ids": ids * mask, "attention_mask": mask, "use_cache": False}]


def formula(cfg) -> int:
    """Parameters of a Llama/Qwen2 decoder from its config alone (biases: Qwen2's q, k, v)."""
    h, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    bias = q + 2 * kv if cfg.model_type == "qwen2" else 0
    layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h + bias
    return V * h * (1 if cfg.tie_word_embeddings else 2) + h + L * layer


def qwen_gqa(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).eval()


def logits(model, b):
    with torch.no_grad():
        return model(**_calib.model_kwargs(b)).logits


# ---- aggregation and importance ---------------------------------------------------------------------------

def test_aggregation_by_hand():
    x = torch.tensor([[[3.0, -1.0], [4.0, 2.0], [9.0, 9.0]], [[0.0, -2.0], [1.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the first row's last token is padding
    seq_l2 = torch.tensor([[5.0, 5 ** 0.5], [26 ** 0.5, 29 ** 0.5]])
    seq_mean = torch.tensor([[3.5, 1.5], [2.0, 7 / 3]])
    want = {"mean-l2": seq_l2.mean(0), "l2-l2": seq_l2.norm(dim=0), "mean-mean": seq_mean.mean(0),
            "l2-mean": seq_mean.norm(dim=0)}
    for how, w in want.items():
        a = M.Aggregate(how)
        a.add(x[:1], mask[:1])  # two calls accumulate as one batch would
        a.add(x[1:], mask[1:])
        assert torch.allclose(a.result().float(), w, atol=1e-6), how
    with pytest.raises(ConfigError, match="mean-l2"):
        M.Aggregate("sum-sum")


def test_ranking_picks_the_neurons_heads_and_channels_with_the_largest_activations():
    model = tiny_llama(32, 2, seed=0)  # heads 2 (head_dim 16), intermediate 64
    big_neurons, big_head, big_channel = [3, 17, 40], 1, 5
    with torch.no_grad():
        mlp, att = model.model.layers[0].mlp, model.model.layers[1].self_attn
        mlp.up_proj.weight[big_neurons] *= 50
        att.v_proj.weight[big_head * 16:(big_head + 1) * 16] *= 50
        model.model.norm.weight[big_channel] *= 100
    b = batches(model.config.vocab_size)
    imp = M.width_importance(model, b, "mean-l2")
    assert M.top(imp.neurons[0], 3) == big_neurons
    assert M.top(imp.heads[1], 1) == [big_head]
    assert M.top(imp.channels, 1) == [big_channel]

    # and the neuron scores are the activations' mean over the rows of their L2 norm over the real tokens
    seen = []
    h = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    logits(model, b[0])
    h.remove()
    act = seen[0].double() * b[0]["attention_mask"][..., None]
    direct = act.pow(2).sum(1).sqrt().mean(0)
    assert torch.allclose(imp.neurons[0], direct)
    assert M.top(imp.neurons[0], 10) == sorted(direct.argsort(descending=True)[:10].tolist())


def test_layer_importance_of_a_block_that_does_nothing_is_zero():
    model = tiny_llama(32, 3, seed=0)
    with torch.no_grad():  # block 1 writes nothing to the residual stream: removing it changes nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    b = batches(model.config.vocab_size)
    loss = M.layer_importance(model, b, "loss")  # removing it leaves every logit as it was
    assert loss[1] == 0.0 and loss[0] != 0.0 and loss[2] != 0.0
    bi = M.layer_importance(model, b, "bi")  # its output is its input
    assert bi[1] == pytest.approx(0.0, abs=1e-6) and min(bi) == bi[1] and M.top(bi, 2) == [0, 2]


# ---- slicing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [lambda: tiny_llama(32, 2, seed=0), qwen_gqa])
def test_pruning_with_nothing_removed_is_the_reference_bit_for_bit(build):
    model = build()
    s = M.shape_of(model)
    keep = M.Keep(list(range(s.layers)), list(range(s.hidden)), [list(range(s.heads))] * s.layers,
                  [list(range(s.kv_heads))] * s.layers, [list(range(s.intermediate))] * s.layers)
    b = batches(s.vocab)
    same = M.slice_model(model, keep)
    assert torch.equal(logits(same, b[0]), logits(model, b[0]))
    # and through the method's own path: a target of the reference's own size keeps everything
    pruned, shape, _ = prune(model, b, MinitronConfig(), M.param_count(s))
    assert shape == s and torch.equal(logits(pruned, b[0]), logits(model, b[0]))


@pytest.mark.parametrize("build,settings", [
    (lambda: tiny_llama(32, 2, seed=0), {"hidden": 16, "heads": 1, "intermediate": 24}),
    (lambda: tiny_llama(32, 3, seed=0), {"layers": 2, "hidden": 24, "heads": 2, "intermediate": 40}),
    (qwen_gqa, {"hidden": 16, "heads": 2, "intermediate": 16}),  # one query head left in each of 2 groups
    (qwen_gqa, {"layers": 1, "hidden": 8, "heads": 4, "intermediate": 8}),
])
def test_pruned_parameter_count_is_exact(build, settings):
    model = build()
    b = batches(model.config.vocab_size)
    pruned, shape, stats = prune(model, b, MinitronConfig(**settings), 10 ** 9)
    cfg = pruned.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == \
        (settings["hidden"], settings["heads"], settings["intermediate"])
    assert cfg.num_hidden_layers == settings.get("layers", model.config.num_hidden_layers)
    count = sum(p.numel() for p in pruned.parameters())
    assert count == formula(cfg) == M.param_count(shape) == stats["pruned_parameters"]
    assert count < sum(p.numel() for p in model.parameters())
    out = logits(pruned, b[0])  # a working model of the smaller config
    assert out.shape == (3, 7, model.config.vocab_size) and torch.isfinite(out).all()


def test_kept_units_carry_the_references_weights():
    model = qwen_gqa()
    keep = M.Keep([0, 2], [1, 4, 9, 30], [[1, 2], [0, 3]], [[0, 1], [0, 1]], [[5, 7, 40], [0, 1, 47]])
    new = M.slice_model(model, keep)
    old, got = model.model.layers[2], new.model.layers[1]
    q_rows = list(range(0, 8)) + list(range(24, 32))  # query heads 0 and 3, head_dim 8
    h = [1, 4, 9, 30]
    assert torch.equal(got.self_attn.q_proj.weight, old.self_attn.q_proj.weight[q_rows][:, h])
    assert torch.equal(got.self_attn.q_proj.bias, old.self_attn.q_proj.bias[q_rows])
    assert torch.equal(got.self_attn.o_proj.weight, old.self_attn.o_proj.weight[h][:, q_rows])
    assert torch.equal(got.mlp.down_proj.weight, old.mlp.down_proj.weight[h][:, [0, 1, 47]])
    assert torch.equal(new.model.embed_tokens.weight, model.model.embed_tokens.weight[:, h])
    assert new.lm_head.weight is new.model.embed_tokens.weight  # still tied


def test_target_shape_is_the_largest_uniform_shrink_under_the_budget():
    ref = M.Shape(vocab=883, hidden=192, layers=4, heads=3, kv_heads=3, head_dim=64, intermediate=768)
    s = M.fit_shape(ref, 464_928)  # arith: the reference cut to its draft's parameter count
    assert M.param_count(s) <= 464_928 and s.layers == 4 and s.hidden % M.MULTIPLE == 0
    wider = M.Shape(**{**s.__dict__, "hidden": s.hidden + M.MULTIPLE})
    assert M.param_count(wider) > 464_928
    deep = M.fit_shape(ref, 464_928, layers=2)
    assert deep.layers == 2 and deep.hidden > s.hidden
    with pytest.raises(ConfigError, match="layers=1 to 3"):
        M.fit_shape(ref, 10_000)
    gqa = M.fit_shape(M.Shape(vocab=50, hidden=32, layers=3, heads=4, kv_heads=2, head_dim=8, intermediate=48),
                      6_000)
    assert gqa.kv_heads == 2 and gqa.heads % 2 == 0


# ---- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"aggregation": "mean"}, {"layer_metric": "cos"}, {"alpha": "1.5"},
                                 {"temperature": "0"}, {"checkpoints": "0"}, {"val_rows": "0"}, {"layers": "-1"},
                                 {"calibration_samples": "0"}, {"scratch_lr": "0"}, {"steps": "0"}])
def test_config_ranges(bad):
    with pytest.raises(ConfigError):
        apply_overrides(MinitronConfig(), bad)


def test_config_errors_name_the_valid_options():
    with pytest.raises(ConfigError, match="mean-l2, l2-mean, mean-mean, l2-l2"):
        MinitronConfig(aggregation="sum").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss, bi"):
        MinitronConfig(layer_metric="ppl").validate()  # type: ignore[arg-type]
    ref = M.Shape(vocab=50, hidden=32, layers=3, heads=4, kv_heads=2, head_dim=8, intermediate=48)
    with pytest.raises(ConfigError, match="1 to 4"):
        M.check_shape(ref, M.Shape(**{**ref.__dict__, "heads": 6}))
    with pytest.raises(ConfigError, match="multiple of the reference's 2"):
        M.check_shape(ref, M.Shape(**{**ref.__dict__, "heads": 3}))


# ---- apply ------------------------------------------------------------------------------------------------

def test_registered_with_what_it_reads():
    from bench.api import Draft, Student, Tokenizer, TrainingRows

    spec = get_method_spec("minitron")
    assert spec.family == "distillation" and spec.cls is Minitron
    assert set(spec.requires) >= {TrainingRows, Draft, Student, Tokenizer}


def test_apply_prunes_to_the_students_size_distils_and_reports_controls_and_curves(lm_task, teacher_subject, ctx):
    cfg = MinitronConfig(steps=4, batch_size=2, warmup_steps=1, checkpoints=2, val_rows=2, scratch_multiple=2,
                         calibration_samples=4)
    teacher_before = copy.deepcopy(teacher_subject.model.state_dict())
    applied = Minitron(cfg).apply(teacher_subject, lm_task, ctx)
    s = applied.stats()
    target = student_params(lm_task)
    assert s["target_parameters"] == target == sum(p.numel() for p in lm_task.build_student().parameters())
    got = sum(p.numel() for p in applied.subject.model.parameters())
    assert got == s["pruned_parameters"] <= target and s["pruned_layers"] == 2  # width only: every block kept
    assert [c.name for c in applied.controls] == ["pruned_without_teacher", "student_same_tokens"]
    assert applied.cost.steps == 4 and applied.cost.tokens_seen == s["tokens_seen"] > 0
    # curves: start, every 2 steps, end; the labels-only control saw the same tokens from the same start
    assert [s[f"minitron_step_{k}"] for k in range(3)] == [0, 2, 4]
    assert s["minitron_val_loss_0"] == s["pruned_labels_val_loss_0"]
    assert s["pruned_labels_tokens_seen"] == s["tokens_seen"] == s["student_tokens_seen"]
    assert s["scratch_step_4"] == 8 and s["scratch_matched"] in (0.0, 1.0) and s["token_ratio_vs_scratch"] > 0
    assert ("scratch_tokens_to_match" in s) == bool(s["scratch_matched"])
    assert all(math.isfinite(v) for v in s.values())  # the record's schema takes finite numbers only
    for k, v in teacher_subject.model.state_dict().items():
        assert torch.equal(v, teacher_before[k])  # the reference is untouched


# ---- whole runs (slow) ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_run_on_arith(results_root):
    from bench.runner import run

    r = run("arith", "minitron", budget="smoke", results_root=results_root,
            overrides={"scratch_multiple": "1"}).result
    assert r.status == "ok" and r.method.family == "distillation"
    assert r.cost.steps == 20 and r.cost.tokens_seen > 0
    assert [c.name for c in r.controls] == ["pruned_without_teacher", "student_same_tokens"]
    assert all(c.gain_interval is not None for c in r.controls)
    s = r.method_stats
    assert s["pruned_parameters"] <= s["target_parameters"] and s["pruned_layers"] == 4
    assert r.size.method.parameters == s["pruned_parameters"] < r.size.reference.parameters
    assert r.compute.method < r.compute.reference  # a really smaller network: fewer MACs
