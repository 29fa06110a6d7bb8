from __future__ import annotations

import pytest

from bench.hardware import ProfileMismatch, detect_machine, match_profile
from bench.profiles import load_profile, profile_names
from bench.registry import RegistryError
from bench.result import Machine


def machine(**kw) -> Machine:
    base = dict(cpu_model="Test CPU", cpu_count=16, arch="x86_64", os="Linux", cuda_available=False,
                torch="2.14.1", torch_threads=2)
    return Machine(**{**base, **kw})


H100 = dict(cuda_available=True, gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_gb=79.1, gpu_count=1)


def test_required_profiles_exist():
    assert {"cpu", "a100-bf16", "h100-bf16", "l4-fp16"} <= set(profile_names())


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_validates(name):
    p = load_profile(name)
    assert p.name == name and p.timing.min_repeats <= p.timing.max_repeats
    assert p.batch_for("image-classification") >= 1


def test_cpu_profile_is_two_threads_fp32():
    p = load_profile("cpu")
    assert (p.device, p.dtype, p.threads) == ("cpu", "float32", 2)


def test_unknown_profile_suggests():
    with pytest.raises(RegistryError, match="h100-bf16"):
        load_profile("h100")


def test_cpu_profile_matches_a_cpu_machine():
    assert match_profile(load_profile("cpu"), machine()) == []


def test_gpu_profile_on_cpu_machine_mismatches():
    problems = match_profile(load_profile("h100-bf16"), machine())
    assert any("CUDA" in p for p in problems)


def test_wrong_gpu_is_named():
    problems = match_profile(load_profile("a100-bf16"), machine(**H100))
    assert any("A100" in p and "H100" in p for p in problems)
    assert match_profile(load_profile("h100-bf16"), machine(**H100)) == []


def test_too_few_cpus():
    assert any("threads" in p for p in match_profile(load_profile("cpu"), machine(cpu_count=1)))


def test_detect_machine_reports_this_machine():
    m = detect_machine()
    assert m.cpu_count >= 1 and m.torch and m.cpu_model


def test_a_mismatch_is_refused_by_default_naming_the_matching_profiles(results_root, monkeypatch):
    import bench.runner

    small = machine(cpu_count=1)  # the cpu profiles' 2 threads need 2 CPUs
    monkeypatch.setattr(bench.runner, "detect_machine", lambda: small)
    with pytest.raises(ProfileMismatch, match=r"does not match profile 'cpu': .*2 threads.*no profile matches "
                                              r"this machine.*--allow-mismatch"):
        bench.runner.run("digits", "none", profile_name="cpu", results_root=results_root, budget="smoke")
    assert not results_root.exists()


def test_the_refusal_names_the_profile_that_matches(monkeypatch):
    from bench.hardware import mismatch_message

    h100 = machine(**H100)
    msg = mismatch_message(load_profile("a100-bf16"), h100, match_profile(load_profile("a100-bf16"), h100))
    assert "'a100-bf16'" in msg and "A100" in msg and "h100-bf16" in msg.split("match this machine:")[1]


def test_allow_mismatch_runs_and_the_record_keeps_the_mismatch(results_root, monkeypatch):
    import bench.runner

    small = machine(cpu_count=1)
    monkeypatch.setattr(bench.runner, "detect_machine", lambda: small)
    with pytest.warns(UserWarning, match="profile mismatch"):
        out = bench.runner.run("digits", "none", profile_name="cpu", allow_mismatch=True,
                               results_root=results_root, budget="smoke")
    assert out.result.profile.matched is False and any("threads" in m for m in out.result.profile.mismatches)


def test_busy_machine_is_warned_about():
    from bench.hardware import busy_warning

    assert busy_warning(machine(cpu_count=2, load_average_1m=3.5)) and "3.5" in busy_warning(
        machine(cpu_count=2, load_average_1m=3.5))
    assert busy_warning(machine(cpu_count=2, load_average_1m=0.2)) is None
    assert busy_warning(machine(load_average_1m=None)) is None


def test_evaluation_sizes_are_per_task_and_name_registered_tasks():
    """`[eval_size]`: images per evaluation for the tasks whose size the hardware sets (coco, imagenet-fid)."""
    from bench.registry import TASKS

    for name in profile_names():
        assert set(load_profile(name).eval_size) <= set(TASKS.names()), name
    assert load_profile("h100-bf16").eval_size_for("coco") == 30000
    assert load_profile("h100-bf16").eval_size_for("imagenet-fid") == 50000
    assert load_profile("l4-fp16").eval_size_for("coco") == 1000
    with pytest.raises(RegistryError, match=r"no evaluation size for task 'coco'.*\[eval_size\].*cpu\.toml"):
        load_profile("cpu").eval_size_for("coco")
