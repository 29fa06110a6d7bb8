"""Registries of tasks and methods, in the manner of timm's `register_model` + `create_model`.

A task or method module registers a class with a decorator at import time. Registration is import-light:
the modules under `tasks/` and `baselines/` keep torch, torchvision and every dataset out of module scope
(heavy code is imported inside the functions that need it), so `bench list` discovers every entry in a
fraction of a second. `tests/test_registry.py` enforces this in a fresh interpreter.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

FAMILIES = ("distillation", "caching", "pruning", "decoding", "quantization", "none")
MODALITIES = ("image-classification", "causal-lm", "text-classification", "image-generation", "diffusion-lm",
              "vision-language")
TIERS = ("embedded", "full")

T = TypeVar("T")


class RegistryError(LookupError):
    """A name that is not registered, or a method that cannot run on a task."""


@dataclass(frozen=True)
class MethodSpec:
    """What `bench list methods` shows, known without importing the method's heavy code."""

    name: str
    family: str
    paper: str  # the paper's short citation, e.g. "Hinton et al., Distilling the Knowledge in a Neural Network"
    year: int | None
    modalities: tuple[str, ...]
    summary: str  # what it does, in one line
    url: str = ""
    version: str = "1"  # bump when the method's behaviour changes, so old results are not compared as equal
    cls: type = field(default=object, compare=False, repr=False)
    # why its wall-clock speedup may exceed its MAC/NFE ratio (a saving the operation count does not see, e.g.
    # memory traffic or elementwise work skipped with the cached blocks); None: the ratio bounds the speedup
    beyond_compute: str | None = None
    # the task capabilities (`bench.api`: TrainingRows, Draft, Student, ...) the method reads; a task that does
    # not declare one of them is refused before any work starts. Each entry is a capability, or a tuple of
    # alternatives (any one will do); a dict gives them per modality
    requires: tuple | dict = ()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: str
    tier: str  # "embedded" runs offline on a CPU; "full" needs downloads and usually a GPU profile
    metric: str
    higher_is_better: bool
    summary: str
    version: str = "1"
    cls: type = field(default=object, compare=False, repr=False)
    # The quality loss a user of this task accepts by default, with its unit (leaderboard.data.parse_budget):
    # "1%" relative, as MLPerf's "99% of the reference accuracy"; the leaderboard opens on it.
    quality_budget: str = "1%"


class Registry(Generic[T]):
    def __init__(self, kind: str, packages: tuple[str, ...]):
        self.kind = kind
        self._packages = packages
        self._entries: dict[str, T] = {}
        self._discovered = False

    def add(self, name: str, spec: T) -> None:
        if name in self._entries and getattr(self._entries[name], "cls", None) is not getattr(spec, "cls", None):
            raise RegistryError(f"{self.kind} {name!r} is registered twice; names must be unique")
        self._entries[name] = spec

    def discover(self) -> None:
        """Import every module under the registry's packages so their decorators run (cheap by contract)."""
        if self._discovered:
            return
        self._discovered = True
        for pkg_name in self._packages:
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
                last = mod.name.rsplit(".", 1)[-1]
                if not last.startswith("_"):
                    importlib.import_module(mod.name)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[T]:
        self.discover()
        return iter(self._entries[n] for n in sorted(self._entries))

    def get(self, name: str) -> T:
        self.discover()
        if name in self._entries:
            return self._entries[name]
        near = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Run `bench list {self.kind}s` to see all "
            f"{len(self._entries)} of them."
        )


TASKS: Registry[TaskSpec] = Registry("task", ("tasks",))
METHODS: Registry[MethodSpec] = Registry("method", ("baselines",))


def _check_choice(value: str, valid: tuple[str, ...], what: str, owner: str) -> None:
    if value not in valid:
        raise RegistryError(f"{owner}: {what} {value!r} is not one of {', '.join(valid)}")


