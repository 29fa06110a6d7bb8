"""`none`: the unmodified reference. Its result measures the harness itself: a speedup near 1 and no change
in quality, so it is the control every other row of the leaderboard is read against."""

from __future__ import annotations

from bench.registry import MODALITIES, register_method
from baselines.base import Applied, Method


@register_method("none", family="none", paper="(the unmodified reference model)", year=None,
                 modalities=MODALITIES, summary="the reference itself, measured against itself")
class Reference(Method):
    def apply(self, subject, task, ctx) -> Applied:
        import copy

        # a copy, so the two arms of the timing are two models exactly as any method's would be
        return Applied(task.prepare(copy.deepcopy(subject.model), ctx))
