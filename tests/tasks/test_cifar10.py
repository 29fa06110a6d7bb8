"""`cifar10`: the loader on CIFAR-format fixture files, its errors, augmentation, models, user reference,
and a whole `kd` run, all offline."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.cifar10 import (CIFAR10, MEAN, PAD, STD, CIFAR10Corrupt, CIFAR10NotFound, ReferenceWeightsError,
                           cifar_resnet)


def expected_images(rows: np.ndarray) -> np.ndarray:
    """The loader's output computed independently: CHW floats, normalised per channel."""
    x = rows.reshape(-1, 3, 32, 32).astype(np.float64) / 255
    return (x - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(STD).reshape(1, 3, 1, 1)


# ---- data -------------------------------------------------------------------------------------------------

def test_fixture_is_in_the_real_pickle_format(cifar10_fixture):
    import pickle

    with open(cifar10_fixture.folder / "data_batch_3", "rb") as f:
        d = pickle.load(f, encoding="bytes")  # how the CIFAR page says to read it
    assert set(d) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (4, 3072)
    assert d[b"batch_label"] == b"training batch 3 of 5"
    with open(cifar10_fixture.folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"label_names"][0] == b"airplane"


def test_loads_fixture_with_shapes_values_normalisation_and_labels(cifar10_env):
    task = CIFAR10()
    task.load()
    assert task.train.x.shape == (20, 3, 32, 32) and task.test.x.shape == (10, 3, 32, 32)
    assert task.train.x.dtype == torch.float32 and task.train.y.dtype == torch.int64
    assert task.train.x.is_contiguous()
    np.testing.assert_array_equal(task.train.y.numpy(), cifar10_env.train_labels)  # batches 1..5 in order
    np.testing.assert_array_equal(task.test.y.numpy(), cifar10_env.test_labels)
    np.testing.assert_allclose(task.train.x.numpy(), expected_images(cifar10_env.train_data), atol=1e-5)
    np.testing.assert_allclose(task.test.x.numpy(), expected_images(cifar10_env.test_data), atol=1e-5)
    # one pixel by hand: image 5 (batch 2's first), green channel, row 7, column 3
    raw = cifar10_env.train_data[5, 1024 + 7 * 32 + 3]
    assert task.train.x[5, 1, 7, 3].item() == pytest.approx((raw / 255 - MEAN[1]) / STD[1], abs=1e-5)
    assert task.classes == cifar10_env.label_names
    fp = task.data_fingerprint()
    task.load()  # idempotent
    assert task.data_fingerprint() == fp and len(fp) == 64


def test_missing_folder_says_where_it_looked_and_how_to_download(tmp_path, monkeypatch):
    root = tmp_path / "nowhere"
    monkeypatch.setenv("BENCH_DATA", str(root))
    with pytest.raises(CIFAR10NotFound) as err:
        CIFAR10().load()
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert str(root / "cifar-10-batches-py") in msg
    assert f"python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', download=True)\"" in msg
    assert "BENCH_DATA" in msg


def test_default_root_is_under_the_bench_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CIFAR10NotFound, match=str(tmp_path / "cache" / "data" / "cifar-10-batches-py")):
        CIFAR10().load()


def test_missing_file_is_named(cifar10_env):
    (cifar10_env.folder / "data_batch_4").unlink()
    with pytest.raises(CIFAR10NotFound, match="lacks data_batch_4"):
        CIFAR10().load()


def test_md5_check_rejects_the_fixture_unless_disabled(cifar10_env, monkeypatch):
    monkeypatch.delenv("BENCH_CIFAR10_VERIFY")
    with pytest.raises(CIFAR10Corrupt) as err:
        CIFAR10().load()
    msg = str(err.value)
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg and "download=True" in msg

    class Unverified(CIFAR10):
        verify_md5 = False

    Unverified().load()  # the class attribute turns it off too
    monkeypatch.setenv("BENCH_CIFAR10_VERIFY", "0")
    CIFAR10().load()


