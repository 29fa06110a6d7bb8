"""FID of 16x16 digits through torch-fidelity, with a digits classifier as the registered feature extractor.

Frechet distance between Gaussians fitted to two feature sets (Heusel et al., 2017, arXiv:1706.08500):

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

torch-fidelity computes it (`torch_fidelity.calculate_metrics(fid=True, feature_extractor=EXTRACTOR)`); its
Inception weights are a download, so the features here are those of a small CNN trained by the harness on the
digits' training split (`build_classifier`, `train_classifier`): the 64 pre-activation units of its penultimate
layer, registered with `torch_fidelity.register_feature_extractor` (`DigitsFeatures`). Images enter as uint8,
as torch-fidelity expects. `frechet_distance` is the same formula in numpy/scipy, used for the jackknife
pseudo-values that give FID an interval (`jackknife`), and by the tests as an independent check.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks._kit.classification import TrainRecipe

if TYPE_CHECKING:
    import numpy as np
    import torch

EXTRACTOR = "bench-digits16-classifier"
FEATURES = "penultimate"  # the 64 pre-ReLU units before the classifier's last layer
CLASSIFIER_RECIPE = TrainRecipe(epochs=30, lr=2e-3, batch_size=64)  # ~99% test top-1 in under a minute


def build_classifier():
    """~36k parameters; `[:-2]` of it is the feature map."""
    from torch import nn

    from tasks._kit.classification import seed_everything

    seed_everything(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 8 x 8
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_classifier(train, ctx) -> dict:
    from tasks._kit.classification import fit

    model = build_classifier()
    fit(model, train, CLASSIFIER_RECIPE, ctx, seed=0, description="Training the digits-gen feature classifier")
    return model.state_dict()


def uint8_to_input(x: "torch.Tensor") -> "torch.Tensor":
    """uint8 [0, 255] (N x 1 x 16 x 16, or N x 3 x ... grey replicated) -> float [-1, 1], one channel."""
    import torch

    return (x[:, :1].to(torch.float32) / 127.5) - 1.0


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatures(FeatureExtractorBase):
        """torch-fidelity feature extractor: the digits classifier's penultimate (pre-ReLU) features.
        `feature_extractor_weights_path` names the classifier's safetensors file (required)."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            from safetensors.torch import load_file

            if feature_extractor_weights_path is None:
                raise ValueError(f"{EXTRACTOR} needs feature_extractor_weights_path (the classifier's weights)")
            net = build_classifier()
            net.load_state_dict(load_file(str(feature_extractor_weights_path)))
            self.body = net[:-2]

        @staticmethod
        def get_provided_features_list():
            return (FEATURES,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return FEATURES

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            import torch

            return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            return (self.body(uint8_to_input(x)),)

    return DigitsFeatures


def register() -> None:
    """Register the extractor with torch-fidelity (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, _extractor_class())


def _dataset(images: "torch.Tensor"):
    from torch.utils.data import Dataset

    class Images(Dataset):
        def __len__(self):
            return images.shape[0]

        def __getitem__(self, i):
            return images[i]

    return Images()


def torch_fidelity_fid(images_1: "torch.Tensor", images_2: "torch.Tensor", weights: Path) -> float:
    """FID between two uint8 image sets (N x 1 x 16 x 16) by torch-fidelity with the registered extractor."""
    import torch_fidelity

    register()
    out = torch_fidelity.calculate_metrics(
        input1=_dataset(images_1), input2=_dataset(images_2), fid=True, feature_extractor=EXTRACTOR,
        feature_layer_fid=FEATURES, feature_extractor_weights_path=str(weights), cuda=False, cache=False,
        save_cpu_ram=True, verbose=False, batch_size=256)
    return float(out["frechet_inception_distance"])


def features(images: "torch.Tensor", weights: Path) -> "np.ndarray":
    """The extractor's features of uint8 images, float64, N x 64 (the same module torch-fidelity runs)."""
    import numpy as np
    import torch

    register()
    ext = _extractor_class()(EXTRACTOR, [FEATURES], feature_extractor_weights_path=str(weights)).eval()
    with torch.inference_mode():
        return np.concatenate([ext(images[i:i + 256])[0].double().numpy() for i in range(0, images.shape[0], 256)])


def gaussian(feats: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    import numpy as np

    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's matrix square root."""
    import numpy as np
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def leave_one_out(gen_feats: "np.ndarray", real_mu, real_s) -> "np.ndarray":
    """FID without image i, for every i: rank-one downdates of the mean and scatter, then one sqrtm each."""
    import numpy as np

    n = gen_feats.shape[0]
    mu = gen_feats.mean(axis=0)
    centred = gen_feats - mu
    scatter = centred.T @ centred
    loo = np.empty(n)
    for i in range(n):
        mu_i = (n * mu - gen_feats[i]) / (n - 1)
        sc_i = scatter - np.outer(centred[i], centred[i]) * n / (n - 1)
        loo[i] = frechet_distance(mu_i, sc_i / (n - 2), real_mu, real_s)
    return loo


def jackknife(gen_feats: "np.ndarray", real_mu, real_s, value: float) -> "np.ndarray":
    """Per-image jackknife pseudo-values of FID over the generated set, shifted to average exactly `value`.

    p_i = n F - (n - 1) F_{-i}; their spread / sqrt(n) is the jackknife standard error of F, so a bootstrap of
    their mean gives an interval of FID, and pairing image i of two runs (same noise, same label) gives a
    paired interval of the difference.
    """
    n = gen_feats.shape[0]
    full = frechet_distance(*gaussian(gen_feats), real_mu, real_s)
    pseudo = n * full - (n - 1) * leave_one_out(gen_feats, real_mu, real_s)
    return pseudo - pseudo.mean() + value
