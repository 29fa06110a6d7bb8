"""`ncfm`: dataset distillation by neural characteristic function matching (Wang et al., CVPR 2025, "Dataset
Distillation with Neural Characteristic Function: A Minmax Perspective", arXiv:2502.20653).

What is distilled is the data, not the model: a synthetic training set of `ipc` images per class is optimised so
that the task's reference architecture, trained on it, comes close to the same architecture trained on the whole
training split. What this accelerates is training, so the record's `training` block (schema: `bench.result.
Training`) compares training on the synthetic set with training on the full split; inference is the reference
architecture's own (the record's speed reads about 1x).

The discrepancy (`_ncfm.cf_discrepancy`). A feature set's characteristic function at frequency t is
Phi(t) = E_x[exp(i <t, f(x)>)], estimated over the set; f is a network's features, L2-normalised (the authors'
`match_loss`). For real features f(x) and synthetic f(x~) of one class, write Phi = |Phi| e^{i theta}; then

    |Phi_x(t) - Phi_x~(t)|^2 = (|Phi_x| - |Phi_x~|)^2 + 2 |Phi_x| |Phi_x~| (1 - cos(theta_x - theta_x~))
                                 ^ amplitude                 ^ phase

and the paper's discrepancy weights the two (alpha: amplitude against phase, the paper's alpha = 0.5 default):

    C_T(x, x~) = E_{t ~ F_T} sqrt( alpha (|Phi_x(t)| - |Phi_x~(t)|)^2
                                   + (1 - alpha) 2 |Phi_x(t)| |Phi_x~(t)| (1 - cos(theta_x(t) - theta_x~(t))) )

estimated by the mean over `n_freqs` frequencies drawn from F_T. (At alpha = 0.5 the square root is
sqrt(1/2) |Phi_x(t) - Phi_x~(t)|; the tests check both forms against a complex-number computation.)

The min-max (`_ncfm.synthesise`). F_T is learned: t = psi(z), z ~ N(0, I), where psi (`SamplingNet`, the
authors' SampleNet: three Linear + BatchNorm layers, LeakyReLU, LeakyReLU, tanh) is the max player that looks
for the frequencies where the two sets differ most, while the synthetic images x~ are the min player:

    min_{x~} max_{psi} sum_c C_{T_psi}( f(x_c), f(x~_c) )

over the classes c, with real images drawn afresh (`real_batch` per class) at each iteration. Both players take
one Adam step per iteration from the same backward pass (the images descend, psi ascends on the negated
gradient), as the authors' code does with two backward passes. The frequencies are drawn once per iteration and
shared by the classes (one psi step per iteration).

The feature network f: as in the paper, a pool of networks of the task's architecture, each trained briefly
(`pretrain_epochs` epochs of the task's reference recipe on the full split; 0: randomly initialised), cycled
every `model_interval` iterations; f is the network up to its head (the task's `Sections` but the last), the
feature map flattened (average-pooled over space when it has more than 2,048 values: CIFAR ResNet's 512 x 4 x 4
becomes 512). The synthetic images start from real ones (`ipc` per class, drawn at random), as the paper's do.

Evaluation, and the controls. The reference architecture is trained on the synthetic set with the task's
reference recipe scaled to the small set: the same optimiser, learning rate, weight decay and augmentation
(`Augmentation`), the batch capped at the set's size, and `train_epochs` epochs (dataset-distillation
evaluations train many epochs on few images: DC/DM/NCFM use 300-1000; on `digits` at ipc 10, 60, 150 and 300
epochs gave both sets the same accuracy within 0.4 pp, so the default is 60, the cheapest: the time ratio is what
this method is about). Two controls, trained the same way:
`random_real` (the synthetic set's own starting point: the same number of real images per class, chosen at
random; so the gain over it is what the CF matching added) and `full_training_set` (the reference architecture
trained on the whole split with the task's own recipe, the cost the synthetic set is compared with; with seed 0
on `digits` it is the published reference bit for bit). The full-split network is cached with its measured cost
(`bench.cache.cached_bundle`); the record says whether its figures were measured in this run or read from the
cache.

Cost. The record's `cost` is the whole of the method: the feature networks' pre-training and the synthesis
(`training.preparation_seconds`, paid once per synthetic set) plus training on the synthetic set
(`training.seconds`). `training.time_ratio` = training on the synthetic set / training on the full split,
measured on the same machine in the same way (`tasks._kit.classification.fit`).

Left out, and why: the authors' multi-formation parameterisation (`factor: 2`, four downsampled images packed in
each synthetic image: a storage trick orthogonal to the matching) and their calibration term (cross-entropy of
the synthetic images under a fully trained network); their mixup/cutmix and DSA augmentations in evaluation (the
task's own augmentation is used for every arm alike); a pool of 20 pre-trained networks (a few here, to run on a
CPU); the 300x loss scale (Adam is invariant to it); their 4,096 frequencies drawn as 256 distinct ones repeated
16 times (`n_freqs` distinct ones here). Nothing of this is in a library: torch has no characteristic-function
losses, and the authors' code is not a package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from baselines.base import Applied, ControlResult, Cost, Method
from bench.api import Augmentation, Sections, TrainingComparison, TrainingSplit
from bench.config import ConfigError, check_range
from bench.registry import register_method

ALGORITHM_VERSION = "1"  # part of the cache key of the full-split network: bump when its training changes


@dataclass(frozen=True)
class NCFMConfig:
    ipc: int = 10  # synthetic images per class (the paper: 1, 10, 50)
    iterations: int = 300  # min-max iterations (the paper: 20,000 on CIFAR; a few minutes on 2 CPU cores here)
    alpha: float = 0.5  # weight of the amplitude term; 1 - alpha weights the phase term (the authors' 0.5 / 0.5)
    n_freqs: int = 256  # frequencies t drawn from the sampling network per iteration (the authors: 256 distinct)
    lr_images: float = 0.01  # Adam step size on the synthetic pixels (the authors' lr_img)
    lr_sampler: float = 1e-3  # Adam step size of the sampling network's ascent (the authors' lr_sampling_net)
    real_batch: int = 64  # real images per class per iteration
    feature_nets: int = 4  # networks in the feature pool (the authors: 20)
    pretrain_epochs: int = 2  # epochs of the reference recipe each feature network is trained; 0: random init
    model_interval: int = 25  # iterations before the next feature network of the pool takes over
    train_epochs: int = 60  # epochs on the synthetic (and random-real) set; digits: 60 and 150 gave the same accuracy

    def validate(self) -> None:
        for name in ("ipc", "iterations", "n_freqs", "real_batch", "feature_nets", "model_interval", "train_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1 (an integer count)")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1]: 1 matches amplitudes only, 0 phases only, "
                              f"0.5 (the paper's) both alike")
        check_range("lr_images", self.lr_images, lo=0, lo_open=True)
        check_range("lr_sampler", self.lr_sampler, lo=0)
        check_range("pretrain_epochs", self.pretrain_epochs, lo=0)


def n_classes(task) -> int:
    return int(task.training_split().y.max()) + 1


def train_on(task, data, recipe, ctx, description: str):
    """(the reference architecture trained on `data` with `recipe`, its `TrainStats`), seeded by the run."""
    from tasks._kit.classification import fit, seed_everything

    seed_everything(ctx.seed)
    model = task.build_reference()
    stats = fit(model, data, recipe, ctx, seed=ctx.seed, description=description, augment=task.augment)
    return model, stats


def small_set_recipe(recipe, rows: int, epochs: int):
    """The task's recipe for a set of `rows` images: the same optimiser settings, `epochs` epochs, the batch capped
    at the set's size."""
    return dataclasses.replace(recipe, epochs=epochs, batch_size=min(recipe.batch_size, rows))


