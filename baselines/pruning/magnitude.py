"""`magnitude`: unstructured magnitude pruning (Han et al., 2015, "Learning both Weights and Connections for
Efficient Neural Networks", arXiv:1506.02626), global or per layer, with optional short fine-tuning.

`scope=global`: all weight matrices and convolution kernels are ranked together by |W|; the smallest fraction
`sparsity` is set to zero:

    M_ij = 1[ |W_ij| > tau ],  tau = the `sparsity`-quantile of { |W| } over all pruned layers;  W <- M * W

`scope=layer`: the same rule with tau taken per weight matrix, over the Linear layers inside the transformer
blocks (attention projections and MLP; embeddings, LM head and classifier head stay dense), so every pruned
layer reaches exactly the requested sparsity: the magnitude baseline of the Wanda and SparseGPT papers, on the
same layers they prune. `scope=auto` (the default) is `global` on image classifiers (Han et al.'s setting; the
committed digits results) and `layer` on language models and text encoders.

Biases and normalisation parameters are left dense (they are a negligible share of the weights). Ties at the
threshold are broken by index so exactly round(sparsity * N) weights are removed. With `finetune_epochs` > 0
the pruned model is retrained on the task's training split with the mask re-applied after every step
(Han et al.'s prune-then-retrain), and the cost is recorded.

Unstructured zeros give no speedup on dense kernels: the record says `runtime_exploits_sparsity: false` and the
measured speedup shows it. `torch.nn.utils.prune` would do the masking, but it is unmaintained and
reparametrises the modules (weight_orig + mask) in a way that changes what is timed, so the mask is applied
to the weights directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import Augmentation, Student, TrainingSplit, offered_by, offers
from bench.registry import register_method


SCOPES = ("auto", "global", "layer")


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5  # share of prunable weights set to zero, over all layers together
    finetune_epochs: int = 0  # retraining epochs with the mask fixed; 0 = one-shot pruning
    finetune_lr: float = 5e-4  # Adam learning rate of the retraining (lower than training from scratch)
    scope: Literal["auto", "global", "layer"] = "auto"  # auto: global on image classifiers, layer on LMs/encoders

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigError(f"scope={self.scope!r} is not one of {', '.join(SCOPES)}")
        check_range("sparsity", self.sparsity, lo=0, hi=1, hi_open=True)
        check_range("finetune_epochs", self.finetune_epochs, lo=0)
        check_range("finetune_lr", self.finetune_lr, lo=0, lo_open=True)


def prunable(model):
    """The weight tensors of every Linear and Conv layer: what magnitude pruning ranks."""
    import torch.nn as nn

    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def global_magnitude_masks(weights, sparsity: float):
    """Boolean keep-masks with exactly round(sparsity * N) of the N weights (smallest |W|) removed."""
    import torch

    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights])
    n_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune > 0:
        # a stable sort breaks ties by position, so the count is exact and the choice deterministic
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    masks, start = [], 0
    for w in weights:
        masks.append(keep[start:start + w.numel()].view_as(w).to(w.device))
        start += w.numel()
    return masks


@register_method("magnitude", family="pruning", paper="Han et al., Learning both Weights and Connections for "
                 "Efficient Neural Networks", year=2015, url="https://arxiv.org/abs/1506.02626",
                 modalities=("image-classification", "causal-lm", "text-classification"),
                 summary="zero the smallest-|W| weights, globally or per layer; optionally retrain with the mask "
                         "fixed")
class MagnitudePruning(Method):
    Config = MagnitudeConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy
        import time

        import torch

        from baselines.pruning import _calib, _sparse
        from tasks._kit.classification import TrainRecipe, fit

        cfg = self.config
        scope = cfg.scope if cfg.scope != "auto" else ("global" if subject.kind == "image-classification"
                                                       else "layer")
        if cfg.finetune_epochs > 0 and not (offers(task, TrainingSplit) and offers(task, Student)
                                            and offers(task, Augmentation)):
            have = ", ".join(offered_by(TrainingSplit, Student, Augmentation))
            raise ConfigError(f"magnitude: finetune_epochs > 0 retrains on the task's classification training split "
                              f"(TrainingSplit, Student's recipe, Augmentation), which task {task.spec.name!r} "
                              f"does not offer (tasks that do: {have}): use finetune_epochs=0")
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.model).float()
        if scope == "global":
            weights = prunable(model)
            masks = global_magnitude_masks(weights, cfg.sparsity)
        else:
            linears = _calib.all_block_linears(_calib.hf_model(model))
            weights = [lin.weight for lin in linears]
            masks = [_sparse.lowest_k_mask(w.detach().abs().float(), int(round(cfg.sparsity * w.numel())))
                     for w in weights]

        def apply_masks() -> None:
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    w.mul_(m)

        apply_masks()
        cost = Cost(time.perf_counter() - t0, 0, 0, f"one-shot: rank and mask the weights ({scope})")
        if cfg.finetune_epochs > 0:
            recipe = TrainRecipe(cfg.finetune_epochs, cfg.finetune_lr, task.student_recipe.batch_size)
            stats = fit(model.to(ctx.device), task.training_split(), recipe, ctx, seed=ctx.seed,
                        description=f"Fine-tuning at {cfg.sparsity:.0%} sparsity (mask fixed)",
                        after_step=apply_masks, augment=task.augment)
            cost = Cost(cost.seconds + stats.seconds, stats.steps, stats.samples_seen,
                        f"mask, then {stats.steps} Adam steps of retraining with the mask re-applied")
        summary = None
        if scope == "layer":
            summary = _sparse.pruning_stats(_calib.hf_model(model), linears, "unstructured", cfg.sparsity)
        return Applied(task.prepare(model, ctx), cost, runtime_exploits_sparsity=False,
                       stats=(lambda: summary) if summary else None)
