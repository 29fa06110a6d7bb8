"""`byot`: self-distillation with early exits (Zhang et al., ICCV 2019, "Be Your Own Teacher: Improve the
Performance of Convolutional Neural Networks via Self Distillation", arXiv:1905.08094).

The task's reference architecture is cut into sections (the `Sections` capability); after every backbone section
but the last, a shallow classifier reads the section's output through a bottleneck. The deepest classifier is
the reference's own head. All classifiers are trained together, from scratch, on

    L = sum_{i=1..C} [ (1 - alpha) CE(q_i, y) + alpha KL(q_C^T || q_i^T) + lambda ||F_i - F_C||^2 ]

q_i = softmax(z_i) is classifier i's prediction, q^T = softmax(z / T) its softened one, C the deepest, F_i the
output of classifier i's bottleneck and F_C the deepest's feature map (the last section's output, which the head
reads). For i = C the KL and hint terms are zero, so the deepest classifier only learns from the labels and
teaches the others: q_C and F_C enter the other terms detached (the "teacher" side). ||.||^2 is the squared L2
distance per example, averaged over the batch. (`_byot.byot_loss` is this equation, term by term.)

What the paper leaves open, and what is chosen here:
- the bottleneck: the authors' released code uses depthwise-separable convolutions (`SepConv`), one per halving
  of the resolution, to the deepest's channels; so does `_byot.bottleneck`, followed by a fresh copy of the
  reference's own head, so F_i has exactly F_C's shape;
- the deepest classifier's CE weight is (1 - alpha), as the paper's sum over all i says (the authors' code gives
  it a full CE); the KL carries no T^2 factor (neither does their soft cross-entropy);
- defaults alpha = 0.3, T = 3 (the authors' code) and lambda = 0.03 (the feature-loss coefficient of the BYOT
  code releases that have the hint term);
- the recipe is the task's own reference recipe (`Sections.reference_recipe`: Adam, cosine), not the paper's SGD:
  the same network, the same training budget as the reference.

At inference one exit runs alone (`_byot.EarlyExit`: its sections, bottleneck and head): the `exit` setting, or
`exit=auto`, the shallowest exit whose accuracy on held-out training data (`val_fraction` of the split, seeded,
never trained on) is within `max_drop` (default: the task's quality budget) of the deepest exit's. The test set
never chooses. The record's speed, MACs and size are the chosen exit's; `method_stats` has every exit's test and
validation accuracy, MACs per image and parameters, and the control's accuracy at every exit.

Control (`network_without_self_distillation`): the same network, split, recipe and seed trained with label CE at
every exit and nothing else (alpha = lambda = 0), evaluated at the same exit. Note that this is not plain
training: the shallow classifiers' CE trains the shared backbone too (deep supervision). With
`detach_exits=true` the shallow classifiers read detached features and the backbone trains exactly as plain
training (the tests prove it bit for bit), an ablation.

Both networks are cached under `BENCH_CACHE` with their training cost (`bench.cache.cached_bundle`), keyed by the
task (name, version, data fingerprint), the reference architecture and recipe, the training settings (not
`exit` or `max_drop`: they only choose among the trained exits), the seed, the budget and the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.api import Augmentation, Sections, TrainingSplit
from bench.config import ConfigError, check_range
from bench.registry import register_method

ALGORITHM_VERSION = "1"  # part of the cache key: bump when the training changes
EXIT_HELP = "'auto' (the shallowest exit within max_drop of the deepest on held-out data) or an exit index: " \
            "0 (shallowest), 1, ..., or -1 (deepest)"


@dataclass(frozen=True)
class BYOTConfig:
    alpha: float = 0.3  # weight of the KL from the deepest classifier; 1 - alpha weights each label CE (code: 0.3)
    lam: float = 0.03  # lambda: weight of the L2 feature hints ||F_i - F_C||^2 (the BYOT code releases: 0.03)
    temperature: float = 3.0  # T of the KL term (the authors' code: 3)
    exit: str = "auto"  # the exit that runs at inference: see EXIT_HELP
    max_drop: str = ""  # exit=auto's budget against the deepest exit ('1%' relative, '0.5pp'); "": the task's own
    val_fraction: float = 0.1  # share of the training split held out (seeded) to measure the exits; 0: none
    detach_exits: bool = False  # true: shallow classifiers read detached features (an ablation; the paper: false)

    def validate(self) -> None:
        from bench.budget import BudgetError, parse_budget

        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("lam", self.lam, lo=0)
        if not 0 <= self.alpha < 1:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1): the deepest classifier's only term is "
                              f"(1 - alpha) CE, so alpha = 1 would leave it untrained")
        check_range("val_fraction", self.val_fraction, lo=0, hi=0.5)
        if self.exit != "auto":
            try:
                int(self.exit)
            except ValueError:
                raise ConfigError(f"exit={self.exit!r} is not valid: use {EXIT_HELP}") from None
        elif self.val_fraction == 0:
            raise ConfigError("exit=auto chooses on held-out training data, so val_fraction must be > 0 (0.1 by "
                              "default); or give the exit: 0 (shallowest), 1, ..., or -1 (deepest)")
        if self.max_drop:
            try:
                parse_budget(self.max_drop)
            except BudgetError as e:
                raise ConfigError(f"max_drop={self.max_drop!r}: {e}; or leave it empty for the task's own quality "
                                  f"budget") from None

    def training(self, control: bool = False) -> dict:
        """What the trained network depends on among the settings (the control: no KL, no hints)."""
        alpha, lam = (0.0, 0.0) if control else (self.alpha, self.lam)
        return {"alpha": alpha, "lam": lam, "temperature": self.temperature if alpha else None,
                "val_fraction": self.val_fraction, "detach_exits": self.detach_exits}


def split(task, val_fraction: float, seed: int):
    """(training part, held-out part or None) of the task's training split: `val_fraction` of its rows, drawn by
    `seed`, held out; with 0, the whole split (the same object) and None."""
    import torch

    from bench.api import pick
    from tasks._kit.classification import Split

    data = task.training_split()
    n = int(data.y.shape[0])
    if not val_fraction:
        return data, None
    held = torch.tensor(pick(n, max(1, round(val_fraction * n)), seed), dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return Split(data.x[keep], data.y[keep]), Split(data.x[held], data.y[held])


def build_network(task, detach_exits: bool, seed: int):
    """A fresh, untrained `ExitNetwork` on the task's reference architecture; the backbone's initial weights are
    a plain `build_reference()`'s under the same seed."""
    from baselines.distillation._byot import exit_network
    from tasks._kit.classification import seed_everything

    seed_everything(seed)
    backbone = task.build_reference()
    return exit_network(backbone, task.sections(backbone), task.training_split().x[:1], detach_exits)


