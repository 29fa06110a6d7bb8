"""FID of generated images against reference statistics, through torch-fidelity, with per-image intervals
(the full image-generation tasks `coco` and `imagenet-fid`).

FID (Heusel et al., 2017, arXiv:1706.08500) between Gaussians fitted to the features of two image sets:

    FID = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2})

Features: torch-fidelity's feature extractors, by name. The default is `inception-v3-compat`, layer `2048`
(torch-fidelity's port of the TensorFlow Inception that the original FID code and ADM's / DiT's evaluation
suite use, so its statistics are comparable with theirs). `BENCH_FID_EXTRACTOR` and `BENCH_FID_FEATURE_LAYER`
name another registered extractor and layer (the tests register a tiny one, Inception's weights being a
download); `BENCH_FID_WEIGHTS` is a local weights file for it (torch-fidelity's
`feature_extractor_weights_path`; unset, torch-fidelity downloads Inception's weights on first use).

Nothing is unpickled: torch-fidelity loads weights with `torch.load(..., weights_only=False)` (and its download
through `torch.hub.load_state_dict_from_url`, whose default is the same), so a weights file or a download whose
pickle names a function would run it. `create_extractor` builds the extractor with `torch.load` reading tensors
only (`weights_only=True`, whatever torch-fidelity asks) or a safetensors file, and a file that holds anything
else is refused (`UnsafeWeights`), naming the way out: save the state dict as safetensors. The extractors whose
weights are code (`clip-*`: TorchScript archives; `dinov2-*`: a hub repository's code) are refused likewise.
`BENCH_FID_UNSAFE_LOAD=1` is the explicit opt-in to load either as torch-fidelity does, for files and downloads
you trust.

torch-fidelity's `calculate_metrics` takes two image inputs and returns one number. The tasks need the
generated images' features once more, for a per-image interval, and the reference side is often given as
statistics only (ADM's ImageNet reference batch), which torch-fidelity 0.4.0 cannot take as an input. So the
same library is used a level lower: `create_feature_extractor` and the extractor's forward for the features,
`fid_features_to_statistics` for (mu, S) and `fid_statistics_to_metric` for the distance: the numbers are
torch-fidelity's.

Interval: FID is not a mean over images, so the per-image scores the runner bootstraps are pseudo-values of
the infinitesimal jackknife (Jaeckel, 1972; Efron, 1982, ch. 6): p_i = FID + IF_i, with IF_i the influence of
generated image i (features x_i) on FID,

    IF_i = 2 (mu_g - mu_r)^T (x_i - mu_g) + (x_i - mu_g)^T G (x_i - mu_g) - Tr(G S_g),
    G = I - A (A S_g A)^{-1/2} A,   A = S_r^{1/2}

(the derivative of FID in mu_g and S_g, applied to each image's influence on the mean and the covariance;
the inverse square root is taken on the range of A S_g A, where every image's influence lies). It costs one
eigendecomposition and one matrix product, where the exact leave-one-out jackknife of `tasks._kit.fid.jackknife`
would need one matrix square root per image (50,000 of size 2048 for FID-50k); the tests check that both give
the same pseudo-values on small feature sets. Images generated from the same noise and conditioning are paired
by index, so the runner's paired interval of the FID difference is meaningful.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import numpy as np
    import torch

EXTRACTOR_ENV, LAYER_ENV, WEIGHTS_ENV = "BENCH_FID_EXTRACTOR", "BENCH_FID_FEATURE_LAYER", "BENCH_FID_WEIGHTS"
UNSAFE_ENV = "BENCH_FID_UNSAFE_LOAD"  # =1: let torch-fidelity unpickle weights / load code (trusted files only)
CODE_EXTRACTORS = ("clip-", "dinov2-")  # torch-fidelity extractors whose weights are code (TorchScript, hub repo)
DEFAULT_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's TF-compatible Inception (the FID standard)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class StatisticsError(ValueError):
    """Reference statistics that cannot be compared with the configured features."""


class UnsafeWeights(ValueError):
    """Feature-extractor weights that only unpickling (running code from the file) could load."""


def unsafe_load_allowed() -> bool:
    return os.environ.get(UNSAFE_ENV, "").strip() == "1"


@dataclass(frozen=True)
class FidConfig:
    extractor: str  # a torch-fidelity feature extractor name
    layer: str  # its feature layer used for FID
    weights: str | None  # local weights file (torch-fidelity's feature_extractor_weights_path), or None

    def describe(self) -> str:
        return f"{self.extractor}/{self.layer}" + (f" ({self.weights})" if self.weights else "")

    def identity(self) -> str:
        """What the features depend on, wherever the weights file lies: name, layer and the weights' sha256."""
        from bench import cache

        weights = cache.sha256_file(Path(self.weights)) if self.weights else "library default"
        return f"{self.extractor}/{self.layer}, weights {weights}"


