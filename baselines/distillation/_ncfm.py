"""The discrepancy, the sampling network and the synthesis loop of `ncfm` (see `baselines.distillation.ncfm` for
the method and its equations).

- `characteristic_function`: the empirical CF of a feature set at frequencies t (real and imaginary parts).
- `cf_discrepancy`: the paper's amplitude/phase CF discrepancy, averaged over the frequencies drawn.
- `SamplingNet`: the max player, a small MLP that turns Gaussian noise into frequencies t.
- `FeatureNet`: the reference architecture's backbone (its `Sections` but the head), L2-normalised features.
- `synthesise`: the min-max loop over the synthetic images and the sampling network.

A private module (registry discovery skips `_*` modules; `ncfm` imports it inside `apply`), so torch is imported
at module scope here.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_FLAT = 2048  # features wider than this are average-pooled over space (the paper's ConvNet-3: 128 x 4 x 4)


def characteristic_function(feat: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re, Im) of the empirical CF Phi(t) = (1/N) sum_j exp(i <t, f_j>) at each row of `t` (M x D), for features
    `feat` (N x D): two vectors of M."""
    proj = t @ feat.t()  # M x N: <t_m, f_j>
    return proj.cos().mean(1), proj.sin().mean(1)


def cf_discrepancy(real: torch.Tensor, syn: torch.Tensor, t: torch.Tensor, alpha: float,
                   eps: float = 1e-12) -> torch.Tensor:
    """C(real, syn) = mean_m sqrt( alpha (|Phi_r(t_m)| - |Phi_s(t_m)|)^2
                                   + (1 - alpha) 2 |Phi_r(t_m)| |Phi_s(t_m)| (1 - cos(theta_r(t_m) - theta_s(t_m))) ).

    The phase term is computed without angles: |a||b| cos(theta_a - theta_b) = Re(a) Re(b) + Im(a) Im(b) (it is
    >= 0 and clamped there against rounding). `eps` keeps the square roots' gradients finite where a CF's modulus
    or the whole term is 0: identical feature sets give sqrt(eps)-sized values, not exactly 0, unless eps = 0."""
    re_r, im_r = characteristic_function(real, t)
    re_s, im_s = characteristic_function(syn, t)
    mod_r = torch.sqrt(re_r * re_r + im_r * im_r + eps)
    mod_s = torch.sqrt(re_s * re_s + im_s * im_s + eps)
    amplitude = (mod_r - mod_s) ** 2
    phase = (2 * (mod_r * mod_s - re_r * re_s - im_r * im_s)).clamp_min(0)
    return torch.sqrt((alpha * amplitude + (1 - alpha) * phase).clamp_min(eps)).mean()


