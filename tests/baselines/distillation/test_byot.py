"""`byot` (Be Your Own Teacher): the loss against a direct computation, exits as prefixes of the full network,
the deepest exit against plain training, exit choice, settings errors, caching, and smoke runs through the
runner (digits; cifar10 on fixture files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baselines.distillation import byot
from baselines.distillation._byot import ExitNetwork, byot_loss, exit_network
from bench.config import ConfigError, apply_overrides
from bench.profiles import load_profile
from bench.progress import Reporter
from tasks._kit.classification import fit, seed_everything
from tasks.base import RunContext
from tasks.cifar10 import CIFAR10, cifar_resnet
from tasks.digits import Digits

sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers

from full_fixtures import cifar10_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> Digits:
    task = Digits()
    task.load()
    return task


@pytest.fixture
def smoke_ctx(tmp_path, monkeypatch) -> RunContext:
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), budget="smoke")


# ---- the loss -----------------------------------------------------------------------------------------------

def hand_made(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(3)]
    feats = [torch.randn(4, 2, 3, 3, generator=g, requires_grad=True) for _ in range(3)]
    return logits, feats, torch.tensor([0, 3, 1, 4])


def direct(logits, feats, y, alpha, lam, T):
    """The paper's sum written out with explicit softmaxes and logs, example by example."""
    total = torch.zeros(())
    q_c = torch.softmax(logits[-1].detach() / T, dim=1)
    for i, (z, f) in enumerate(zip(logits, feats)):
        log_q = torch.log(torch.softmax(z, dim=1))
        ce = -log_q[torch.arange(4), y].mean()
        total = total + (1 - alpha) * ce
        if i < len(logits) - 1:
            q_i = torch.softmax(z / T, dim=1)
            total = total + alpha * (q_c * (torch.log(q_c) - torch.log(q_i))).sum(1).mean()
            total = total + lam * ((f - feats[-1].detach()) ** 2).reshape(4, -1).sum(1).mean()
    return total


@pytest.mark.parametrize("alpha,lam,T", [(0.3, 0.03, 3.0), (0.7, 1.0, 1.0), (0.0, 0.5, 2.0)])
def test_loss_equals_the_direct_computation(alpha, lam, T):
    logits, feats, y = hand_made()
    got = byot_loss(logits, feats, y, alpha, lam, T)
    assert torch.allclose(got, direct(logits, feats, y, alpha, lam, T), atol=1e-6)


def test_the_deepest_classifier_is_a_detached_teacher():
    """Its logits get only (1 - alpha) CE's gradient, its features none: the KL and hints pull the others."""
    logits, feats, y = hand_made()
    byot_loss(logits, feats, y, 0.3, 0.03, 3.0).backward()
    only_ce = logits[-1].detach().requires_grad_(True)
    (0.7 * F.cross_entropy(only_ce, y)).backward()
    assert torch.allclose(logits[-1].grad, only_ce.grad) and feats[-1].grad is None
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0


def test_alpha_and_lambda_zero_is_the_sum_of_label_losses():
    logits, feats, y = hand_made(1)
    want = sum(F.cross_entropy(z, y) for z in logits)
    assert torch.equal(byot_loss(logits, feats, y, 0.0, 0.0, 3.0), want)


def test_hint_vanishes_when_features_match_and_kl_when_logits_match():
    logits, feats, y = hand_made(2)
    same_z = [logits[-1].detach().clone() for _ in range(3)]
    same_f = [feats[-1].detach().clone() for _ in range(3)]
    ce = sum(0.5 * F.cross_entropy(z, y) for z in same_z)
    assert torch.allclose(byot_loss(same_z, same_f, y, 0.5, 10.0, 3.0), ce, atol=1e-6)


# ---- sections and exits ----------------------------------------------------------------------------------

def test_sections_compose_to_the_reference_on_both_tasks(digits):
    x = digits.train.x[:7]
    model = digits.build_reference().eval()
    h = x
    for s in digits.sections(model):
        h = s(h)
    assert torch.equal(h, model(x))
    resnet = cifar_resnet(34).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    h = x
    sections = CIFAR10().sections(resnet)
    with torch.no_grad():
        for s in sections:
            h = s(h)
        assert torch.equal(h, resnet(x))
    own = {id(p) for p in resnet.parameters()}
    assert {id(p) for s in sections for p in s.parameters()} == own  # views, no copies


def activations(modules, run):
    """The output of every module in `modules` during `run()`, by module identity."""
    seen, hooks = {}, []
    for m in modules:
        hooks.append(m.register_forward_hook(lambda mod, args, out: seen.__setitem__(id(mod), out.detach().clone())))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("which", ["digits", "cifar10"])