def test_md5_check_accepts_files_that_match(cifar10_env, monkeypatch):
    """The verifying path itself works: point torchvision's md5 table at the fixture's own files."""
    from torchvision.datasets import CIFAR10 as TV

    monkeypatch.delenv("BENCH_CIFAR10_VERIFY")

    def md5(name: str) -> str:
        return hashlib.md5((cifar10_env.folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(TV, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(TV, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(TV, "meta", {**TV.meta, "md5": md5("batches.meta")})
    task = CIFAR10()
    task.load()
    assert task.train.x.shape[0] == 20 and task.classes == cifar10_env.label_names
    with open(cifar10_env.folder / "test_batch", "ab") as f:  # one byte more: corrupt
        f.write(b"\0")
    with pytest.raises(CIFAR10Corrupt, match="test_batch"):
        CIFAR10().load()


# ---- augmentation -----------------------------------------------------------------------------------------

def test_augment_is_deterministic_for_a_seed_and_keeps_the_shape():
    x = torch.randn(16, 3, 32, 32)
    task = CIFAR10()
    a = task.augment(x, torch.Generator().manual_seed(7))
    b = task.augment(x, torch.Generator().manual_seed(7))
    c = task.augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_is_a_padded_crop_and_a_flip():
    x = torch.randn(64, 3, 32, 32)
    out = CIFAR10().augment(x, torch.Generator().manual_seed(0))
    black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
    padded = black.repeat(1, 32 + 2 * PAD, 32 + 2 * PAD).unsqueeze(0).repeat(64, 1, 1, 1)
    padded[:, :, PAD:-PAD, PAD:-PAD] = x
    flips = shifts = 0
    for i in range(64):
        found = [(dy, dx, f) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1) for f in (False, True)
                 if torch.equal(out[i], (lambda v: v.flip(-1) if f else v)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert found, f"image {i} is not a crop of the padded image"
        flips += found[0][2]
        shifts += found[0][:2] != (PAD, PAD)
    assert 16 < flips < 48 and shifts > 48  # both happen, neither always


# ---- models -----------------------------------------------------------------------------------------------

def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_is_cifar_resnet34_and_student_cifar_resnet18():
    task = CIFAR10()
    ref, student = task.build_reference(), task.build_student()
    assert n_params(ref) == 21_282_122  # ResNet-34, CIFAR stem, 10 classes (~21.3 M)
    assert n_params(student) == 11_173_962  # ResNet-18 likewise (~11.2 M)
    for m in (ref, student):
        assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
        assert isinstance(m.maxpool, torch.nn.Identity)
        assert m.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert len(ref.layer3) == 6 and len(student.layer3) == 2


def test_module_scope_is_torch_free():
    code = "import sys, tasks.cifar10; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- a user-provided reference ----------------------------------------------------------------------------

def test_user_reference_is_loaded_and_checked(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks.base import RunContext

    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter())
    task = CIFAR10()
    torch.manual_seed(0)
    good = {k: v.contiguous() for k, v in task.build_reference().state_dict().items()}
    path = tmp_path / "ref.safetensors"
    save_file(good, str(path))
    monkeypatch.setenv("BENCH_CIFAR10_REFERENCE", str(path))
    w = task.reference_weights(ctx)
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and not w.canonical
    assert w.source == str(path) and all(torch.equal(w.state[k], good[k]) for k in good)

    save_file({k: v.contiguous() for k, v in task.build_student().state_dict().items()}, str(path))
    with pytest.raises(ReferenceWeightsError, match=r"missing keys: layer1\.2\.bn1\.bias.* and 91 more"):
        task.reference_weights(ctx)
    save_file({**good, "fc.weight": torch.zeros(100, 512)}, str(path))
    with pytest.raises(ReferenceWeightsError, match=r"wrong shapes: fc.weight \(100, 512\)"):
        task.reference_weights(ctx)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ReferenceWeightsError, match="could not be read"):
        task.reference_weights(ctx)
    monkeypatch.setenv("BENCH_CIFAR10_REFERENCE", str(tmp_path / "absent.safetensors"))
    with pytest.raises(ReferenceWeightsError, match="no such file"):
        task.reference_weights(ctx)


# ---- end to end -------------------------------------------------------------------------------------------

def run_kd(tmp_path):
    from bench.runner import run

    out = run("cifar10", "kd", profile_name="cpu", budget="smoke", results_root=tmp_path / "results")
    record = json.loads(out.path.read_text())
    assert out.result.status == "ok" and record["status"] == "ok"
    assert record["task"]["name"] == "cifar10" and record["task"]["tier"] == "full"
    assert record["quality"]["n"] == 10 and record["controls"][0]["name"] == "student_without_teacher"
    assert out.path.is_relative_to(tmp_path / "results")
    return record


def tiny_cnn(width: int) -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def test_kd_smoke_run_end_to_end_with_tiny_models(cifar10_env, tmp_path, monkeypatch):
    """The whole run on the fixture: loader, augmentation, caching, kd, timing; tiny models for speed."""
    monkeypatch.setattr(CIFAR10, "build_reference", lambda self: tiny_cnn(16))
    monkeypatch.setattr(CIFAR10, "build_student", lambda self: tiny_cnn(4))
    record = run_kd(tmp_path)
    assert record["size"]["reference"]["parameters"] == n_params(tiny_cnn(16))
    cached = list((tmp_path / "cache" / "tasks" / "cifar10" / "v1").glob("reference-*.safetensors"))
    assert len(cached) == 1  # a smoke reference is cached apart from the real one


@pytest.mark.slow
def test_kd_smoke_run_end_to_end_with_the_resnets(cifar10_env, tmp_path):
    record = run_kd(tmp_path)
    assert record["size"]["reference"]["parameters"] == 21_282_122
    assert record["size"]["method"]["parameters"] == 11_173_962


@pytest.mark.gpu
def test_augment_is_the_same_on_cuda_and_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(32, 3, 32, 32)
    task = CIFAR10()
    cpu = task.augment(x, torch.Generator().manual_seed(3))
    gpu = task.augment(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
def test_kd_smoke_run_on_a_gpu_profile_with_the_resnets(cifar10_env, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from bench.runner import run

    out = run("cifar10", "kd", profile_name="h100-bf16", budget="smoke", results_root=tmp_path / "results")
    record = json.loads(out.path.read_text())
    assert record["status"] == "ok" and record["profile"]["device"] == "cuda"
    assert record["speed"]["synchronized"] and record["quality"]["n"] == 10