class SamplingNet(nn.Module):
    """The max player: Gaussian noise z (n x D) -> frequencies t (n x D) through three Linear + BatchNorm layers,
    LeakyReLU(0.2) after the first two and tanh after the last (the authors' SampleNet)."""

    def __init__(self, dim: int, n_freqs: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(0.2) if i < 2 else nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.dim, self.n_freqs = dim, n_freqs

    def forward(self, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.n_freqs, self.dim, generator=gen).to(next(self.parameters()).device)
        return self.net(z)


class FeatureNet(nn.Module):
    """The task's reference architecture up to its head (`Sections` but the last), flattened and L2-normalised;
    maps wider than `MAX_FLAT` values are average-pooled over space first (CIFAR ResNet's 512 x 4 x 4 -> 512)."""

    def __init__(self, model: nn.Module, sections: list):
        super().__init__()
        self.model = model  # owns the parameters; `sections` are views of it
        self.backbone = list(sections[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for s in self.backbone:
            h = s(h)
        if h.dim() == 4 and h[0].numel() > MAX_FLAT:
            h = h.mean(dim=(2, 3))
        return F.normalize(h.flatten(1), dim=1)


@dataclass
class Synthesis:
    x: torch.Tensor  # the synthetic images, class-major: ipc rows of class 0, then class 1, ...
    y: torch.Tensor
    init: torch.Tensor  # the real images they started from (the random-real control's set)
    steps: int
    seconds: float
    losses: list[float]  # the summed discrepancy at every iteration (the min player's objective)


def class_rows(labels: torch.Tensor, n_classes: int) -> list[torch.Tensor]:
    rows = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    empty = [c for c, r in enumerate(rows) if r.numel() == 0]
    if empty:
        raise ValueError(f"class(es) {empty} have no training rows: a synthetic set of every class cannot be "
                         f"initialised or matched")
    return rows


def initial_rows(labels: torch.Tensor, n_classes: int, ipc: int, gen: torch.Generator) -> torch.Tensor:
    """`ipc` row indices per class, class-major, drawn at random without replacement (with replacement only for a
    class that has fewer than `ipc` rows)."""
    chosen = []
    for rows in class_rows(labels, n_classes):
        if rows.numel() >= ipc:
            chosen.append(rows[torch.randperm(rows.numel(), generator=gen)[:ipc]])
        else:
            chosen.append(rows[torch.randint(0, rows.numel(), (ipc,), generator=gen)])
    return torch.cat(chosen)


def synthesise(nets: list[FeatureNet], x: torch.Tensor, y: torch.Tensor, n_classes: int, ipc: int, *,
               iterations: int, alpha: float, n_freqs: int, lr_images: float, lr_sampler: float,
               real_batch: int, model_interval: int, seed: int, augment=None, progress=None,
               device: str = "cpu") -> Synthesis:
    """min over the synthetic images, max over the sampling network, of sum_c C(f(real_c), f(syn_c)) (see the
    method's docstring), by simultaneous gradient steps: one backward per iteration, Adam descent on the images
    and Adam ascent on the sampling network. The feature network cycles through `nets`, `model_interval`
    iterations each; real images are `real_batch` per class, drawn afresh each iteration."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = x.to(device), y.to(device)
    rows = class_rows(y.cpu(), n_classes)
    init_idx = initial_rows(y.cpu(), n_classes, ipc, gen)
    init = x[init_idx.to(device)].detach().clone()
    syn = init.clone().requires_grad_(True)
    syn_y = torch.arange(n_classes, device=device).repeat_interleave(ipc)
    dim = nets[0](x[:1]).shape[1]
    sampler = SamplingNet(dim, n_freqs).to(device)
    opt_img = torch.optim.Adam([syn], lr=lr_images)
    opt_t = torch.optim.Adam(sampler.parameters(), lr=lr_sampler)
    losses: list[float] = []
    t0 = time.perf_counter()
    steps = progress.step(f"Synthesising {ipc} image(s) per class (NCFM min-max)", total=iterations) \
        if progress is not None else nullcontext(lambda n: None)
    with steps as advance:
        for it in range(iterations):
            net = nets[(it // max(1, model_interval)) % len(nets)]
            t = sampler(gen)
            loss = syn.new_zeros(())
            for c in range(n_classes):
                r = rows[c]
                pick = r[torch.randperm(r.numel(), generator=gen)[:real_batch]].to(device)
                real = x[pick]
                fake = syn[c * ipc:(c + 1) * ipc]
                if augment is not None:
                    real, fake = augment(real, gen), augment(fake, gen)
                with torch.no_grad():
                    f_real = net(real)
                loss = loss + cf_discrepancy(f_real, net(fake), t, alpha)
            opt_img.zero_grad(set_to_none=True)
            opt_t.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()  # the min player: descend on the images
            for p in sampler.parameters():  # the max player: ascend on the sampling network
                if p.grad is not None:
                    p.grad.neg_()
            opt_t.step()
            losses.append(float(loss.detach()))
            advance(1)
    return Synthesis(syn.detach(), syn_y, init, iterations, time.perf_counter() - t0, losses)