def test_every_exit_is_a_prefix_of_the_full_network(which, digits):
    """Shallow exit k's own forward runs the full network's first k + 1 sections (the very same parameter tensors)
    to the same activations, then its classifier, to the same logits as the full network's exit k; the deepest
    exit is the full network itself."""
    if which == "digits":
        task, x = digits, digits.train.x[:9]
    else:
        task, x = CIFAR10(), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seed_everything(0)
    backbone = task.build_reference()
    sections = task.sections(backbone)
    net = exit_network(backbone, sections, x[:1]).eval()
    with torch.no_grad():
        full_acts, (logits, _) = activations(sections, lambda: net.forward_all(x))
        assert torch.equal(logits[-1], backbone(x))
        assert net.n_exits == len(sections) - 1 and len(logits) == net.n_exits  # the last section is the head
        assert net.exit_model(-1) is backbone  # the deepest exit is the whole network
        for k in range(net.n_exits - 1):
            exit_k = net.exit_model(k)
            backbone_params = {id(p) for s in sections[:k + 1] for p in s.parameters()}
            assert backbone_params <= {id(p) for p in exit_k.parameters()}
            acts, out = activations(sections[:k + 1], lambda: exit_k(x))
            assert torch.equal(out, logits[k]), k
            assert acts.keys() == {id(s) for s in sections[:k + 1]}
            assert all(torch.equal(a, full_acts[i]) for i, a in acts.items())
    with torch.no_grad():  # shared weights: a change to the full network is a change to every exit
        next(sections[0].parameters()).add_(1.0)
        assert torch.equal(net.exit_model(0)(x), net.forward_all(x)[0][0])


def test_the_state_dict_keeps_the_reference_keys(digits):
    net = byot.build_network(digits, False, 0)
    ref_keys = set(digits.build_reference().state_dict())
    assert {k.removeprefix("backbone.") for k in net.state_dict() if k.startswith("backbone.")} == ref_keys
    assert isinstance(net, ExitNetwork) and net.exit_model(-1) is net.backbone


# ---- the deepest exit against plain training ------------------------------------------------------------

def plain_training(task, ctx):
    seed_everything(ctx.seed)
    model = task.build_reference()
    fit(model, task.training_split(), task.reference_recipe, ctx, seed=ctx.seed, description="plain",
        augment=task.augment)
    return model.state_dict()


