"""The first command to run on a new GPU box, before hours of a real evaluation:

    pytest -m gpu tests/tasks/test_gpu_smoke.py            (BENCH_SMOKE_PROFILE=<profile> to choose one)

Every full task (gsm8k, gsm8k-dllm, glue-sst2, glue-mnli, cifar10, imagenet-fid, coco, textvqa) runs at
`--budget smoke` through the runner, on tiny local models and data files written here by the task tests' own fixture writers (nothing is
downloaded), under the GPU profile that matches the machine: devices, dtypes, per-image generators, the timing's
synchronisation, the per-arm memory counter, MACs and the record are all exercised on CUDA in minutes. Each pairs
the task with a method that uses its device path (speculative decoding's draft, a trained student, a feature
cache). The same runs on the `cpu` profile are `slow` tests: they keep this file working where CI has no GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for the fixture writers, under --import-mode=importlib too

PAIRS = [("gsm8k", "speculative"), ("glue-sst2", "none"), ("glue-mnli", "none"), ("cifar10", "kd"),
         ("imagenet-fid", "taylorseer"), ("coco", "deepcache"), ("gsm8k-dllm", "dllm-steps"),
         ("textvqa", "fastv")]


def gpu_profile() -> str:
    """BENCH_SMOKE_PROFILE, else the CUDA profile this machine matches (skip when there is none)."""
    from bench.hardware import detect_machine, matching_profiles
    from bench.profiles import load_profile

    if os.environ.get("BENCH_SMOKE_PROFILE"):
        return os.environ["BENCH_SMOKE_PROFILE"]
    machine = detect_machine()
    if not machine.cuda_available:
        pytest.skip("no CUDA GPU here: the gpu smoke runs need one (the slow cpu twins check this file)")
    cuda = [n for n in matching_profiles(machine) if load_profile(n).device == "cuda"]
    if not cuda:
        pytest.fail(f"no GPU profile matches this machine ({machine.gpu_name}, {machine.gpu_memory_gb} GB); "
                    f"set BENCH_SMOKE_PROFILE to the closest one (`bench list profiles`)")
    return cuda[0]


@pytest.fixture(scope="module")
def full_tasks(tmp_path_factory):
    """Write every full task's fixture files once and point the tasks at them while the module runs."""
    import torch

    from full_fixtures import cifar10_fixtures, full_task_env, vlm_task_env
    from latent_fixtures import (EXTRACTOR, STEPS, register_extractor, save_tiny_clip, save_tiny_dit, save_tiny_sd,
                                 write_coco)
    from tasks import coco, imagenet_fid
    from tasks._kit import fid_stats

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gpu-smoke")
    register_extractor()
    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.1, size=(200, 24))  # the tiny extractor's 24 features
    np.savez(root / "ref.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    cifar = cifar10_fixtures().write_cifar10(root / "cifar")
    (root / "lm").mkdir()
    with full_task_env(root / "lm", separate_draft=True), vlm_task_env(root / "vlm"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_DATA", str(cifar.root))
        mp.setenv("BENCH_CIFAR10_VERIFY", "0")
        mp.delenv("BENCH_CIFAR10_REFERENCE", raising=False)
        mp.setenv(imagenet_fid.REFERENCE_ENV, str(save_tiny_dit(root / "dit")))
        mp.setenv(imagenet_fid.STATS_ENV, str(root / "ref.npz"))
        mp.setenv(coco.DATA_ENV, str(write_coco(root / "coco")))
        mp.setenv(coco.REFERENCE_ENV, str(save_tiny_sd(root / "sd")))
        mp.setenv(coco.CLIP_ENV, str(save_tiny_clip(root / "clip")))
        mp.setenv(fid_stats.EXTRACTOR_ENV, EXTRACTOR)
        for var in (imagenet_fid.VAL_ENV, coco.SPLIT_ENV, fid_stats.LAYER_ENV, fid_stats.WEIGHTS_ENV):
            mp.delenv(var, raising=False)
        mp.setattr(imagenet_fid.ImagenetFid, "num_inference_steps", STEPS)
        mp.setattr(coco.Coco, "num_inference_steps", STEPS)
        yield root


def smoke(task: str, method: str, profile: str, results_root: Path):
    from bench.runner import run
    from bench.store import load_result

    out = run(task, method, profile_name=profile, budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.profile.name == profile and r.profile.matched, (task, method)
    assert r.speed.speedup > 0 and r.memory.reference_peak_bytes > 0 and r.memory.method_peak_bytes > 0
    assert np.isfinite(r.quality.value) and r.compute.reference > 0
    return r


@pytest.mark.gpu
@pytest.mark.parametrize("task, method", PAIRS)
def test_every_full_task_runs_on_this_gpu(full_tasks, tmp_path, task, method):
    r = smoke(task, method, gpu_profile(), tmp_path / "results")
    assert r.profile.device == "cuda" and r.profile.detected.cuda_available


@pytest.mark.slow
@pytest.mark.parametrize("task, method", PAIRS)
def test_the_smoke_runs_work_on_the_cpu_profile(full_tasks, tmp_path, task, method):
    smoke(task, method, "cpu", tmp_path / "results")