def fid_config() -> FidConfig:
    """The feature extractor configured by the environment, checked against torch-fidelity's registry."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name = os.environ.get(EXTRACTOR_ENV, "").strip() or DEFAULT_EXTRACTOR
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"{EXTRACTOR_ENV}={name}: not a torch-fidelity feature extractor; registered: "
                         f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    if name.startswith(CODE_EXTRACTORS) and not unsafe_load_allowed():
        raise UnsafeWeights(f"{EXTRACTOR_ENV}={name}: its weights are code (a TorchScript archive, or a hub "
                            f"repository's Python), which runs when loaded; use {DEFAULT_EXTRACTOR} (the FID "
                            f"standard) or vgg16, or set {UNSAFE_ENV}=1 to load it anyway (a download you trust)")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layer = os.environ.get(LAYER_ENV, "").strip() or cls.get_default_feature_layer_for_metric("fid")
    if layer not in cls.get_provided_features_list():
        layers = ", ".join(cls.get_provided_features_list())
        raise ValueError(f"{LAYER_ENV}={layer}: {name} provides the layers {layers}")
    weights = os.environ.get(WEIGHTS_ENV, "").strip() or None
    if weights is not None and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"{WEIGHTS_ENV}={weights}: no such file (a weights file for {name}, e.g. torch-"
                                f"fidelity's weights-inception-2015-12-05-6726825d.pth)")
    return FidConfig(name, layer, str(Path(weights).expanduser().resolve()) if weights else None)


def _is_safetensors(f) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header, a JSON object."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except (OSError, TypeError):
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


@contextmanager
def tensors_only_loading():
    """While open, `torch.load` (which torch-fidelity and `torch.hub.load_state_dict_from_url` call) reads a
    safetensors file, or a torch file with `weights_only=True` whatever its caller asked: tensors and plain
    containers, never an object whose unpickling would run code. torch.load is swapped process-wide for the
    extractor's construction only."""
    import torch

    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        if _is_safetensors(f):
            from safetensors.torch import load_file

            return load_file(str(f))
        return original(f, map_location=map_location, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def create_extractor(cfg: FidConfig, device: str):
    """torch-fidelity's extractor module, on `device`, in eval mode; its weights loaded as tensors only (see the
    module docstring), unless `BENCH_FID_UNSAFE_LOAD=1`."""
    import pickle

    from torch_fidelity.utils import create_feature_extractor

    kwargs = {"feature_extractor_weights_path": cfg.weights} if cfg.weights else {}
    if unsafe_load_allowed():
        return create_feature_extractor(cfg.extractor, [cfg.layer], cuda=device == "cuda", verbose=False, **kwargs)
    try:
        with tensors_only_loading():
            return create_feature_extractor(cfg.extractor, [cfg.layer], cuda=device == "cuda", verbose=False,
                                            **kwargs)
    except pickle.UnpicklingError as e:
        where = f"{WEIGHTS_ENV}={cfg.weights}" if cfg.weights else f"the weights {cfg.extractor} downloads"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeWeights(
            f"{where}: not plain tensors, and loading them would run code from the file ({first}). Save the state "
            f"dict as safetensors (safetensors.torch.save_file(state_dict, path), where you trust the file) and "
            f"point {WEIGHTS_ENV} at it, or set {UNSAFE_ENV}=1 to unpickle it anyway") from None


def extract(extractor, images: "torch.Tensor", layer: str) -> "np.ndarray":
    """Features (float64, N x d) of uint8 images (N x 3 x H x W) on the extractor's device."""
    import torch

    device = next(iter(extractor.parameters()), torch.empty(0)).device
    with torch.no_grad():
        feats = extractor.convert_features_tuple_to_dict(extractor(images.to(device)))[layer]
    return feats.detach().to("cpu", torch.float64).numpy()


def statistics(feats: "np.ndarray") -> dict:
    """torch-fidelity's (mu, sigma) of features, in float64."""
    import numpy as np
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.asarray(feats, dtype=np.float64)))


def fid_value(gen: dict, ref: dict) -> float:
    """torch-fidelity's Frechet distance between two statistics dicts (mu, sigma)."""
    import numpy as np
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def f64(s):
        return {"mu": np.asarray(s["mu"], dtype=np.float64), "sigma": np.asarray(s["sigma"], dtype=np.float64)}

    gen, ref = f64(gen), f64(ref)
    if gen["mu"].shape != ref["mu"].shape or ref["sigma"].shape != (ref["mu"].shape[0],) * 2:
        raise StatisticsError(f"the reference statistics have mu {ref['mu'].shape} and sigma {ref['sigma'].shape}; "
                              f"the generated images' features have {gen['mu'].shape[0]} dimensions (the reference "
                              f"must be computed with the same feature extractor and layer)")
    return float(fid_statistics_to_metric(gen, ref, verbose=False)[KEY_METRIC_FID])


