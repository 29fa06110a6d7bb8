"""`ncfm` (dataset distillation by neural characteristic function matching): the discrepancy against a direct
complex-number computation, 0 for identical feature sets, the sampling network, the synthetic set's images per
class, the min-max moving both players, settings errors, and runs through the runner whose `training` block holds
measured, consistent figures (digits; cifar10 on fixture files; one real run on digits, slow)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from baselines.distillation import ncfm
from baselines.distillation._ncfm import (FeatureNet, SamplingNet, cf_discrepancy, characteristic_function,
                                          class_rows, initial_rows, synthesise)
from bench.config import ConfigError, apply_overrides
from tasks.digits import Digits

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers

from full_fixtures import cifar10_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> Digits:
    task = Digits()
    task.load()
    return task


def hand_made(seed: int = 0, n: int = 7, m: int = 5, d: int = 4, freqs: int = 9):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    syn = torch.randn(m, d, generator=g, dtype=torch.float64)
    t = torch.randn(freqs, d, generator=g, dtype=torch.float64)
    return real, syn, t


def direct(real, syn, t, alpha):
    """The paper's C_T written with complex numbers: moduli, angles and the cosine of the phase difference."""
    phi_r = torch.exp(1j * (t @ real.T)).mean(1)
    phi_s = torch.exp(1j * (t @ syn.T)).mean(1)
    a_r, a_s = phi_r.abs(), phi_s.abs()
    amplitude = (a_r - a_s) ** 2
    phase = 2 * a_r * a_s * (1 - torch.cos(torch.angle(phi_r) - torch.angle(phi_s)))
    return torch.sqrt(alpha * amplitude + (1 - alpha) * phase).mean()


# ---- the discrepancy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_the_discrepancy_equals_a_direct_complex_computation(alpha):
    real, syn, t = hand_made()
    assert torch.allclose(cf_discrepancy(real, syn, t, alpha, eps=0), direct(real, syn, t, alpha), atol=1e-12)
    assert torch.allclose(cf_discrepancy(real, syn, t, alpha), direct(real, syn, t, alpha), atol=1e-5)


def test_at_alpha_one_half_it_is_the_cf_distance_over_root_two():
    real, syn, t = hand_made(1)
    phi_r = torch.exp(1j * (t @ real.T)).mean(1)
    phi_s = torch.exp(1j * (t @ syn.T)).mean(1)
    want = (0.5 ** 0.5) * (phi_r - phi_s).abs().mean()
    assert torch.allclose(cf_discrepancy(real, syn, t, 0.5, eps=0), want, atol=1e-12)


def test_the_characteristic_function_by_hand():
    feat = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64)  # <t_1, f> = 0.5 and 2.0
    re, im = characteristic_function(feat, t)
    assert torch.allclose(re, torch.tensor([1.0, (math.cos(0.5) + math.cos(2.0)) / 2], dtype=torch.float64))
    assert torch.allclose(im, torch.tensor([0.0, (math.sin(0.5) + math.sin(2.0)) / 2], dtype=torch.float64))


def test_identical_feature_sets_have_no_discrepancy_whatever_the_order():
    real, _, t = hand_made(2)
    shuffled = real[torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))]
    for alpha in (0.0, 0.5, 1.0):
        assert float(cf_discrepancy(real, real.clone(), t, alpha, eps=0)) < 1e-7
        assert float(cf_discrepancy(real, shuffled, t, alpha, eps=0)) < 1e-7
        assert float(cf_discrepancy(real, real, t, alpha)) < 2e-6  # sqrt(eps)-sized with the default eps
    _, syn, _ = hand_made(3)
    assert float(cf_discrepancy(real, syn, t, 0.5)) > 1e-2


def test_gradients_are_finite_at_identical_sets():
    real, _, t = hand_made(4)
    syn = real.clone().requires_grad_(True)
    cf_discrepancy(real, syn, t, 0.5).backward()
    assert torch.isfinite(syn.grad).all()


def test_the_sampling_network_draws_bounded_frequencies_it_can_learn():
    net = SamplingNet(6, 11)
    t = net(torch.Generator().manual_seed(0))
    assert t.shape == (11, 6) and t.abs().max() < 1
    t.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    again = SamplingNet(6, 11)
    again.load_state_dict(net.state_dict())
    assert torch.equal(again(torch.Generator().manual_seed(0)), net(torch.Generator().manual_seed(0)))


# ---- the synthetic set ---------------------------------------------------------------------------------------

def test_initial_rows_give_exactly_ipc_per_class_without_repeats():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 2])
    idx = initial_rows(labels, 3, 2, torch.Generator().manual_seed(0))
    assert labels[idx].tolist() == [0, 0, 1, 1, 2, 2]  # class-major
    assert len(set(idx.tolist())) == 6
    short = initial_rows(labels, 3, 4, torch.Generator().manual_seed(0))  # class 1 has only 3 rows
    assert labels[short].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no training rows"):
        class_rows(labels, 4)


