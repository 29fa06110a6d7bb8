"""No loader unpickles what a user or a download controls (issue 18, case 2).

With `torch.load` failing unless `weights_only=True`, `pickle.load` / `pickle.loads` failing, `pickle.Unpickler`
failing unless a subclass restricts `find_class`, `numpy.load(allow_pickle=True)` and `torch.jit.load` failing,
every task loads its data, its reference (and draft, FID extractor, CLIP-score model where it has them) from
small fixture files in the real formats. Then hostile files, whose pickles run a shell command when unpickled,
are handed to the paths that used to unpickle them (a `BENCH_FID_WEIGHTS` file, torch-fidelity's download
cache, a CIFAR-10 batch), with the guards off: each is refused by name and the command never runs.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from bench.registry import get_task_spec
from tasks.base import RunContext

sys.path.insert(0, str(Path(__file__).parent))  # for the fixture writers, under --import-mode=importlib too

import latent_fixtures  # noqa: E402


def context() -> RunContext:
    profile = load_profile("cpu")  # its table has no evaluation size for the full image-generation tasks
    profile = profile.model_copy(update={"eval_size": {**profile.eval_size, "coco": 4, "imagenet-fid": 4}})
    return RunContext(profile=profile, seed=0, progress=Reporter(), batch_size=2, budget="smoke")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Install the guards; yield the list of refused calls (a loader may catch the AssertionError) and of the
    files torch.load read with weights_only=True."""
    refused: list[str] = []
    refused_and_read = (refused, [])
    real_torch_load, real_np_load, Original = torch.load, np.load, pickle.Unpickler

    def torch_load(f, *args, weights_only=None, **kwargs):
        if weights_only is not True:
            refused.append(f"torch.load({f!r}, weights_only={weights_only!r})")
            raise AssertionError(f"torch.load({f!r}) without weights_only=True: it unpickles")
        refused_and_read[1].append(Path(f).name if isinstance(f, (str, os.PathLike)) else repr(f))
        return real_torch_load(f, *args, weights_only=True, **kwargs)

    def np_load(*args, allow_pickle=False, **kwargs):
        if allow_pickle:
            refused.append(f"numpy.load({args[0]!r}, allow_pickle=True)")
            raise AssertionError("numpy.load(allow_pickle=True): it unpickles")
        return real_np_load(*args, allow_pickle=False, **kwargs)

    def refuse(name):
        def call(*args, **kwargs):
            refused.append(name)
            raise AssertionError(f"{name}: it unpickles")
        return call

    class Unpickler(Original):
        def __init__(self, *args, **kwargs):
            if type(self).find_class is Original.find_class:
                refused.append("pickle.Unpickler")
                raise AssertionError("an unrestricted pickle.Unpickler")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(np, "load", np_load)
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    monkeypatch.setattr(torch.jit, "load", refuse("torch.jit.load"))
    yield refused_and_read
    assert not refused, f"unpickling on a loader's path: {refused}"


def load_all(name: str, draft: bool = False):
    ctx = context()
    task = get_task_spec(name).cls()
    task.load(ctx)
    subject = task.subject_from_state(task.reference_weights(ctx).state, ctx)
    if draft:
        task.draft_subject(ctx)
    return task, subject, ctx


# ---- every task's loaders, guarded ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, draft", [("digits", False), ("digits-gen", False), ("digits-gen-dit", False),
                                         ("arith", True), ("arith-nli", False), ("digits-vlm", False)])
def test_embedded_tasks_load_without_unpickling(no_unpickling, name, draft):
    task, _, ctx = load_all(name, draft)
    if name.startswith("digits-gen"):
        from tasks._kit import fid

        fid.features(task.real_images()[:4], task.classifier_path(ctx))  # the FID extractor's weights


def test_full_language_tasks_load_without_unpickling(tmp_path, no_unpickling):
    from full_fixtures import full_task_env

    with full_task_env(tmp_path, separate_draft=True):
        load_all("gsm8k", draft=True)
        load_all("glue-sst2")
        load_all("glue-mnli")


def test_a_pytorch_bin_checkpoint_loads_with_weights_only(tmp_path, no_unpickling):
    """A hub folder with only pytorch_model.bin (a pickle) is read by transformers with weights_only=True."""
    from full_fixtures import full_task_env
    from transformers import AutoModelForCausalLM

    with full_task_env(tmp_path, separate_draft=False):
        folder = tmp_path / "reference"
        state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        torch.save({k: v.clone() for k, v in state.items()}, folder / "pytorch_model.bin")  # the pre-safetensors format
        (folder / "model.safetensors").unlink()
        load_all("gsm8k")
    assert "pytorch_model.bin" in no_unpickling[1], no_unpickling[1]