def pseudo_values(feats: "np.ndarray", ref: dict, value: float, chunk: int = 4096) -> "np.ndarray":
    """Infinitesimal-jackknife pseudo-values of FID per generated image, averaging exactly `value`."""
    import numpy as np

    x = np.asarray(feats, dtype=np.float64)
    n, d = x.shape
    mu = x.mean(axis=0)
    xc = x - mu
    s = xc.T @ xc / max(n - 1, 1)
    w, v = np.linalg.eigh(np.asarray(ref["sigma"], dtype=np.float64))
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    wm, vm = np.linalg.eigh((a @ s @ a + (a @ s @ a).T) / 2)
    keep = wm > max(wm.max(initial=0.0), 0.0) * 1e-12
    inv_sqrt = np.zeros_like(wm)
    inv_sqrt[keep] = 1 / np.sqrt(wm[keep])
    g = np.eye(d) - a @ ((vm * inv_sqrt) @ vm.T) @ a
    lin = 2 * xc @ (mu - np.asarray(ref["mu"], dtype=np.float64))
    quad = np.concatenate([np.einsum("ij,ij->i", xc[i:i + chunk] @ g, xc[i:i + chunk]) for i in range(0, n, chunk)])
    influence = lin + quad - np.trace(g @ s)
    return value + influence - influence.mean()


def load_statistics(path: Path, what: str) -> dict:
    """(mu, sigma) from an .npz with keys `mu` and `sigma` (ADM's reference batches have them too)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:  # an object array would be a pickle: refused
            if "mu" not in z.files or "sigma" not in z.files:
                raise StatisticsError(f"{what} {path} has the arrays {', '.join(z.files)}; it needs `mu` (d) and "
                                      f"`sigma` (d x d), as ADM's reference batches and torch-fidelity's statistics")
            return {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
    except (OSError, ValueError) as e:
        if isinstance(e, StatisticsError):
            raise
        raise StatisticsError(f"{what} {path} is not a readable .npz file: {e}") from e


def save_statistics(path: Path, stats: dict) -> None:
    """Write (mu, sigma) atomically (temporary file, then rename)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"])
    os.replace(tmp, path)


def stats_digest(stats: dict) -> str:
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for k in ("mu", "sigma"):
        a = np.ascontiguousarray(np.asarray(stats[k], dtype=np.float64))
        h.update(f"{k}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_image(path: Path, resolution: int) -> "torch.Tensor":
    """A real image as the generated ones are compared: RGB, shorter side resized to `resolution` (bicubic,
    antialiased), centre-cropped square; uint8 3 x R x R."""
    from PIL import Image
    from torchvision.transforms import v2

    with Image.open(path) as im:
        im = im.convert("RGB")
        t = v2.Compose([v2.PILToTensor(), v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC,
                                                    antialias=True), v2.CenterCrop(resolution)])
        return t(im)


def image_statistics(paths: list[Path], resolution: int, cfg: FidConfig, device: str, batch: int,
                     cache_path: Path, progress, description: str) -> dict:
    """Statistics of real images' features, cached at `cache_path` (an .npz) once computed."""
    if cache_path.is_file():
        return load_statistics(cache_path, "cached statistics")
    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return load_image(paths[i], resolution)

    workers = 0 if device == "cpu" else min(8, os.cpu_count() or 1)
    extractor, feats = create_extractor(cfg, device), []
    with progress.step(description, total=len(paths)) as advance:
        for images in DataLoader(Images(), batch_size=batch, num_workers=workers):
            feats.append(extract(extractor, images, cfg.layer))
            advance(images.shape[0])
    stats = statistics(np.concatenate(feats))
    save_statistics(cache_path, stats)
    return stats


def find_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, at any depth, sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda p: p.relative_to(folder).as_posix())


def listing_digest(folder: Path, paths: Iterable[Path]) -> str:
    """sha256 of the relative paths and sizes (the content is covered by the statistics' own digest)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(folder).as_posix()}|{p.stat().st_size}\n".encode())
    return h.hexdigest()


def per_image_noise(indices: Iterable[int], shape: tuple[int, ...], seed: int) -> "torch.Tensor":
    """Initial noise of each image from its own generator, seeded by (seed, index): image i gets the same noise
    whatever the batch it is generated in (float32, CPU; len(indices) x shape)."""
    import numpy as np
    import torch

    out = []
    for i in indices:
        s = int(np.random.SeedSequence([seed, int(i)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        out.append(torch.randn(shape, generator=torch.Generator().manual_seed(s)))
    return torch.stack(out)
