"""The task contract: data, a reference subject, a quality metric and a timed workload.

A task module registers a `Task` subclass with `@register_task`. Module scope stays import-light (no torch):
heavy imports happen inside methods, so `bench list tasks` is fast.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

# The contract types live in bench.api; they are re-exported here for the task modules that import them from
# tasks.base.
from bench.api import Evaluation, ReferenceWeights, RunContext, Subject  # noqa: F401

if TYPE_CHECKING:
    import torch

    from bench.registry import TaskSpec

ARTIFACTS = Path(__file__).parent / "artifacts"


class Task(ABC):
    """Base class. Subclasses set `spec` through `@register_task` and implement the abstract methods."""

    spec: ClassVar["TaskSpec"]
    # sha256 of the published reference weights in tasks/artifacts/<name>/reference.safetensors; None when the
    # task has no committed artifact (a full task whose reference the user downloads or trains).
    reference_sha256: ClassVar[str | None] = None

    # ---- what the task needs -----------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """What would stop this task from running here, as sentences that say what to do; empty when nothing.

        Called by the runner before any work (`bench.preflight`), so a problem is refused at once with exit 2
        and no record instead of failing after minutes of loading. It must be quick and load nothing: check
        that configured files and folders exist, that what comes from the network can be downloaded
        (`bench.preflight.hub()`) or is cached locally, naming the environment variable that points the task
        at a local copy, and that the profile sets what the task reads from it. `uses`: the capabilities the
        method declares it reads (`bench.api`), so a part only some methods use (a draft model) is checked
        only for them. An embedded task needs nothing beyond the package: the default says so."""
        return []

    # ---- data ---------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, ctx: RunContext) -> None:
        """Load (or generate) the data; idempotent."""

    @abstractmethod
    def data_fingerprint(self) -> str:
        """sha256 of the evaluation data as loaded, so results on different data never compare as equal."""

    # ---- models -------------------------------------------------------------------------------------------
    @abstractmethod
    def build_reference(self) -> "torch.nn.Module":
        """A fresh, untrained reference architecture."""

    @abstractmethod
    def train_reference(self, ctx: RunContext) -> dict:
        """Train the reference deterministically; return its state dict."""

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        """The published artifact when it is present and intact; else the cached (or newly trained) build."""
        from bench import cache

        art = ARTIFACTS / self.spec.name / "reference.safetensors"
        if self.reference_sha256 and art.is_file():
            hit = cache.load_weights(art, self.reference_sha256)
            if hit is not None:
                return ReferenceWeights(hit[0], hit[1], True, str(art))
            warnings.warn(f"{art} does not match the task's recorded sha256; using a locally built reference "
                          f"(results will say so)", stacklevel=2)
        path = self.reference_cache_path(ctx)
        state, digest, _ = cache.cached_weights(path, lambda: self.train_reference(ctx))
        return ReferenceWeights(state, digest, digest == self.reference_sha256, str(path))

    def reference_cache_path(self, ctx: RunContext) -> Path:
        """Where a locally trained reference is cached: keyed by everything that changes its weights, so a
        smoke-budget build is never taken for the real one."""
        from bench import cache

        k = cache.key(self.spec.version, ctx.budget, ctx.device, getattr(self, "recipe", None),
                      self.data_fingerprint())
        return cache.cache_dir() / "tasks" / self.spec.name / f"v{self.spec.version}" / f"reference-{k}.safetensors"

    def subject_from_state(self, state: dict, ctx: RunContext) -> Subject:
        model = self.build_reference()
        model.load_state_dict(state)
        return self.prepare(model, ctx)

    def prepare(self, model: "torch.nn.Module", ctx: RunContext) -> Subject:
        """Put a model on the profile's device and dtype in eval mode, wrapped as this task's subject."""
        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        return Subject(model, self.spec.modality)

    # ---- measurement --------------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        """Score `subject` on the evaluation split, deterministically."""

    @abstractmethod
    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        """(metric name, value) of how close the method's outputs are to the reference's."""

    @abstractmethod
    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        """(one timed call, items it processes, a description of the unit)."""
