"""One formatter per quantity, shared by the terminal (`bench run`, `bench show`), the README's tables
(`bench report`) and the leaderboard (whose static/task.js follows the same rules).

- a metric between 0 and 1 (accuracy, exact match, agreement, F1) reads as a percentage to 1 decimal, and its
  changes in percentage points (pp) to 1 decimal; any other metric (FID) to 2 decimals;
- speedups to 2 decimals with "x"; counts (MACs, parameters) to 3 significant digits with k/M/G;
- memory and sizes in binary units, memory with its ratio to the reference's;
- a rounded zero has no sign ("0.0 pp", never "-0.0 pp"); a missing value is "–".
"""

from __future__ import annotations

import math

MISSING = "–"


def is_fraction_metric(metric: str) -> bool:
    """A metric between 0 and 1, shown as a percentage (its changes in percentage points)."""
    return any(w in metric for w in ("accuracy", "match", "agreement", "identical", "f1"))


def _unsigned_zero(text: str) -> str:
    try:
        return text.lstrip("+-") if float(text.split()[0]) == 0 else text
    except ValueError:
        return text


def _bad(v) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def fq(v: float | None, metric: str = "") -> str:
    """A quality value: `96.4%` for a fraction metric, `12.34` otherwise."""
    if _bad(v):
        return MISSING
    return f"{v * 100:.1f}%" if is_fraction_metric(metric) else f"{v:.2f}"


def fdelta(v: float | None, metric: str = "", unit: bool = True) -> str:
    """A quality change, signed: `-0.3 pp` for a fraction metric (`unit=False`: `-0.3`), `+0.29` otherwise."""
    if _bad(v):
        return MISSING
    if is_fraction_metric(metric):
        return _unsigned_zero(f"{v * 100:+.1f}") + (" pp" if unit else "")
    return _unsigned_zero(f"{v:+.2f}")


def fspeed(v: float | None, sign: str = "×") -> str:
    """A speedup: `1.41×` (`sign="x"` for plain-text tables)."""
    if _bad(v):
        return MISSING
    return f"{v:.2f}{sign}" if v < 100 else f"{v:.0f}{sign}"


def fcount(n: int | float | None) -> str:
    """A count (MACs, parameters) with 3 significant digits and k/M/G: `1.14 G`, `11.4 M`, `930 k`."""
    if _bad(n):
        return MISSING
    n = float(n)
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def fratio(v: float | None, ref: float | None, sign: str = "×") -> str:
    """A method's figure relative to the reference's: `1.49×` (more than the reference), `0.25×`."""
    if _bad(v) or not ref:
        return MISSING
    return f"{v / ref:.2f}{sign}"


def fbytes(n: int | float | None) -> str:
    if _bad(n):
        return MISSING
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmem(n: int | float | None, ref: int | float | None) -> str:
    """Peak memory with its ratio to the reference's: `32.1 MiB (1.49× ref)`."""
    return fbytes(n) + (f" ({fratio(n, ref)} ref)" if not _bad(n) and ref else "")


def fshare(v: float | None) -> str:
    """A share between 0 and 1 as a percentage: agreement 0.9844 reads `98.4%`."""
    return MISSING if _bad(v) else f"{v * 100:.1f}%"


def ffidelity(v: float | None, metric: str) -> str:
    """Agreement with the reference: a share (`top1_agreement`, `identical_answer_tokens`) as a percentage, any
    other measure (`ssim_to_reference`) to 3 decimals."""
    if _bad(v):
        return MISSING
    return fshare(v) if is_fraction_metric(metric) else f"{v:.3f}"


def fdivergence(d) -> str:
    """A lossless decoder's differing answers by cause (`Fidelity.divergence`): `9 differ: 7 rounding flips at
    near ties, 2 beyond rounding` (of the analysed ones)."""
    if d is None:
        return ""
    if d.differing == 0:
        return "no answer differs"
    parts = [f"{d.numeric} rounding flips at near ties", f"{d.beyond_rounding} beyond rounding"]
    if d.unexplained:
        parts.append(f"{d.unexplained} of different length")
    of = "" if d.analysed == d.differing else f" (first {d.analysed} analysed)"
    return f"{d.differing} differ{of}: " + ", ".join(parts)


def fsecs(s: float | None) -> str:
    if _bad(s):
        return MISSING
    if s < 60:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"