def full_split_network(task, ctx):
    """(model, {"seconds", "steps", "samples_seen"}, built_now): the reference architecture trained on the whole
    training split with the task's reference recipe, cached with its measured cost."""
    from bench import cache

    key = cache.key(ALGORITHM_VERSION, task.spec.name, task.spec.version, task.data_fingerprint(),
                    repr(task.build_reference()), repr(task.reference_recipe), ctx.seed, ctx.budget, ctx.device)
    path = cache.method_dir("ncfm", task) / f"full-{key}.safetensors"

    def build() -> tuple[dict, dict]:
        model, stats = train_on(task, task.training_split(), task.reference_recipe, ctx,
                                "Training the reference architecture on the full split (control and cost, cached)")
        return model.state_dict(), {"seconds": stats.seconds, "steps": stats.steps,
                                    "samples_seen": stats.samples_seen}

    state, meta, _, built_now = cache.cached_bundle(path, build)
    model = task.build_reference()
    model.load_state_dict(state)
    return model, meta, built_now


def feature_pool(task, cfg: NCFMConfig, ctx):
    """(`cfg.feature_nets` frozen `FeatureNet`s, their training seconds and steps): each a fresh reference
    architecture (seeded apart) trained `pretrain_epochs` epochs of the reference recipe on the full split."""
    from baselines.distillation._ncfm import FeatureNet
    from tasks._kit.classification import fit, seed_everything

    nets, seconds, steps = [], 0.0, 0
    recipe = dataclasses.replace(task.reference_recipe, epochs=cfg.pretrain_epochs)
    for k in range(cfg.feature_nets):
        seed = ctx.seed * 1000 + k + 1  # apart from the evaluation networks' seed
        seed_everything(seed)
        model = task.build_reference().to(ctx.device)
        if cfg.pretrain_epochs:
            stats = fit(model, task.training_split(), recipe, ctx, seed=seed, augment=task.augment,
                        description=f"Pre-training feature network {k + 1}/{cfg.feature_nets} "
                                    f"({cfg.pretrain_epochs} epoch(s))")
            seconds, steps = seconds + stats.seconds, steps + stats.steps
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        nets.append(FeatureNet(model, task.sections(model)).to(ctx.device))
    return nets, seconds, steps