def train_network(task, settings: dict, ctx, description: str):
    """(trained ExitNetwork on ctx.device, {"seconds", "steps", "samples_seen"}), from the cache or trained now."""
    from baselines.distillation._byot import Recording, byot_loss
    from bench import cache
    from tasks._kit.classification import fit

    key = cache.key(ALGORITHM_VERSION, task.spec.name, task.spec.version, task.data_fingerprint(),
                    repr(task.build_reference()), repr(task.reference_recipe), settings, ctx.seed, ctx.budget,
                    ctx.device)
    path = cache.method_dir("byot", task) / f"network-{key}.safetensors"

    def build() -> tuple[dict, dict]:
        net = build_network(task, settings["detach_exits"], ctx.seed)
        rec = Recording(net)
        train, _ = split(task, settings["val_fraction"], ctx.seed)

        def loss_fn(logits, x, y):
            return byot_loss(*rec.outputs, y, settings["alpha"], settings["lam"], settings["temperature"] or 1.0)

        stats = fit(rec, train, task.reference_recipe, ctx, seed=ctx.seed, description=description,
                    loss_fn=loss_fn, augment=task.augment)
        return net.state_dict(), {"seconds": stats.seconds, "steps": stats.steps, "samples_seen": stats.samples_seen}

    state, meta, _, _ = cache.cached_bundle(path, build)
    net = build_network(task, settings["detach_exits"], ctx.seed)
    net.load_state_dict(state)
    return net.to(ctx.device).eval(), meta


def exit_accuracies(net, data, ctx) -> list[float]:
    """Every exit's top-1 accuracy on `data` (float32, the training precision), shallowest first."""
    import torch

    x, y = data.x.to(ctx.device), data.y.to(ctx.device)
    chunks: list[list] = [[] for _ in range(net.n_exits)]
    with torch.inference_mode():
        for i in range(0, x.shape[0], ctx.batch_size):
            for j, z in enumerate(net.forward_all(x[i:i + ctx.batch_size])[0]):
                chunks[j].append(z.argmax(1))
    return [float((torch.cat(c) == y).double().mean()) for c in chunks]