def tiny_nets(task, n: int = 2):
    nets = []
    for k in range(n):
        torch.manual_seed(k)
        model = task.build_reference().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        nets.append(FeatureNet(model, task.sections(model)))
    return nets


@pytest.mark.parametrize("ipc", [1, 3])
def test_synthesis_gives_exactly_the_requested_images_per_class_and_moves_them(digits, ipc):
    data = digits.training_split()
    syn = synthesise(tiny_nets(digits), data.x, data.y, 10, ipc, iterations=4, alpha=0.5, n_freqs=32,
                     lr_images=0.01, lr_sampler=1e-3, real_batch=16, model_interval=2, seed=0)
    assert syn.x.shape == (10 * ipc, *data.x.shape[1:]) and syn.init.shape == syn.x.shape
    assert torch.bincount(syn.y, minlength=10).tolist() == [ipc] * 10
    assert syn.y.tolist() == sorted(syn.y.tolist())
    # the starting point is real images of the right classes; the images moved from it
    rows = {tuple(r.flatten().tolist()): int(c) for r, c in zip(data.x, data.y)}
    assert [rows[tuple(r.flatten().tolist())] for r in syn.init] == syn.y.tolist()
    assert not torch.equal(syn.x, syn.init)
    assert syn.steps == 4 and syn.seconds > 0 and len(syn.losses) == 4


def test_the_min_player_lowers_the_discrepancy_at_fixed_frequencies(digits):
    """Against a fixed frequency set the images alone descend (a learning rate of 0 for the max player)."""
    data = digits.training_split()
    nets = tiny_nets(digits, 1)
    syn = synthesise(nets, data.x, data.y, 10, 2, iterations=30, alpha=0.5, n_freqs=64, lr_images=0.02,
                     lr_sampler=0.0, real_batch=200, model_interval=1, seed=0)
    t = torch.randn(256, 512, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f_real = nets[0](data.x)

        def total(images):
            f = nets[0](images)
            return sum(float(cf_discrepancy(f_real[data.y == c], f[syn.y == c], t, 0.5)) for c in range(10))

        assert total(syn.x) < 0.8 * total(syn.init)


def test_the_small_set_recipe_keeps_the_optimiser_and_caps_the_batch(digits):
    r = ncfm.small_set_recipe(digits.reference_recipe, 30, 77)
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay) == (77, 30, digits.reference_recipe.lr,
                                                              digits.reference_recipe.weight_decay)
    assert ncfm.small_set_recipe(digits.reference_recipe, 500, 5).batch_size == digits.reference_recipe.batch_size