def register_method(
    name: str,
    *,
    family: str,
    paper: str,
    year: int | None,
    modalities: tuple[str, ...],
    summary: str,
    url: str = "",
    version: str = "1",
    beyond_compute: str | None = None,
    requires: tuple | dict = (),
) -> Callable[[type], type]:
    """Class decorator: `@register_method("kd", family="distillation", ...)` on a `Method` subclass."""
    _check_choice(family, FAMILIES, "family", f"method {name!r}")
    for m in modalities:
        _check_choice(m, MODALITIES, "modality", f"method {name!r}")

    def deco(cls: type) -> type:
        spec = MethodSpec(name, family, paper, year, tuple(modalities), summary, url, version, cls, beyond_compute,
                          requires if isinstance(requires, dict) else tuple(requires))
        METHODS.add(name, spec)
        cls.spec = spec
        return cls

    return deco


def register_task(
    name: str,
    *,
    modality: str,
    tier: str,
    metric: str,
    higher_is_better: bool,
    summary: str,
    version: str = "1",
    quality_budget: str = "1%",
) -> Callable[[type], type]:
    """Class decorator: `@register_task("digits", modality="image-classification", ...)` on a `Task`.
    `quality_budget` is the loss the leaderboard accepts by default (`1%` relative, `0.5pp`, `2fid`)."""
    _check_choice(modality, MODALITIES, "modality", f"task {name!r}")
    _check_choice(tier, TIERS, "tier", f"task {name!r}")
    from bench.budget import BudgetError, parse_budget

    try:
        parse_budget(quality_budget, metric)
    except BudgetError as e:
        raise RegistryError(f"task {name!r}: quality_budget {e}") from None

    def deco(cls: type) -> type:
        spec = TaskSpec(name, modality, tier, metric, higher_is_better, summary, version, cls, quality_budget)
        TASKS.add(name, spec)
        cls.spec = spec
        return cls

    return deco


def get_task_spec(name: str) -> TaskSpec:
    return TASKS.get(name)


def get_method_spec(name: str) -> MethodSpec:
    return METHODS.get(name)


def requirements(method: MethodSpec, modality: str) -> tuple:
    """What `method` requires of a task of `modality`: capabilities, or tuples of alternatives."""
    req = method.requires
    return tuple(req.get(modality, ())) if isinstance(req, dict) else tuple(req)


def missing_capabilities(method: MethodSpec, task: TaskSpec) -> list:
    """The requirements of `method` that `task` does not meet (a capability, or a tuple of alternatives none
    of which it declares)."""
    mro = task.cls.__mro__
    return [r for r in requirements(method, task.modality)
            if not (any(c in mro for c in r) if isinstance(r, tuple) else r in mro)]


def requirement_name(r) -> str:
    return " or ".join(c.__name__ for c in r) if isinstance(r, tuple) else r.__name__


def supports(method: MethodSpec, task: TaskSpec) -> bool:
    return task.modality in method.modalities and not missing_capabilities(method, task)


def check_supports(method: MethodSpec, task: TaskSpec) -> None:
    if task.modality not in method.modalities:
        raise RegistryError(
            f"method {method.name!r} does not support task {task.name!r}: the task's modality is "
            f"{task.modality!r}, and {method.name!r} supports {', '.join(method.modalities)}. "
            f"Run `bench list methods --task {task.name}` to see the methods that run on it."
        )
    missing = missing_capabilities(method, task)
    if missing:
        parts = []
        for req in missing:
            alts = req if isinstance(req, tuple) else (req,)
            have = [t.name for t in TASKS if any(c in t.cls.__mro__ for c in alts)
                    and t.modality in method.modalities]
            doc = "; ".join((c.__doc__ or "").strip().splitlines()[0] for c in alts if c.__doc__)
            parts.append(f"{requirement_name(req)} ({doc}), which {', '.join(have) or 'no registered task'} "
                         f"offer(s)")
        raise RegistryError(f"method {method.name!r} cannot run on task {task.name!r}: it needs "
                            + "; ".join(parts) + f". Run `bench list methods --task {task.name}` to see the "
                            f"methods that run on it.")


def create_task(name: str, **kwargs: Any):
    """Instantiate a registered task by name (the factory; `TaskSpec.cls` holds the class)."""
    return get_task_spec(name).cls(**kwargs)


def create_method(name: str, overrides: dict[str, str] | None = None):
    """Instantiate a registered method by name with `--set key=value` overrides applied to its config."""
    from bench.config import apply_overrides

    spec = get_method_spec(name)
    config = apply_overrides(spec.cls.Config(), overrides or {}, owner=f"method {name!r}")
    return spec.cls(config)
