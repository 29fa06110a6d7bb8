"""What the machine really is, and whether it is what the profile says.

Detection imports torch (for CUDA facts), so it runs only inside `bench run`, never in `bench list`.
"""

from __future__ import annotations

import os
import platform
import subprocess

from bench.profiles import Profile
from bench.result import Machine


class ProfileMismatch(RuntimeError):
    """The machine is not the profile's, and `--allow-mismatch` was not given: refused before any work."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def detect_machine() -> Machine:
    import torch

    gpu_name = gpu_mem = driver = None
    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        props = torch.cuda.get_device_properties(0)
        gpu_name, gpu_mem = props.name, round(props.total_memory / 2**30, 2)
        driver = _driver_version()
    return Machine(
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        arch=platform.machine(),
        os=platform.platform(),
        cuda_available=cuda_ok,
        gpu_name=gpu_name,
        gpu_memory_gb=gpu_mem,
        gpu_count=torch.cuda.device_count() if cuda_ok else 0,
        driver=driver,
        cuda_version=torch.version.cuda,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        load_average_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )


def match_profile(profile: Profile, machine: Machine) -> list[str]:
    """Every way the machine differs from what the profile expects; empty when it matches."""
    exp = profile.expect
    problems: list[str] = []
    if exp.cuda and not machine.cuda_available:
        problems.append(f"profile {profile.name!r} needs a CUDA GPU; none was found")
    if machine.cpu_count < exp.min_cpus:
        problems.append(f"profile {profile.name!r} needs {exp.min_cpus} CPUs; the machine has {machine.cpu_count}")
    if machine.cpu_count < profile.threads:
        problems.append(f"profile {profile.name!r} uses {profile.threads} threads; the machine has "
                        f"{machine.cpu_count} CPUs")
    if exp.cuda and machine.cuda_available:
        if exp.gpu_name_contains and exp.gpu_name_contains.lower() not in (machine.gpu_name or "").lower():
            problems.append(f"profile {profile.name!r} expects a GPU named like {exp.gpu_name_contains!r}; "
                            f"found {machine.gpu_name!r}")
        if exp.min_gpu_memory_gb and (machine.gpu_memory_gb or 0) < exp.min_gpu_memory_gb:
            problems.append(f"profile {profile.name!r} expects at least {exp.min_gpu_memory_gb} GB of GPU "
                            f"memory; found {machine.gpu_memory_gb}")
    return problems


def matching_profiles(machine: Machine) -> list[str]:
    """The profiles this machine matches (no mismatch at all)."""
    from bench.profiles import load_profile, profile_names

    return [n for n in profile_names() if not match_profile(load_profile(n), machine)]


def mismatch_message(profile: Profile, machine: Machine, mismatches: list[str]) -> str:
    """The refusal of a mismatched run: every difference, the profiles that do match, and the way past."""
    fits = matching_profiles(machine)
    where = (f"profiles that match this machine: {', '.join(fits)}" if fits else
             "no profile matches this machine")
    return (f"this machine does not match profile {profile.name!r}: {'; '.join(mismatches)}. A record made here "
            f"would carry another machine's numbers under that name, and full evaluations sized for its GPU can "
            f"take days on a smaller one. Use a matching profile ({where}), or --allow-mismatch to run anyway (the "
            f"record keeps the mismatch, and the leaderboard shows it)")


def busy_warning(machine: Machine) -> str | None:
    """A warning when other work already loads the cores the timing will use."""
    load = machine.load_average_1m
    if load is not None and load > machine.cpu_count:  # back-to-back runs alone keep it near the thread count
        return (f"the machine is busy (1-minute load average {load} on {machine.cpu_count} CPUs): timings will be "
                f"disturbed; the record keeps the load average")
    return None