# ---- settings --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,expected", [
    ({"ipc": "0"}, r"ipc=0 must be >= 1"),
    ({"iterations": "0"}, r"iterations=0 must be >= 1"),
    ({"alpha": "1.5"}, r"\[0, 1\]: 1 matches amplitudes only, 0 phases only"),
    ({"lr_images": "0"}, r"lr_images=0.0 must be > 0"),
    ({"lr_sampler": "-1"}, r"lr_sampler=-1.0 must be >= 0"),
    ({"pretrain_epochs": "-1"}, r"pretrain_epochs=-1 must be >= 0"),
    ({"n_freqs": "0"}, r"n_freqs=0 must be >= 1"),
    ({"train_epochs": "0"}, r"train_epochs=0 must be >= 1"),
])
def test_settings_errors_name_the_valid_range(bad, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(ncfm.NCFMConfig(), bad, owner="ncfm")


def test_unknown_settings_list_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: ipc .*iterations .*alpha .*n_freqs"):
        apply_overrides(ncfm.NCFMConfig(), {"images_per_class": "10"}, owner="ncfm")


# ---- end to end --------------------------------------------------------------------------------------------

def check_record(record, ipc: int, n_classes: int = 10):
    assert record["status"] == "ok", record.get("error")
    stats, tr = record["method_stats"], record["training"]
    assert stats["synthetic_rows"] == tr["rows"] == ipc * n_classes and stats["ipc"] == ipc
    assert tr["version"] == 1
    # measured, not declared: every figure non-zero, and the ratios the figures' own
    for key in ("seconds", "steps", "samples_seen", "full_seconds", "full_steps", "full_samples_seen",
                "preparation_seconds"):
        assert tr[key] > 0, key
    assert tr["time_ratio"] == pytest.approx(tr["seconds"] / tr["full_seconds"])
    assert tr["samples_ratio"] == pytest.approx(tr["samples_seen"] / tr["full_samples_seen"])
    assert tr["time_ratio_with_preparation"] == pytest.approx((tr["preparation_seconds"] + tr["seconds"])
                                                              / tr["full_seconds"])
    assert tr["full_rows"] > tr["rows"]
    cost = record["cost"]
    assert cost["seconds"] == pytest.approx(tr["preparation_seconds"] + tr["seconds"])
    assert cost["steps"] > tr["steps"]
    random_real, full = record["controls"]
    assert random_real["name"] == "random_real" and full["name"] == "full_training_set"
    assert full["cost_seconds"] == pytest.approx(tr["full_seconds"])
    assert random_real["value"] == pytest.approx(stats["random_real_top1_accuracy"])
    assert full["value"] == pytest.approx(stats["full_training_set_top1_accuracy"])
    # the evaluated model is the reference architecture
    assert record["size"]["method"]["parameters"] == record["size"]["reference"]["parameters"]
    return stats, tr


def test_apply_measures_the_training_figures(digits, tmp_path, monkeypatch):
    """Under the smoke budget, without the runner: the training comparison holds measured, non-zero figures, and
    the record block made from it is consistent."""
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from bench.runner import training_record
    from tasks.base import RunContext

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), budget="smoke")
    method = ncfm.NeuralCharacteristicFunctionMatching(ncfm.NCFMConfig(ipc=3, feature_nets=1, n_freqs=16,
                                                                       real_batch=8))
    applied = method.apply(digits.prepare(digits.build_reference(), ctx), digits, ctx)
    tr = applied.training
    assert tr.rows == 30 and tr.full_rows == digits.training_split().y.shape[0]
    assert tr.seconds > 0 and tr.full_seconds > 0 and tr.preparation_seconds > 0
    assert tr.steps == 1 and tr.samples_seen == 30  # smoke: one epoch, a batch of the whole set
    assert tr.full_steps == 20  # smoke: one epoch capped at 20 steps
    assert tr.full_samples_seen == 20 * digits.reference_recipe.batch_size
    assert tr.full_source == "measured in this run"
    block = training_record(tr)
    assert block.time_ratio == pytest.approx(tr.seconds / tr.full_seconds)
    assert applied.cost.seconds == pytest.approx(tr.preparation_seconds + tr.seconds)
    assert [c.name for c in applied.controls] == ["random_real", "full_training_set"]
    assert applied.stats()["synthetic_rows"] == 30


@pytest.mark.slow
def test_smoke_run_on_digits_through_the_runner(tmp_path, monkeypatch):
    from bench.runner import run
    from bench.store import load_result

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    overrides = {"ipc": "2", "feature_nets": "2", "n_freqs": "32", "real_batch": "16"}
    out = run("digits", "ncfm", budget="smoke", overrides=overrides, results_root=tmp_path / "results")
    load_result(out.path, tmp_path / "results")  # valid, invariants included
    _, tr = check_record(json.loads(out.path.read_text()), 2)
    assert tr["full_source"] == "measured in this run"
    again = run("digits", "ncfm", budget="smoke", overrides=overrides, results_root=tmp_path / "results")
    _, tr2 = check_record(json.loads(again.path.read_text()), 2)
    assert tr2["full_source"].startswith("measured by an earlier run") and tr2["full_seconds"] == tr["full_seconds"]
    assert len(list((tmp_path / "cache" / "methods" / "ncfm").rglob("full-*.safetensors"))) == 1


@pytest.mark.slow
def test_smoke_run_on_cifar10_fixture_files_with_the_resnet(tmp_path, monkeypatch):
    from bench.runner import run

    cifar10_fixtures().write_cifar10(tmp_path / "data", per_batch=10)  # 50 images: every class present
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BENCH_CIFAR10_VERIFY", "0")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_CIFAR10_REFERENCE", raising=False)
    out = run("cifar10", "ncfm", budget="smoke", results_root=tmp_path / "results",
              overrides={"ipc": "1", "feature_nets": "1", "pretrain_epochs": "0", "n_freqs": "16",
                         "real_batch": "4"})
    record = json.loads(out.path.read_text())
    check_record(record, 1)
    assert record["quality"]["n"] == 10 and record["training"]["full_rows"] == 50


@pytest.mark.slow
def test_real_run_on_digits_beats_random_real_images(tmp_path, monkeypatch):
    """The defaults (10 images per class): the synthetic set trains the reference architecture to a better accuracy
    than the same number of random real images, in a fraction of the full split's training time."""
    from bench.runner import run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = run("digits", "ncfm", results_root=tmp_path / "results")
    record = json.loads(out.path.read_text())
    stats, tr = check_record(record, 10)
    random_real, full = record["controls"]
    assert record["quality"]["value"] > random_real["value"]
    assert full["value"] > record["quality"]["value"]
    assert tr["time_ratio"] < 0.5 and tr["samples_ratio"] < 0.5
    assert stats["cfd_after"] < stats["cfd_before"]