@register_method("ncfm", family="distillation", paper="Wang et al., Dataset Distillation with Neural "
                 "Characteristic Function: A Minmax Perspective", year=2025, url="https://arxiv.org/abs/2502.20653",
                 modalities=("image-classification",),
                 summary="a few synthetic images per class matched to the real data's neural characteristic "
                         "function (min-max); the reference architecture trained on them",
                 requires=(TrainingSplit, Augmentation, Sections))
class NeuralCharacteristicFunctionMatching(Method):
    Config = NCFMConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.distillation._ncfm import cf_discrepancy, synthesise
        from tasks._kit.classification import Split

        cfg = self.config
        data = task.training_split()
        k = n_classes(task)
        nets, pre_seconds, pre_steps = feature_pool(task, cfg, ctx)
        iterations = ctx.budget.steps(cfg.iterations)
        syn = synthesise(nets, data.x, data.y, k, cfg.ipc, iterations=iterations, alpha=cfg.alpha,
                         n_freqs=cfg.n_freqs, lr_images=cfg.lr_images, lr_sampler=cfg.lr_sampler,
                         real_batch=cfg.real_batch, model_interval=cfg.model_interval, seed=ctx.seed,
                         augment=task.augment, progress=ctx.progress, device=ctx.device)

        # the discrepancy before and after, at one fixed set of Gaussian frequencies, on the first feature network
        gen = torch.Generator().manual_seed(ctx.seed + 7)
        with torch.no_grad():
            f_real = torch.cat([nets[0](data.x[i:i + ctx.batch_size].to(ctx.device))
                                for i in range(0, data.x.shape[0], ctx.batch_size)])
            t = torch.randn(cfg.n_freqs, f_real.shape[1], generator=gen).to(ctx.device)
            ys = data.y.to(ctx.device)

            def matched(images) -> float:
                f = nets[0](images)
                return float(sum(cf_discrepancy(f_real[ys == c], f[syn.y == c], t, cfg.alpha) for c in range(k)) / k)

            cfd_before, cfd_after = matched(syn.init), matched(syn.x)

        rows = int(syn.y.shape[0])
        recipe = small_set_recipe(task.reference_recipe, rows, cfg.train_epochs)
        model, stats = train_on(task, Split(syn.x.cpu(), syn.y.cpu()), recipe, ctx,
                                f"Training the reference architecture on the {rows} synthetic images")
        control_model, control_stats = train_on(task, Split(syn.init.cpu(), syn.y.cpu()), recipe, ctx,
                                                f"Training it on {cfg.ipc} random real images per class (control)")
        full_model, full, built_now = full_split_network(task, ctx)

        random_eval = task.evaluate(task.prepare(control_model, ctx), ctx)
        full_eval = task.evaluate(task.prepare(full_model, ctx), ctx)
        controls = [
            ControlResult("random_real", f"the synthetic set's starting point: {cfg.ipc} real training image(s) per "
                          f"class chosen at random ({rows} in all), the reference architecture trained on them the "
                          f"same way ({recipe.epochs} epochs, batch {recipe.batch_size})",
                          random_eval.value, random_eval.per_example, control_stats.seconds),
            ControlResult("full_training_set", f"the reference architecture trained on the whole training split "
                          f"({int(data.y.shape[0])} images) with the task's reference recipe, same seed",
                          full_eval.value, full_eval.per_example, float(full["seconds"])),
        ]
        preparation = pre_seconds + syn.seconds
        source = ("measured in this run" if built_now else
                  "measured by an earlier run on this machine and cached with the network (bench.cache)")
        training = TrainingComparison(
            rows=rows, seconds=stats.seconds, steps=stats.steps, samples_seen=stats.samples_seen,
            full_rows=int(data.y.shape[0]), full_seconds=float(full["seconds"]), full_steps=int(full["steps"]),
            full_samples_seen=int(full["samples_seen"]), full_source=source, preparation_seconds=preparation,
            description=f"the reference architecture trained on {cfg.ipc} synthetic image(s) per class "
                        f"({recipe.epochs} epochs, batch {recipe.batch_size}) against the same architecture on "
                        f"the full split (the task's reference recipe); preparation: {cfg.feature_nets} feature "
                        f"network(s) pre-trained {cfg.pretrain_epochs} epoch(s) each, {iterations} min-max "
                        f"iterations")
        cost = Cost(preparation + stats.seconds, pre_steps + syn.steps + stats.steps,
                    stats.samples_seen + iterations * k * (cfg.real_batch + cfg.ipc),
                    f"{pre_steps} pre-training steps of {cfg.feature_nets} feature network(s), {syn.steps} min-max "
                    f"iterations over {k} classes, then {stats.steps} Adam steps training the reference "
                    f"architecture on the {rows} synthetic images")
        method_stats = {
            "ipc": cfg.ipc, "synthetic_rows": rows, "iterations": iterations,
            "cfd_before": cfd_before, "cfd_after": cfd_after,
            "loss_first": syn.losses[0], "loss_last": syn.losses[-1],
            "pretrain_seconds": pre_seconds, "synthesis_seconds": syn.seconds,
            "random_real_train_seconds": control_stats.seconds,
            f"random_real_{task.spec.metric}": random_eval.value, f"full_training_set_{task.spec.metric}":
                full_eval.value,
        }
        return Applied(task.prepare(model, ctx), cost, controls, stats=lambda: dict(method_stats), training=training)