def choose_exit(val_acc: list[float], allowed) -> int:
    """The shallowest exit whose validation accuracy is at least the deepest's minus `allowed(deepest)`."""
    deepest = val_acc[-1]
    floor = deepest - allowed(deepest)
    return next(k for k, a in enumerate(val_acc) if a >= floor - 1e-12)


def resolve_exit(cfg: BYOTConfig, n_exits: int) -> int:
    k = int(cfg.exit)
    if not -n_exits <= k < n_exits:
        raise ConfigError(f"exit={cfg.exit}: this reference has {n_exits} exits, so use 'auto', "
                          f"{', '.join(str(i) for i in range(n_exits))}, or -1 (deepest)")
    return k % n_exits


@register_method("byot", family="distillation", paper="Zhang et al., Be Your Own Teacher: Improve the Performance "
                 "of Convolutional Neural Networks via Self Distillation", year=2019,
                 url="https://arxiv.org/abs/1905.08094", modalities=("image-classification",),
                 summary="the reference with a classifier after each section, self-distilled from the deepest; "
                         "one exit runs alone",
                 requires=(TrainingSplit, Augmentation, Sections))
class BeYourOwnTeacher(Method):
    Config = BYOTConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        import torch

        from bench.budget import parse_budget
        from bench.measure import count_macs, count_parameters

        cfg = self.config
        net, meta = train_network(task, cfg.training(), ctx, f"Self-distilling the reference architecture's exits "
                                  f"(alpha={cfg.alpha}, lambda={cfg.lam}, T={cfg.temperature})")
        control, control_meta = train_network(task, cfg.training(control=True), ctx,
                                              "Training the same exits on labels alone (control, cached)")
        n = net.n_exits
        _, val = split(task, cfg.val_fraction, ctx.seed)
        val_acc = exit_accuracies(net, val, ctx) if val is not None else None
        if cfg.exit == "auto":
            budget = parse_budget(cfg.max_drop or task.spec.quality_budget, task.spec.metric)
            k = choose_exit(val_acc, budget.allowed)
        else:
            k = resolve_exit(cfg, n)

        metric = task.spec.metric
        sample = task.training_split().x[:1].to(device=ctx.device, dtype=ctx.torch_dtype)
        stats: dict[str, float] = {"exits": n, "chosen_exit": k}
        subjects, control_evals = [], []
        with ctx.progress.step(f"Evaluating all {n} exits, and the control's", total=2 * n) as advance:
            for j in range(n):
                s = task.prepare(copy.deepcopy(net.exit_model(j)), ctx)
                ev = task.evaluate(s, ctx)
                subjects.append(s)
                stats[f"exit{j}_{metric}"] = ev.value
                if val_acc is not None:
                    stats[f"exit{j}_val_accuracy"] = val_acc[j]
                with torch.inference_mode():
                    stats[f"exit{j}_macs_per_image"] = count_macs(lambda: s.model(sample))
                stats[f"exit{j}_parameters"] = count_parameters(s.model)[0]
                advance(1)
            for j in range(n):
                ev = task.evaluate(task.prepare(copy.deepcopy(control.exit_model(j)), ctx), ctx)
                control_evals.append(ev)
                stats[f"control_exit{j}_{metric}"] = ev.value
                advance(1)
        held = f", {cfg.val_fraction:g} of the training split held out to measure the exits" if val else ""
        cost = Cost(meta["seconds"], meta["steps"], meta["samples_seen"],
                    f"{meta['steps']} Adam steps training the reference architecture from scratch with {n - 1} shallow "
                    f"classifiers (label CE, KL from the deepest, feature hints){held}")
        ctrl = ControlResult(
            "network_without_self_distillation",
            f"the same {n}-exit network, split, recipe and seed trained on labels alone at every exit (alpha = "
            f"lambda = 0), evaluated at the same exit ({k})",
            control_evals[k].value, control_evals[k].per_example, control_meta["seconds"])
        return Applied(subjects[k], cost, [ctrl], stats=lambda: dict(stats))
