"""The network and the loss of `byot` (see `baselines.distillation.byot` for the method and its equations).

- `ExitNetwork`: the task's reference architecture (its own module, unchanged) with a shallow classifier after
  every backbone section but the last; `forward_all` returns every classifier's logits and features.
- `EarlyExit`: one classifier with the sections before it, the network that runs alone at inference.
- `Recording`: what `tasks._kit.classification.fit` trains (it returns the deepest logits and keeps the rest).
- `byot_loss`: the paper's loss over all classifiers.

A private module (registry discovery skips `_*` modules; `byot` imports it inside `apply`), so torch is imported
at module scope here.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def sep_conv(c_in: int, c_out: int, stride: int):
    """The authors' `SepConv` (their released resnet.py): two depthwise-separable 3x3 convolutions, the first
    with `stride`, each followed by batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU())


def bottleneck(shape_in: tuple[int, int, int], shape_out: tuple[int, int, int]):
    """From a section's feature map (C, H, W) to the deepest classifier's input shape: one stride-2 `sep_conv` per
    halving of the height (channels growing geometrically to the target's, as the authors double them per
    stage), one stride-1 `sep_conv` when nothing halves, and an adaptive average pool if the sizes are not a
    power of two apart."""
    (c_in, h_in, w_in), (c_out, h_out, w_out) = shape_in, shape_out
    halvings = max(0, int(math.floor(math.log2(max(h_in, 1) / max(h_out, 1)))))
    layers, c, h, w = [], c_in, h_in, w_in
    for k in range(1, halvings + 1):
        nxt = c_out if k == halvings else max(1, round(c_in * (c_out / c_in) ** (k / halvings)))
        layers.append(sep_conv(c, nxt, 2))
        c, h, w = nxt, (h + 1) // 2, (w + 1) // 2
    if not layers:
        layers.append(sep_conv(c, c_out, 1))
    if (h, w) != (h_out, w_out):
        layers.append(nn.AdaptiveAvgPool2d((h_out, w_out)))
    return nn.Sequential(*layers)


def fresh_copy(module):
    """A copy of `module` with every parameter initialised again (each submodule's `reset_parameters`)."""
    new = copy.deepcopy(module)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return new


class ExitNetwork(nn.Module):
    """The reference module (`backbone`, its state dict keys unchanged) with `bottlenecks[i]` and `heads[i]` after
    backbone section i, for every section but the last; the deepest classifier is the reference's own head.
    `sections` are views of `backbone`, held in a plain list so they are no second copy of its parameters in the
    state dict."""

    def __init__(self, backbone, sections, bottlenecks, heads, detach_exits: bool = False):
        super().__init__()
        self.backbone = backbone
        self.sections = list(sections)
        self.bottlenecks = nn.ModuleList(bottlenecks)
        self.heads = nn.ModuleList(heads)
        self.detach_exits = detach_exits  # True: the shallow classifiers read detached features (probes)

    @property
    def n_exits(self) -> int:
        return len(self.heads) + 1

    def forward_all(self, x):
        """([logits of exit 0, ..., deepest], [features F_0, ..., F_C]): F_i is shallow classifier i's bottleneck
        output, F_C the last backbone section's output (what the reference's head reads)."""
        logits, feats, h = [], [], x
        for i, section in enumerate(self.sections[:-1]):
            h = section(h)
            if i < len(self.heads):
                f = self.bottlenecks[i](h.detach() if self.detach_exits else h)
                feats.append(f)
                logits.append(self.heads[i](f))
        feats.append(h)
        logits.append(self.sections[-1](h))
        return logits, feats

    def forward(self, x):
        return self.backbone(x)

    def exit_model(self, k: int):
        """Exit k (0 = shallowest; n_exits - 1, or -1, = deepest) as a network of its own, made of this one's
        modules: the deepest is the backbone itself, a shallow one an `EarlyExit`."""
        k = k % self.n_exits
        if k == self.n_exits - 1:
            return self.backbone
        return EarlyExit(self.sections[:k + 1], self.bottlenecks[k], self.heads[k])


class EarlyExit(nn.Module):
    """Sections 0..k of the backbone, then exit k's bottleneck and head: what runs at inference."""

    def __init__(self, sections, bottleneck, head):
        super().__init__()
        self.sections = nn.ModuleList(sections)
        self.bottleneck = bottleneck
        self.head = head

    def forward(self, x):
        for section in self.sections:
            x = section(x)
        return self.head(self.bottleneck(x))


class Recording(nn.Module):
    """`fit` calls `model(x)` and hands the logits to its loss: this wrapper returns the deepest logits and keeps
    every classifier's outputs (`outputs`) for the loss to read."""

    def __init__(self, net: ExitNetwork):
        super().__init__()
        self.net = net
        self.outputs = None

    def forward(self, x):
        self.outputs = self.net.forward_all(x)
        return self.outputs[0][-1]


def exit_network(backbone, sections, sample: torch.Tensor, detach_exits: bool = False) -> ExitNetwork:
    """An `ExitNetwork` around `backbone`: a classifier after every backbone section but the last, each a
    `bottleneck` to the last section's output shape and a fresh copy of the reference's head. Shapes come from
    one forward of `sample` (a batch of one input) in eval mode, without gradients, so nothing (batch-norm
    statistics) changes. The new modules draw their initial weights from torch's global generator after
    `backbone`'s, so `backbone` starts as a plain build of the same seed would."""
    was_training = backbone.training
    backbone.eval()
    shapes, h = [], sample
    with torch.no_grad():
        for section in sections[:-1]:
            h = section(h)
            if h.dim() != 4:
                raise ValueError(f"a backbone section must output N x C x H x W feature maps; one gave "
                                 f"{tuple(h.shape)}")
            shapes.append(tuple(h.shape[1:]))
    backbone.train(was_training)
    if len(shapes) < 2:
        raise ValueError(f"the reference has {len(shapes)} backbone section(s): self-distillation needs two or more")
    last = shapes[-1]
    bottlenecks = [bottleneck(s, last) for s in shapes[:-1]]
    heads = [fresh_copy(sections[-1]) for _ in shapes[:-1]]
    return ExitNetwork(backbone, sections, bottlenecks, heads, detach_exits)


def byot_loss(logits: list, feats: list, labels, alpha: float, lam: float, temperature: float):
    """L = sum_i [(1 - alpha) CE(q_i, y) + alpha KL(q_C^T || q_i^T) + lam ||F_i - F_C||^2], batch-mean.

    The deepest classifier (the last entry) is the teacher: its logits and features enter the other terms
    detached, and its own KL and hint terms are zero (it only has (1 - alpha) CE). ||.||^2 is the squared L2
    distance per example over every feature element. A term whose weight is 0 is not computed at all, so
    alpha = lam = 0 is exactly sum_i CE(q_i, y)."""
    teacher = logits[-1].detach()
    target = feats[-1].detach()
    total = None
    for i, (z, f) in enumerate(zip(logits, feats)):
        term = (1 - alpha) * F.cross_entropy(z, labels) if alpha else F.cross_entropy(z, labels)
        if i < len(logits) - 1:
            if alpha:
                t = temperature
                term = term + alpha * F.kl_div(F.log_softmax(z / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                                               reduction="batchmean", log_target=True)
            if lam:
                term = term + lam * (f - target).pow(2).flatten(1).sum(1).mean()
        total = term if total is None else total + term
    return total
