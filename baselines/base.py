"""The method contract: a registered class with a frozen hyper-parameter dataclass and an `apply`.

`apply(subject, task, ctx)` returns the transformed subject with what the transformation cost (training or
calibration time, steps, samples) and any controls the method's paper implies (the student trained without
the teacher, for distillation). Module scope stays torch-free, as for tasks (see `bench.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

# The contract types live in bench.api; re-exported here, where the method modules import them from.
from bench.api import Applied, ControlResult, Cost  # noqa: F401

if TYPE_CHECKING:
    from bench.registry import MethodSpec
    from tasks.base import RunContext, Subject, Task


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
