"""A quality budget: the largest quality loss a user accepts, always written with its unit.

`1%` is relative to the reference's value (MLPerf's "99% of the reference accuracy" is `1%`), `0.5pp` is absolute
percentage points of a metric between 0 and 1, `2fid` is absolute in the metric's own units. A bare number is
refused: '0.5' once silently meant 50%. Tasks declare their default (`register_task(quality_budget=...)`); the
leaderboard and `bench recommend` read budgets through `parse_budget` only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

BUDGET_HELP = ("the largest quality loss accepted, with its unit: '1%' relative to the reference's value, "
               "'0.5pp' absolute percentage points (for a metric between 0 and 1, such as accuracy), '2fid' "
               "absolute in the metric's own units (the metric's name as the unit)")
_BUDGET_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(%|pp|[a-z][a-z0-9_]*)$", re.IGNORECASE)


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    amount: float  # a percentage of the reference's value when relative; else in the metric's units
    relative: bool
    label: str = ""  # how an absolute budget was written ("0.5 pp", "2 fid")

    def allowed(self, reference_value: float) -> float:
        """The largest quality loss accepted, in the metric's units."""
        return self.amount / 100 * abs(reference_value) if self.relative else self.amount

    def __str__(self) -> str:
        if self.relative:
            return f"{self.amount:g}% of the reference"
        return f"{self.label} (absolute)" if self.label else f"{self.amount:g} (absolute)"


def parse_budget(text: str, metric: str | None = None) -> Budget:
    """`--max-drop` with an explicit unit: `N%` relative to the reference's value, `Npp` absolute percentage
    points (N/100 in the units of a metric between 0 and 1), `N<metric>` absolute in the metric's own units
    (e.g. `2fid`). A bare number is refused: '0.5' read as 50% once, and the site speaks in pp."""
    t = text.strip()
    m = _BUDGET_RE.match(t)
    if m is None:
        try:
            float(t)
        except ValueError:
            raise BudgetError(f"--max-drop {text!r} is not a number with a unit ({BUDGET_HELP})") from None
        own = f", or '{t}{metric}' in {metric}'s own units" if metric else ""
        raise BudgetError(f"--max-drop {text!r} has no unit: write '{t}%' (relative to the reference's value) or "
                          f"'{t}pp' (absolute percentage points){own}")
    amount, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(amount):
        raise BudgetError(f"--max-drop {text!r} must be a finite, non-negative number ({BUDGET_HELP})")
    if unit == "%":
        return Budget(amount, True)
    if unit == "pp":
        return Budget(amount / 100, False, f"{amount:g} pp")
    if metric is not None and unit != metric.lower():
        raise BudgetError(f"--max-drop {text!r}: the unit {unit!r} is not this task's metric ({metric}); write "
                          f"'{amount:g}{metric}', '{amount:g}%' or '{amount:g}pp'")
    return Budget(amount, False, f"{amount:g} {unit}")