def test_cifar10_loads_without_unpickling(cifar10_env, no_unpickling):
    fixture = cifar10_env
    task = get_task_spec("cifar10").cls()
    task.load(context())
    assert task.train.x.shape == (20, 3, 32, 32) and task.classes == fixture.label_names
    assert torch.equal(task.test.y, torch.as_tensor(fixture.test_labels))


@pytest.fixture(scope="module")
def latent_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    stats = root / "ref.npz"
    x = np.random.default_rng(0).normal(0.4, 0.1, size=(60, 24))
    np.savez(stats, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    return {"data": latent_fixtures.write_coco(root / "data"), "sd": latent_fixtures.save_tiny_sd(root / "sd"),
            "clip": latent_fixtures.save_tiny_clip(root / "clip"), "dit": latent_fixtures.save_tiny_dit(root / "dit"),
            "stats": stats}


def test_latent_diffusion_tasks_load_without_unpickling(latent_files, monkeypatch, no_unpickling):
    from tasks import coco, imagenet_fid
    from tasks._kit import fid_stats

    latent_fixtures.register_extractor()
    for var, value in ((coco.DATA_ENV, latent_files["data"]), (coco.REFERENCE_ENV, latent_files["sd"]),
                       (coco.CLIP_ENV, latent_files["clip"]), (imagenet_fid.REFERENCE_ENV, latent_files["dit"]),
                       (imagenet_fid.STATS_ENV, latent_files["stats"]),
                       (fid_stats.EXTRACTOR_ENV, latent_fixtures.EXTRACTOR)):
        monkeypatch.setenv(var, str(value))
    for var in (coco.SPLIT_ENV, imagenet_fid.VAL_ENV, fid_stats.LAYER_ENV, fid_stats.WEIGHTS_ENV):
        monkeypatch.delenv(var, raising=False)
    task, _, ctx = load_all("coco")
    task.begin_metrics(ctx)  # the CLIP-score model
    fid_stats.create_extractor(task.fid, "cpu")
    load_all("imagenet-fid")


# ---- hostile files: refused, and nothing in them runs -------------------------------------------------------------

class Payload:
    """Unpickled, it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_weights(path: Path, marker: Path) -> Path:
    torch.save({"fc.weight": torch.zeros(2, 2), "x": Payload(marker)}, path)
    return path


class PickledWeights:
    """A torch-fidelity-style extractor that loads its weights as torch-fidelity does (weights_only=False)."""

    def __new__(cls):
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase

        class Extractor(FeatureExtractorBase):
            def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
                super().__init__(name, features_list)
                self.fc = torch.nn.Linear(2, 2)
                self.fc.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=False))

            @staticmethod
            def get_provided_features_list():
                return ("fc",)

            @staticmethod
            def get_default_feature_layer_for_metric(metric):
                return "fc"

            @staticmethod
            def can_be_compiled():
                return False

            def forward(self, x):
                return (self.fc(x),)

        return Extractor


@pytest.fixture
def pickled_extractor(monkeypatch):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    from tasks._kit import fid_stats

    if "bench-test-pickled" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("bench-test-pickled", PickledWeights())
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, "bench-test-pickled")
    monkeypatch.delenv(fid_stats.LAYER_ENV, raising=False)
    monkeypatch.delenv("BENCH_FID_UNSAFE_LOAD", raising=False)
    return fid_stats


def test_a_hostile_fid_weights_file_is_refused_and_never_run(tmp_path, monkeypatch, pickled_extractor):
    fid_stats, marker = pickled_extractor, tmp_path / "ran"
    monkeypatch.setenv(fid_stats.WEIGHTS_ENV, str(hostile_weights(tmp_path / "w.pth", marker)))
    with pytest.raises(Exception) as e:
        fid_stats.create_extractor(fid_stats.fid_config(), "cpu")
    assert not marker.exists(), "the weights file's pickle ran a shell command"
    assert type(e.value).__name__ == "UnsafeWeights", e.value
    assert re.search(r"BENCH_FID_WEIGHTS=.*w\.pth: not plain tensors.*safetensors", str(e.value)), e.value
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, "inception-v3-compat")  # torch-fidelity's own loader, too
    with pytest.raises(Exception) as e:
        fid_stats.create_extractor(fid_stats.fid_config(), "cpu")
    assert not marker.exists(), "the weights file's pickle ran a shell command (through torch-fidelity)"
    assert "not plain tensors" in str(e.value), e.value


def test_fid_weights_load_from_safetensors_or_a_plain_state_dict(tmp_path, monkeypatch, pickled_extractor):
    from fractions import Fraction

    from safetensors.torch import save_file

    fid_stats, state = pickled_extractor, {"weight": torch.eye(2) * 3, "bias": torch.ones(2)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save({**state, "note": Fraction(1, 3)}, tmp_path / "odd.pt")  # harmless, but not tensors
    for name in ("w.safetensors", "w.pt"):
        monkeypatch.setenv(fid_stats.WEIGHTS_ENV, str(tmp_path / name))
        ext = fid_stats.create_extractor(fid_stats.fid_config(), "cpu")
        assert torch.equal(ext.fc.weight, state["weight"]), name
    monkeypatch.setenv(fid_stats.WEIGHTS_ENV, str(tmp_path / "odd.pt"))
    with pytest.raises(fid_stats.UnsafeWeights, match="BENCH_FID_UNSAFE_LOAD=1"):
        fid_stats.create_extractor(fid_stats.fid_config(), "cpu")
    monkeypatch.setenv(fid_stats.UNSAFE_ENV, "1")  # the explicit, documented opt-in
    with pytest.raises(RuntimeError, match="note"):  # unpickled (the extra key then fails load_state_dict)
        fid_stats.create_extractor(fid_stats.fid_config(), "cpu")


def test_a_hostile_download_in_torchs_hub_cache_is_refused_and_never_run(tmp_path, monkeypatch, pickled_extractor):
    """torch-fidelity downloads Inception's weights through torch.hub.load_state_dict_from_url, which reads a
    file already in the hub cache without downloading: a hostile one there stands for a hostile download."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    fid_stats, marker = pickled_extractor, tmp_path / "ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, "inception-v3-compat")
    monkeypatch.delenv(fid_stats.WEIGHTS_ENV, raising=False)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    hostile_weights(cached, marker)
    with pytest.raises(Exception) as e:
        fid_stats.create_extractor(fid_stats.fid_config(), "cpu")
    assert not marker.exists(), "the downloaded file's pickle ran a shell command"
    assert "the weights inception-v3-compat downloads: not plain tensors" in str(e.value), e.value


