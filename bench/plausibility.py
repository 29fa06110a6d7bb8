"""Speed figures that cannot be right, named with the figures that show it.

- **The noise floor.** `none` times the reference against itself: its speedup is 1 by construction, so an
  interval that excludes 1.0 means the timing itself was biased (one arm disturbed, or drift).
- **The compute ideal.** A method whose gain is doing fewer operations (fewer MACs or fewer network
  evaluations than the reference) cannot run faster than reference_ops / method_ops, up to the noise of its
  interval: `interval.low > ideal` is implausible. A method whose saving is something the MAC count does not
  see (memory traffic, elementwise work, Python overhead) says so in the registry (`MethodSpec.beyond_compute`,
  a sentence), and its records are then exempt; the explanation is shown with the figure.
- **A verdict.** An `unreliable` speed is not implausible, but it is no figure to publish either.

`bench validate` prints these as warnings; `bench check` holds new records to them as errors.
"""

from __future__ import annotations

from bench.result import Result


def noise_floor_problem(r: Result) -> str | None:
    s = r.speed
    if r.method.family != "none" or s is None:
        return None
    if not (s.interval.low <= 1.0 <= s.interval.high):
        return (f"the reference timed against itself (none) reads {s.speedup:.3f}x [{s.interval.low:.3f}, "
                f"{s.interval.high:.3f}]: an interval that excludes 1.0 means the timing is biased")
    return None


def compute_ideal(r: Result) -> float | None:
    """reference / method operations, for a method that does fewer of them; else None."""
    c = r.compute
    if c is None or c.method <= 0 or c.method >= c.reference:
        return None
    return c.reference / c.method


def beyond_ideal_problem(r: Result, explanation: str | None = None) -> str | None:
    s, ideal = r.speed, compute_ideal(r)
    if s is None or ideal is None or explanation:
        return None
    if s.interval.low > ideal:
        return (f"speedup {s.speedup:.3f}x [{s.interval.low:.3f}, {s.interval.high:.3f}] exceeds its "
                f"{r.compute.unit} ideal of {ideal:.3f}x ({r.compute.reference:.4g} / {r.compute.method:.4g}) by "
                f"more than its interval allows: a disturbed reference arm, or a saving the {r.compute.unit} count "
                f"does not see (then say so in the method's registration, `beyond_compute`)")
    return None


def problems(r: Result) -> list[str]:
    """Every plausibility problem of an ok record's speed figure (empty when there is none)."""
    if r.status != "ok" or r.speed is None:
        return []
    out = []
    if r.speed.status != "ok":
        out.append("speed is unreliable: " + "; ".join(r.speed.reasons))
    explanation = None
    try:
        from bench.registry import get_method_spec

        explanation = getattr(get_method_spec(r.method.name), "beyond_compute", None)
    except Exception:  # noqa: BLE001 - an unknown method is reported elsewhere (validate, check)
        pass
    for p in (noise_floor_problem(r), beyond_ideal_problem(r, explanation)):
        if p:
            out.append(p)
    return out
