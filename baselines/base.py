"""The method contract: a registered class with a frozen hyper-parameter dataclass and an `apply`.

`apply(subject, task, ctx)` returns the transformed subject with what the transformation cost (training or
calibration time, steps, samples) and any controls the method's paper implies (the student trained without
the teacher, for distillation). Module scope stays torch-free, as for tasks (see `bench.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from bench.registry import MethodSpec
    from tasks.base import RunContext, Subject, Task


@dataclass
class Cost:
    seconds: float = 0.0  # wall time of the method's own training or calibration
    steps: int = 0  # optimiser steps or calibration batches
    samples_seen: int = 0
    description: str = "none"
    tokens_seen: int | None = None  # tokens trained on, for language models (None: not counted)


@dataclass
class ControlResult:
    name: str  # e.g. "student_without_teacher"
    description: str
    value: float  # in the task's metric
    per_example: Any = None  # numpy scores, for an interval
    cost_seconds: float | None = None


@dataclass
class Applied:
    subject: "Subject"
    cost: Cost = field(default_factory=Cost)
    controls: list[ControlResult] = field(default_factory=list)
    runtime_exploits_sparsity: bool = False  # True only if the timed runtime skips zero weights
    # statistics of the method's own procedure (acceptance rate, mean accepted length, KV-cache tokens kept),
    # called once, right after the runner has evaluated the returned subject: they describe the evaluation set
    stats: Callable[[], dict[str, float]] | None = None


@dataclass(frozen=True)
class NoConfig:
    """A method without hyper-parameters."""


class Method(ABC):
    spec: ClassVar["MethodSpec"]
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def apply(self, subject: "Subject", task: "Task", ctx: "RunContext") -> Applied:
        """Transform `subject` (the loaded reference) into the accelerated or compressed one."""