def test_extractors_whose_weights_are_code_need_the_opt_in(monkeypatch, pickled_extractor):
    fid_stats = pickled_extractor
    monkeypatch.setenv(fid_stats.EXTRACTOR_ENV, "clip-vit-b-32")
    with pytest.raises(fid_stats.UnsafeWeights, match="BENCH_FID_EXTRACTOR=clip-vit-b-32: its weights are code"):
        fid_stats.fid_config()
    monkeypatch.setenv(fid_stats.UNSAFE_ENV, "1")
    assert fid_stats.fid_config().extractor == "clip-vit-b-32"


def test_a_hostile_cifar10_file_is_refused_and_never_run(tmp_path, cifar10_env):
    """BENCH_CIFAR10_VERIFY=0 (the fixture's setting) skips the md5 check, not the restricted unpickler."""
    from tasks.cifar10 import CIFAR10Corrupt

    marker = tmp_path / "ran"
    (cifar10_env.folder / "data_batch_2").write_bytes(pickle.dumps({"data": Payload(marker), "labels": []},
                                                                   protocol=2))
    with pytest.raises(Exception) as e:
        get_task_spec("cifar10").cls().load(context())
    assert not marker.exists(), "the CIFAR file's pickle ran a shell command"
    assert isinstance(e.value, CIFAR10Corrupt), e.value
    assert "data_batch_2 names posix.system, which a CIFAR-10 file never holds" in str(e.value), e.value


@pytest.mark.parametrize("payload, words", [
    (lambda: {"data": np.zeros((2, 3072), dtype=np.float64), "labels": [0, 1]}, "an array of 'f8'"),
    (lambda: {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0]}, "does not hold `data`"),
    (lambda: {"data": np.array([None], dtype=object), "labels": [0]}, "an array of"),
    (lambda: {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 1]}, None),  # a Python 3 pickle: read
    (lambda: ["not", "a", "dict"], "holds a list"),
])
def test_cifar10_files_with_other_content_are_refused_by_name(cifar10_env, payload, words):
    from tasks.cifar10 import CIFAR10Corrupt

    (cifar10_env.folder / "test_batch").write_bytes(pickle.dumps(payload(), protocol=4))
    task = get_task_spec("cifar10").cls()
    if words is None:
        task.load(context())
        assert task.test.x.shape == (2, 3, 32, 32)
        return
    with pytest.raises(CIFAR10Corrupt, match=words):
        task.load(context())
