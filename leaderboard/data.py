"""From the results tree to leaderboard rows: loading, quality budgets, standings, tie-aware ranks, Pareto fronts.

A task is read budget first: under a quality budget each row has one standing (`standing`): within the budget
with a measured speedup (its speedup interval wholly above 1x: ranked), within it with no measured speedup,
within it with an unreliable speed, or outside it. Only the first are ranked or recommended. A rank counts the
ranked rows faster beyond doubt (`tied_ranks`); '=' marks exactly the rows whose intervals overlap another's
(`overlapping`), the one tie rule of the site and `bench recommend`.

Everything here is a pure function of its inputs, ordered stably, so the site built from it is byte-identical
for the same results tree. The same code answers `bench recommend`, so the terminal and the site agree.

Two kinds of row are shown but never ranked:
- a row whose speed figure is **unreliable** (`speed.status`, with `speed.reasons`: contended, imprecise,
  unstable, or timed before bench measured any of that): its quality is shown as usual, its speedup greyed with
  the reasons, and it is left out of speed ranks, Pareto fronts and recommendations;
- the **noise floor**: the `none` method (family "none") times the reference against itself, so its speedup
  interval shows how far timing noise reaches on that task and profile. It is shown beside the table, never
  ranked or recommended.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bench.budget import BUDGET_HELP, Budget, BudgetError, parse_budget  # noqa: F401 (re-exported)
from bench.formats import is_fraction_metric  # noqa: F401 (re-exported)

VERIFIED_SUFFIX = ".verified.json"
NOISE_FAMILY = "none"  # the `none` method: the reference timed against itself, i.e. the noise floor


@dataclass
class Loaded:
    """A results tree as read: valid records with their relative paths, and the files left out (and why)."""

    results: list = field(default_factory=list)  # [(Result, relpath: str, verified: bool)], stably ordered
    invalid: list = field(default_factory=list)  # [bench.store.InvalidResult], broken .verified.json files too
    verified_files: dict = field(default_factory=dict)  # result relpath -> its .verified.json Path (sound ones)
    unverified: dict = field(default_factory=dict)  # result relpath -> why its sound verification verifies nothing
    # result relpath -> (state, details) from `verification_status`, for every record: what its run page shows
    verification: dict = field(default_factory=dict)


def result_files(root: Path) -> list[Path]:
    """The result JSON files under `root`, without verification records (`<run-id>.verified.json`)."""
    from bench.store import iter_result_files

    return [p for p in iter_result_files(root) if not p.name.endswith(VERIFIED_SUFFIX)]


def load_tree(root: Path) -> Loaded:
    """Read and validate every result under `root`. A result is verified only when `<run-id>.verified.json`
    beside it is a sound verification of it as it is now (`verification_status`); the file's existence alone
    proves nothing (an empty one used to mark a record verified)."""
    from bench.store import InvalidResult, load_result

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    out = Loaded()
    for p in result_files(root):
        try:
            r = load_result(p)  # the location check below is load_result's own, without resolving paths
        except InvalidResult as e:
            out.invalid.append(e)
            continue
        rel, where = r.relpath().as_posix(), p.relative_to(root).as_posix()
        if where != rel:
            out.invalid.append(InvalidResult(p, [f"file is at {where} but its fields place it at {rel}"]))
            continue
        marker = p.with_name(p.name[: -len(".json")] + VERIFIED_SUFFIX)
        state, reasons = verification_status(marker, r, p.name)
        if state == "verified":
            out.verified_files[rel] = marker
        elif state == "forced":
            out.unverified[rel] = reasons
        elif state == "rejected":
            out.invalid.append(InvalidResult(marker, [f"not shown as verifying {rel}: " + "; ".join(reasons)]))
        out.verification[rel] = (state, reasons)
        out.results.append((r, rel, state == "verified"))
    out.results.sort(key=lambda t: (t[0].task.name, t[0].profile.name, t[0].method.name, t[0].created_at,
                                    t[0].run_id))
    return out


def verification_status(marker: Path, record, result_file: str) -> tuple[str, list[str]]:
    """(state, details) of the verification file `marker` beside `record`, judged, never trusted:
    "none" (no file), "verified" (`bench.reproduce.verification_problems` finds nothing, not forced; details:
    the differences it recorded as warnings, e.g. a package the task and method do not import), "forced"
    (sound, but reproduced past version differences: it shows the configuration runs, not that its numbers
    repeat, so the record is shown as not verified; details: why, then each difference it was forced past, then
    its warnings) or "rejected" (unreadable, not a verification, of another record, failed checks, or a re-run
    that does not support the record as it is now; details: the reasons). Never raises on a broken file: that is
    a reason like any other."""
    import os

    from bench.reproduce import InvalidVerification, load_verification, verification_problems

    if not os.path.lexists(marker):
        return "none", []
    try:
        v = load_verification(marker)
    except InvalidVerification as e:
        return "rejected", [f"not a verification record ({x})" for x in e.problems]
    problems = verification_problems(v, record, result_file)
    if problems:
        return "rejected", problems
    if v.forced:
        return "forced", [f"reproduced with --force past version differences in what its numbers depend on "
                          f"({len(v.version_differences) or 'none listed'}): that shows the configuration runs "
                          f"here, not that its numbers repeat", *v.version_differences, *v.warnings]
    return "verified", list(v.warnings)


def num(x: Any) -> float | None:
    """A finite float, or None (JSON has no NaN or infinity, and the browser's JSON.parse rejects them)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def hp_text(hp: dict[str, Any]) -> str:
    """Hyper-parameters on one line: `T=4, alpha=0.5`, in the record's own key order."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, sort_keys=True)}" for k, v in hp.items())


def to_row(r, rel: str, verified: bool, verification: str | None = None) -> dict[str, Any]:
    """One result flattened for tables, the plot and downloads (status 'ok' records only). `verification`:
    "verified", "forced" or "none" (a rejected file verifies nothing), from `Loaded.verification`."""
    q, s = r.quality, r.speed
    dlo, dhi = (q.delta_interval.low, q.delta_interval.high) if q.delta_interval else (q.delta, q.delta)
    slo, shi = s.interval.low, s.interval.high
    con = s.contention
    return {
        "id": r.run_id, "file": rel, "page": "runs/" + rel[: -len(".json")] + ".html",
        "task": r.task.name, "tier": r.task.tier, "profile": r.profile.name, "matched": r.profile.matched,
        "method": r.method.name, "family": r.method.family, "hp": r.method.hyperparameters,
        "hps": hp_text(r.method.hyperparameters), "seed": r.seed,
        "metric": q.metric, "hib": q.higher_is_better, "value": num(q.value), "ref": num(q.reference_value),
        "delta": num(q.delta), "dlo": num(dlo), "dhi": num(dhi),
        "speedup": num(s.speedup), "slo": num(slo), "shi": num(shi),
        "speed_ok": s.status == "ok", "speed_status": s.status, "speed_reasons": list(s.reasons),
        "precision": num(s.precision), "precision_target": num(s.precision_target),
        "other_share": num(con.other_cpu_share) if con else None, "remeasured": s.remeasured is not None,
        "noise": r.method.family == NOISE_FAMILY,
        "mem": r.memory.method_peak_bytes, "mem_ref": r.memory.reference_peak_bytes,
        "params": r.size.method.parameters, "nonzero": r.size.method.nonzero_parameters,
        "bytes": r.size.method.bytes, "cost_s": num(r.cost.seconds), "verified": verified,
        "verification": (verification if verification in ("verified", "forced")
                         else "verified" if verified else "none"),
        "date": r.created_at[:10], "created_at": r.created_at, "command": r.provenance.command,
    }


def rows_of(loaded: Loaded) -> list[dict[str, Any]]:
    """Rows of the records the leaderboard shows: full-budget, status 'ok', finite quality delta and speedup.
    (A `--budget smoke` record is a CI check of capped training, never a leaderboard number.) Rows with an
    unreliable speed and the noise-floor rows are included: `rankable` tells which rows may be ranked."""
    rows = []
    for r, rel, verified in loaded.results:
        if r.status != "ok" or r.budget != "full":
            continue
        row = to_row(r, rel, verified, loaded.verification.get(rel, ("none",))[0])
        if row["delta"] is None or row["speedup"] is None:
            continue
        rows.append(row)
    return rows


def is_noise_floor(row: dict[str, Any]) -> bool:
    """The `none` method's row: the reference timed against itself, shown as the noise floor, never ranked."""
    return row["family"] == NOISE_FAMILY


def rankable(row: dict[str, Any]) -> bool:
    """Whether a row may be ranked, be on a Pareto front or be recommended: a reliable speed, not the noise
    floor. (Its quality is shown either way.)"""
    return row["speed_ok"] is True and not is_noise_floor(row)


def unreliable_text(row: dict[str, Any]) -> str:
    """Why a row's speed is unreliable, on one line (empty when it is reliable)."""
    if row["speed_ok"]:
        return ""
    return "unreliable speed: " + ("; ".join(row["speed_reasons"]) or "no reason recorded")


def noise_floor(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The noise-floor row among `rows` (one task and profile): the latest `none` run with a reliable speed,
    else the latest `none` run; None when there is none."""
    noise = [r for r in rows if is_noise_floor(r)]
    if not noise:
        return None
    return max(noise, key=lambda r: (r["speed_ok"], r["created_at"], r["id"]))


def noise_floor_command(task: str, profile: str) -> str:
    return f"bench run --method none --task {task} --profile {profile}"


def goodness(row: dict[str, Any]) -> float:
    """The quality change with its sign turned so that larger is always better."""
    return row["delta"] if row["hib"] else -row["delta"]


def goodness_interval(row: dict[str, Any]) -> tuple[float, float]:
    lo = row["dlo"] if row["dlo"] is not None else row["delta"]
    hi = row["dhi"] if row["dhi"] is not None else row["delta"]
    return (lo, hi) if row["hib"] else (-hi, -lo)


def dominated_by_reference(row: dict[str, Any]) -> bool:
    """Whether the unmodified reference (1x, no quality change) dominates the row: no faster and no better,
    and worse in one. Not compressing at all is always an option, so such a row is never on a front."""
    g = goodness(row)
    return row["speedup"] <= 1.0 and g <= 0.0 and (row["speedup"] < 1.0 or g < 0.0)


def pareto_front(rows: list[dict[str, Any]]) -> set[int]:
    """Indices of the rows no other row dominates (at least as fast and as good, strictly better in one),
    on the point estimates of speedup and quality change. The reference itself (1x, no change) counts as a
    point: a row it dominates is not on the front. Callers pass the rows that may be ranked (`rankable`)."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["speedup"])
    front: set[int] = set()
    best = -math.inf  # best goodness among strictly faster rows
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and rows[order[j]]["speedup"] == rows[order[i]]["speedup"]:
            j += 1
        group = order[i:j]
        gmax = max(goodness(rows[k]) for k in group)
        if gmax > best:
            front.update(k for k in group if goodness(rows[k]) == gmax)
            best = gmax
        i = j
    return {k for k in front if not dominated_by_reference(rows[k])}


def tied_ranks(intervals: list[tuple[float, float]]) -> list[int]:
    """Rank = 1 + the number of rows whose whole interval lies above this row's (larger is better).

    Rows whose intervals overlap cannot be told apart, so a rank counts only the rows that are better beyond
    doubt: it is not a strict order, and two rows with separated intervals never share a rank.
    """
    lows = sorted(lo for lo, _ in intervals)
    n = len(lows)
    return [1 + n - bisect.bisect_right(lows, hi) for _, hi in intervals]


def overlapping(intervals: list[tuple[float, float]]) -> list[list[int]]:
    """For each interval, the indices of the others it overlaps (shares at least one point with): the rows it
    cannot be told apart from. This, and only this, is what a tie mark ('=') means, on the site and in
    `bench recommend`; a rank alone says how many rows are better beyond doubt (`tied_ranks`)."""
    return [[j for j, (lo2, hi2) in enumerate(intervals) if j != i and lo2 <= hi and lo <= hi2]
            for i, (lo, hi) in enumerate(intervals)]


def speed_interval(row: dict[str, Any]) -> tuple[float, float]:
    lo = row["slo"] if row["slo"] is not None else row["speedup"]
    hi = row["shi"] if row["shi"] is not None else row["speedup"]
    return lo, hi


def measured_speedup(row: dict[str, Any]) -> bool:
    """Whether the row is faster than the reference beyond doubt: its whole speedup interval lies above 1x.
    An interval that includes 1.0 (or lies below it) is "no measured speedup", however large its point
    estimate (toca at 1.84x [0.75, 1.97] cannot be told from the reference)."""
    return speed_interval(row)[0] > 1.0


def drop(row: dict[str, Any]) -> float:
    """The quality lost, in the metric's units (negative when the method improved quality)."""
    return -goodness(row)


def allowed_loss(row: dict[str, Any], budget: Budget) -> float:
    return budget.allowed(row["ref"] if row["ref"] is not None else 0.0)


def within(row: dict[str, Any], budget: Budget) -> bool:
    """The point estimate of the quality loss is within the budget."""
    return drop(row) <= allowed_loss(row, budget) + 1e-12


# Where a row stands under a budget, in the order the task page lists them (the noise floor is pinned first).
STANDINGS = ("noise", "ranked", "no-speedup", "unreliable", "outside")
STANDING_TEXT = {
    "noise": "noise floor: the reference timed against itself, never ranked",
    "ranked": "within the budget, with a measured speedup: ranked by speed",
    "no-speedup": "within the budget, but no measured speedup: the speedup's 95% interval includes 1x or lies below",
    "unreliable": "within the budget, but its speed is unreliable (contended, imprecise or unstable timing)",
    "outside": "loses more quality than the budget allows",
}


def standing(row: dict[str, Any], budget: Budget) -> str:
    """One of `STANDINGS`. Quality is judged first (a method outside the budget is not a candidate however fast),
    then whether the speed can be trusted, then whether there is a speedup at all. Only "ranked" rows are ranked
    or recommended."""
    if is_noise_floor(row):
        return "noise"
    if not within(row, budget):
        return "outside"
    if not row["speed_ok"]:
        return "unreliable"
    return "ranked" if measured_speedup(row) else "no-speedup"


def rank_within(rows: Iterable[dict[str, Any]], budget: Budget) -> list[dict[str, Any]]:
    """Every row with its place under `budget`: each gains `standing`, `allowed` (the budget in metric units)
    and `sure` (even the pessimistic end of the quality interval is within the budget); "ranked" rows also gain
    `rank` (`tied_ranks` on the speedup intervals, among ranked rows only) and `tied_with` (the methods of the
    ranked rows whose speedup intervals overlap this one's, `overlapping`). Ordered as the page lists them:
    by standing, then fastest first within "ranked", "no-speedup" and "unreliable", smallest loss first
    "outside"."""
    out = []
    for row in rows:
        allowed = allowed_loss(row, budget)
        worst = -goodness_interval(row)[0]
        out.append({**row, "standing": standing(row, budget), "allowed": allowed,
                    "sure": worst <= allowed + 1e-12, "rank": None, "tied_with": []})
    out.sort(key=lambda r: (STANDINGS.index(r["standing"]),
                            drop(r) if r["standing"] == "outside" else -r["speedup"],
                            -r["speedup"], r["method"], r["id"]))
    ranked = [r for r in out if r["standing"] == "ranked"]
    ivs = [speed_interval(r) for r in ranked]
    for r, rank, tied in zip(ranked, tied_ranks(ivs), overlapping(ivs)):
        r["rank"] = rank
        r["tied_with"] = [f"{ranked[j]['method']} ({ranked[j]['hps'] or 'defaults'})" for j in tied]
    return out


def tie_text(row: dict[str, Any]) -> str:
    """What a rank and its '=' mean, for one ranked row (the task page's tooltip and `bench recommend`)."""
    better = row["rank"] - 1
    text = (f"rank {row['rank']}: {better} result{'s are' if better != 1 else ' is'} faster beyond doubt (a 95% "
            f"interval wholly above this one's)")
    if row["tied_with"]:
        text += (f"; = tied: its interval overlaps {len(row['tied_with'])} other ranked result"
                 f"{'s' if len(row['tied_with']) != 1 else ''} ({', '.join(row['tied_with'])}), which it cannot be "
                 f"told apart from")
    return text


def recommend(rows: Iterable[dict[str, Any]], budget: Budget) -> list[dict[str, Any]]:
    """The rows a user may pick under `budget`: within it, with a reliable and measured speedup (the speedup's
    interval wholly above 1x), fastest first, with `rank`, `tied_with`, `allowed` and `sure` (`rank_within`).
    The noise floor, unreliable speeds and methods with no measured speedup are never recommended."""
    return [r for r in rank_within(rows, budget) if r["standing"] == "ranked"]


def left_out(rows: Iterable[dict[str, Any]], budget: Budget, which: str) -> list[dict[str, Any]]:
    """The rows of one standing ("no-speedup", "unreliable", "outside"), in `rank_within`'s order: what a
    recommendation did not pick and why."""
    return [r for r in rank_within(rows, budget) if r["standing"] == which]


def unreliable_within(rows: Iterable[dict[str, Any]], budget: Budget) -> list[dict[str, Any]]:
    """The rows within the budget that `recommend` leaves out because their speed is unreliable (the noise
    floor aside), fastest first: what a recommendation would have weighed had they been timed reliably."""
    return left_out(rows, budget, "unreliable")


def family_best(rows: Iterable[dict[str, Any]], budgets: dict[str, Budget]) -> dict[tuple[str, str], dict]:
    """The equal-quality view: for each (family, task), the fastest recommended row of that family on that task
    under the task's budget (`budgets[task]`). Rows are one profile's; a family with no pick is absent."""
    by: dict[tuple[str, str], list] = {}
    for r in rows:
        if not is_noise_floor(r):
            by.setdefault((r["family"], r["task"]), []).append(r)
    out = {}
    for key, frows in sorted(by.items()):
        picks = recommend(frows, budgets[key[1]])
        if picks:
            out[key] = picks[0]
    return out


def sorted_unique(values: Iterable[Any]) -> list[Any]:
    return sorted(set(values))
