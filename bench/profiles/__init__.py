"""Hardware profiles: fixed device, dtype, threads, batch sizes and timing rules, stored as TOML data files here.

A profile is data, not code, so a maintainer adds a card by adding a file. `load_profile` validates it with
pydantic; `detect_machine` reads what the machine really has, and `match_profile` says where the two differ.

Each profile names the pinned environment its runs are made in (`lock`, a file under locks/): one lock per
platform, not per profile family, because the pins depend on the platform and not on the card (this
platform's torch build is a CUDA build that runs the `cpu` profile too, so every profile here names the same
lock); `bench.lock` says more. A record stores the lock's hash, and `bench reproduce` compares it.
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.registry import MODALITIES, RegistryError


class TimingRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    warmup: int = Field(ge=0)
    min_time_s: float = Field(gt=0)
    min_repeats: int = Field(ge=3)
    max_repeats: int = Field(ge=3)
    precision: float = Field(0.03, gt=0, lt=1)  # target relative half-width of the speedup's 95% interval
    max_time_s: float = Field(120.0, gt=0)  # cap on one timing attempt, both arms together
    attempts: int = Field(3, ge=1)  # tries of an unreliable timing
    max_other_share: float = Field(0.10, ge=0, le=1)  # others' share of the cores above which a timing is contended
    quiet_wait_s: float = Field(60.0, ge=0)  # wait at most this long for a quiet second before a retry


class Expectation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cuda: bool
    min_cpus: int = 1
    gpu_name_contains: str | None = None
    min_gpu_memory_gb: float | None = None


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "bfloat16", "float16"]
    threads: int = Field(ge=1)
    lock: str = Field("linux-x86_64-cp311", pattern=r"^[a-z0-9][a-z0-9._-]*$")  # locks/<lock>.txt (bench.lock)
    batch_size: dict[str, int]
    timing: TimingRules
    expect: Expectation
    # evaluation examples (generated images, ...) per task name, for tasks whose evaluation size is set by the
    # hardware (`coco`, `imagenet-fid`: FID on 1k images on a small GPU, 30k-50k for the headline numbers)
    eval_size: dict[str, int] = Field(default_factory=dict)
    # the batch evaluate() generates or classifies at, per modality, separate from the timed [batch_size] (an
    # evaluation is not timed, and on a large GPU it dominates the wall time); a modality not listed evaluates at
    # its timing batch, so a profile without the table keeps the behaviour it had before the table existed
    eval_batch_size: dict[str, int] = Field(default_factory=dict)

    def eval_batch_for(self, modality: str) -> int:
        """The evaluation batch of `modality`: its [eval_batch_size] entry, else its timing batch."""
        if modality in self.eval_batch_size:
            return self.eval_batch_size[modality]
        return self.batch_for(modality)

    def batch_for(self, modality: str) -> int:
        if modality not in self.batch_size:
            raise RegistryError(f"profile {self.name!r} sets no batch size for modality {modality!r}; "
                                f"it has {', '.join(self.batch_size)}")
        return self.batch_size[modality]

    def eval_size_for(self, task: str) -> int:
        if task not in self.eval_size:
            have = ", ".join(f"{k} = {v}" for k, v in self.eval_size.items()) or "none"
            raise RegistryError(f"profile {self.name!r} sets no evaluation size for task {task!r} (its [eval_size] "
                                f"table has {have}); add `{task} = N` under [eval_size] in "
                                f"bench/profiles/{self.name}.toml, or use a profile that has one")
        return self.eval_size[task]


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".toml"))


def load_profile(name: str) -> Profile:
    names = profile_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
        raise RegistryError(f"unknown profile {name!r}.{hint} Valid profiles: {', '.join(names)} "
                            f"(`bench list profiles`).")
    data = tomllib.loads(resources.files(__package__).joinpath(f"{name}.toml").read_text())
    profile = Profile.model_validate(data)
    validate_tables(profile)
    return profile


def validate_tables(profile: Profile) -> None:
    """The per-modality and per-task tables name known modalities and hold sizes of at least 1."""
    name = profile.name
    for table in ("batch_size", "eval_batch_size"):
        bad = sorted(set(getattr(profile, table)) - set(MODALITIES))
        if bad:
            raise RegistryError(f"profile {name!r}: unknown modality {bad} in [{table}]; valid: {', '.join(MODALITIES)}")
        small = {k: v for k, v in getattr(profile, table).items() if v < 1}
        if small:
            raise RegistryError(f"profile {name!r}: batch sizes in [{table}] must be at least 1, got {small}")
    small = {k: v for k, v in profile.eval_size.items() if v < 1}
    if small:
        raise RegistryError(f"profile {name!r}: evaluation sizes must be at least 1, got {small}")