def test_deepest_exit_with_alpha_lambda_zero_and_detached_exits_is_plain_training(digits, smoke_ctx):
    """alpha = lambda = 0 with the shallow classifiers on detached features: the backbone is trained exactly as
    plain training (same seed, same weights bit for bit), while the exits were trained too."""
    cfg = apply_overrides(byot.BYOTConfig(), {"alpha": "0", "lam": "0", "exit": "-1", "val_fraction": "0",
                                              "detach_exits": "true"})
    net, meta = byot.train_network(digits, cfg.training(), smoke_ctx, "byot")
    plain = plain_training(digits, smoke_ctx)
    got = {k.removeprefix("backbone."): v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    untrained = byot.build_network(digits, True, smoke_ctx.seed)
    assert not torch.equal(net.heads[0][-1].weight, untrained.heads[0][-1].weight)
    assert meta["steps"] == 20 and meta["seconds"] > 0


def test_without_detaching_the_exits_train_the_backbone(digits, smoke_ctx):
    """The paper's setting (exits attached): even at alpha = lambda = 0 the shallow classifiers' CE trains the
    shared backbone (deep supervision), so it is not plain training; that is what the control is."""
    cfg = apply_overrides(byot.BYOTConfig(), {"alpha": "0", "lam": "0", "exit": "-1", "val_fraction": "0"})
    net, _ = byot.train_network(digits, cfg.training(), smoke_ctx, "byot")
    plain = plain_training(digits, smoke_ctx)
    assert not torch.equal(net.backbone.state_dict()["0.weight"], plain["0.weight"])
    assert cfg.training() == byot.BYOTConfig(val_fraction=0.0, exit="-1").training(control=True)


def test_trained_networks_are_cached_with_their_cost(digits, smoke_ctx, tmp_path):
    cfg = byot.BYOTConfig()
    net, meta = byot.train_network(digits, cfg.training(), smoke_ctx, "byot")
    again, meta2 = byot.train_network(digits, cfg.training(), smoke_ctx, "byot")
    assert meta2 == meta and meta["seconds"] > 0 and meta["samples_seen"] > 0
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert cfg.training() == byot.BYOTConfig(exit="1", max_drop="2pp").training()  # choosing does not retrain
    assert cfg.training() != cfg.training(control=True)
    assert len(list((tmp_path / "cache" / "methods" / "byot").rglob("network-*.safetensors"))) == 1


def test_held_out_rows_are_never_trained_on(digits):
    train, val = byot.split(digits, 0.1, seed=3)
    n = digits.train.y.shape[0]
    assert train.y.shape[0] + val.y.shape[0] == n and val.y.shape[0] == round(0.1 * n)
    rows = {tuple(r.flatten().tolist()) for r in train.x}
    assert not any(tuple(r.flatten().tolist()) in rows for r in val.x)
    again_train, again_val = byot.split(digits, 0.1, seed=3)
    assert torch.equal(again_val.x, val.x)
    assert byot.split(digits, 0.0, seed=3) == (digits.train, None)


# ---- choosing the exit, and the settings -------------------------------------------------------------------

def test_auto_picks_the_shallowest_exit_within_the_budget():
    from bench.budget import parse_budget

    val = [0.90, 0.975, 0.98]
    assert byot.choose_exit(val, parse_budget("1%").allowed) == 1  # floor 0.98 - 0.0098
    assert byot.choose_exit(val, parse_budget("8pp").allowed) == 0
    assert byot.choose_exit(val, parse_budget("0%").allowed) == 2
    assert byot.choose_exit([0.99, 0.5, 0.98], parse_budget("0%").allowed) == 0  # a shallow exit may beat it


@pytest.mark.parametrize("bad,expected", [
    ({"exit": "middle"}, r"'auto' .* 0 \(shallowest\), 1, \.\.\., or -1 \(deepest\)"),
    ({"val_fraction": "0"}, r"val_fraction must be > 0 .* 0 \(shallowest\), 1, \.\.\., or -1 \(deepest\)"),
    ({"max_drop": "1"}, r"'1%' .* '1pp'"),
    ({"alpha": "1"}, r"\[0, 1\)"),
    ({"temperature": "0"}, "temperature"),
    ({"val_fraction": "0.9"}, "<= 0.5"),
    ({"lam": "-1"}, ">= 0"),
])
def test_settings_errors_list_the_valid_options(bad, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(byot.BYOTConfig(), bad, owner="byot")


def test_an_exit_out_of_range_lists_the_exits():
    with pytest.raises(ConfigError, match=r"3 exits, so use 'auto', 0, 1, 2, or -1 \(deepest\)"):
        byot.resolve_exit(byot.BYOTConfig(exit="3"), 3)
    assert byot.resolve_exit(byot.BYOTConfig(exit="-1"), 3) == 2


def test_unknown_settings_list_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: alpha .*lam .*temperature .*exit .*max_drop .*val_fraction "
                                          ".*detach_exits"):
        apply_overrides(byot.BYOTConfig(), {"lambda": "0.1"}, owner="byot")


# ---- end to end ---------------------------------------------------------------------------------------------

def check_record(record, n_exits: int):
    assert record["status"] == "ok", record.get("error")
    stats = record["method_stats"]
    assert stats["exits"] == n_exits
    k = int(stats["chosen_exit"])
    assert record["quality"]["value"] == pytest.approx(stats[f"exit{k}_top1_accuracy"])
    assert record["size"]["method"]["parameters"] == stats[f"exit{k}_parameters"]
    for j in range(n_exits):
        assert {f"exit{j}_top1_accuracy", f"exit{j}_val_accuracy", f"exit{j}_macs_per_image",
                f"control_exit{j}_top1_accuracy"} <= stats.keys()
    macs = [stats[f"exit{j}_macs_per_image"] for j in range(n_exits)]
    assert macs == sorted(macs)  # deeper exits cost more
    (control,) = record["controls"]
    assert control["name"] == "network_without_self_distillation"
    assert control["value"] == pytest.approx(stats[f"control_exit{k}_top1_accuracy"])
    assert record["cost"]["steps"] > 0 and record["cost"]["seconds"] > 0
    return stats


@pytest.mark.slow
def test_smoke_run_on_digits_through_the_runner(tmp_path, monkeypatch):
    from bench.runner import run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = run("digits", "byot", budget="smoke", results_root=tmp_path / "results")
    check_record(json.loads(out.path.read_text()), 3)
    out = run("digits", "byot", budget="smoke", overrides={"exit": "0"}, results_root=tmp_path / "results")
    stats = check_record(json.loads(out.path.read_text()), 3)
    assert stats["chosen_exit"] == 0
    assert len(list((tmp_path / "cache" / "methods" / "byot").rglob("network-*.safetensors"))) == 2  # + control


@pytest.mark.slow
def test_smoke_run_on_cifar10_fixture_files_with_the_resnet(tmp_path, monkeypatch):
    from bench.runner import run

    cifar10_fixtures().write_cifar10(tmp_path / "data")
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BENCH_CIFAR10_VERIFY", "0")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_CIFAR10_REFERENCE", raising=False)
    out = run("cifar10", "byot", budget="smoke", overrides={"exit": "1"}, results_root=tmp_path / "results")
    record = json.loads(out.path.read_text())
    stats = check_record(record, 4)
    assert stats["chosen_exit"] == 1 and record["quality"]["n"] == 10
    assert record["size"]["method"]["parameters"] < record["size"]["reference"]["parameters"]
