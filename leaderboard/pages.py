"""What each page shows: plain dicts and strings built from result records, and the number formats.

The templates only lay these out; jinja2 escapes every string. Nothing here reads the clock or the disk.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from bench.formats import (fbytes, fcount, fdelta, fdivergence, ffidelity, fmem, fq, fratio, fsecs,  # noqa: F401
                           fshare, fspeed)  # one formatter per quantity; static/task.js follows the same rules
from leaderboard import data as D

FAMILY_ORDER = ("distillation", "caching", "pruning", "decoding", "quantization", "none")


def safe_url(u: str | None) -> str:
    """Only http(s) links from result files become hrefs; anything else (javascript:, data:) stays text."""
    return u if isinstance(u, str) and u.lower().startswith(("https://", "http://")) else ""


FILTERS = {"fq": fq, "fdelta": fdelta, "fspeed": fspeed, "fbytes": fbytes, "fsecs": fsecs, "fcount": fcount,
           "fmem": fmem, "fshare": fshare, "safe_url": safe_url}


def _family_key(f: str) -> tuple[int, str]:
    return (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER), f)


def _ref_text(values: list[float], metric: str) -> str:
    return " / ".join(fq(v, metric) for v in sorted(set(values)))


def fspeed_ci(v: float | None, lo: float | None, hi: float | None) -> str:
    return f"{fspeed(v)} [{fspeed(lo)}, {fspeed(hi)}]"


def noise_floor_view(task: str, profile: str, rows: list[dict]) -> dict[str, Any]:
    """The noise floor of one task and profile, for the task page, the home card and `bench recommend`."""
    row = D.noise_floor(rows)
    out = {"profile": profile, "command": D.noise_floor_command(task, profile), "row": row}
    if row is None:
        out["text"] = f"no noise-floor record yet: {out['command']}"
        return out
    n = sum(1 for r in rows if D.is_noise_floor(r))
    out.update(speed=fspeed_ci(row["speedup"], row["slo"], row["shi"]), ok=row["speed_ok"],
               reasons=list(row["speed_reasons"]), page=row["page"], n=n,
               text=f"Noise floor (reference vs itself): {fspeed_ci(row['speedup'], row['slo'], row['shi'])}"
               + ("" if row["speed_ok"] else f" (unreliable: {'; '.join(row['speed_reasons'])})"))
    return out


def budget_control(metric: str, default: str) -> dict[str, Any]:
    """The task page's budget control: the task's default budget and the units that make sense for its metric."""
    b = D.parse_budget(default, metric)
    unit = "%" if b.relative else ("pp" if b.label.endswith(" pp") else metric.lower())
    amount = b.amount if b.relative else (b.amount * 100 if unit == "pp" else b.amount)
    units = [{"value": "%", "text": "% of the reference"}]
    if D.is_fraction_metric(metric):
        units.append({"value": "pp", "text": "pp (absolute)"})
    else:
        units.append({"value": metric.lower(), "text": f"{metric} (absolute)"})
    return {"default": f"{amount:g}{unit}", "amount": f"{amount:g}", "unit": unit, "units": units}


def task_budget(spec: Any, metric: str) -> D.Budget:
    """The budget a task declares (`register_task(quality_budget=...)`), 1% relative when it declares none or
    cannot be read from the registry."""
    try:
        return D.parse_budget(getattr(spec, "quality_budget", "1%") or "1%", metric)
    except D.BudgetError:
        return D.parse_budget("1%")


# --- home ---------------------------------------------------------------------------------------------------
def task_card(task: str, records: list, rows: list[dict], spec: Any) -> dict[str, Any]:
    """A task's card on the home page: per profile, the fastest pick of each family within the task's budget
    (`D.recommend`: a reliable, measured speedup), or why a family has none."""
    tiers = Counter(r.task.tier for r, _, _ in records)
    metric = rows[0]["metric"] if rows else (spec.metric if spec else "")
    budget = task_budget(spec, metric)
    profiles = []
    for prof in D.sorted_unique(r.profile.name for r, _, _ in records):
        prow = [x for x in rows if x["profile"] == prof]
        best = []
        for fam in sorted({x["family"] for x in prow} - {D.NOISE_FAMILY}, key=_family_key):
            placed = D.rank_within([x for x in prow if x["family"] == fam], budget)
            picks = [x for x in placed if x["standing"] == "ranked"]
            if picks:
                best.append(picks[0])
            else:  # why none: how many fit the budget but have no measured or no reliable speedup
                n = Counter(x["standing"] for x in placed)
                best.append({"family": fam, "method": None, "no_speedup": n["no-speedup"],
                             "unreliable": n["unreliable"], "outside": n["outside"]})
        profiles.append({"name": prof, "n": len(prow), "best": best,
                         "n_ranked": sum(1 for x in prow if D.rankable(x)),
                         "n_unreliable": sum(1 for x in prow if not x["speed_ok"] and not D.is_noise_floor(x)),
                         "noise": noise_floor_view(task, prof, prow),
                         "n_failed": sum(1 for r, _, _ in records if r.profile.name == prof and r.status != "ok"),
                         "reference": _ref_text([x["ref"] for x in prow if x["ref"] is not None], metric)})
    control = budget_control(metric, getattr(spec, "quality_budget", "1%") if spec else "1%")
    return {"name": task, "tier": sorted(tiers, key=lambda t: (-tiers[t], t))[0], "metric": metric,
            "hib": rows[0]["hib"] if rows else (spec.higher_is_better if spec else True),
            "summary": spec.summary if spec else "", "modality": records[0][0].task.modality,
            "profiles": profiles, "n": len(records), "budget": str(budget), "budget_text": control["default"]}


def _family_fits() -> set[tuple[str, str]] | None:
    """(family, task) pairs where at least one registered method of the family fits the task; None when the
    registries cannot be loaded."""
    try:
        from bench.tables import compatibility

        tasks, methods, cells = compatibility()
    except Exception:  # noqa: BLE001 - the site can be built from results alone
        return None
    return {(m.family, t.name) for m in methods for t in tasks if cells[m.name, t.name] == ""}


def family_view(rows: list[dict], task_specs: dict) -> list[dict[str, Any]]:
    """The equal-quality view, "which technique should I try first?": per profile, for each family and task, the
    fastest pick of that family within the task's own budget (`D.family_best`), or why there is none."""
    out = []
    for prof in D.sorted_unique(r["profile"] for r in rows):
        prow = [r for r in rows if r["profile"] == prof]
        tasks = D.sorted_unique(r["task"] for r in prow)
        metric = {t: next(r["metric"] for r in prow if r["task"] == t) for t in tasks}
        budgets = {t: task_budget(task_specs.get(t), metric[t]) for t in tasks}
        best = D.family_best(prow, budgets)
        families = sorted({r["family"] for r in prow} - {D.NOISE_FAMILY}, key=_family_key)
        fits = _family_fits()
        lines = []
        for fam in families:
            cells = []
            for t in tasks:
                b = best.get((fam, t))
                tried = sum(1 for r in prow if r["family"] == fam and r["task"] == t)
                cells.append({"task": t, "pick": b, "tried": tried, "metric": metric[t],
                              "applies": fits is None or (fam, t) in fits})
            lines.append({"family": fam, "cells": cells, "n": sum(1 for c in cells if c["pick"])})
        out.append({"profile": prof, "tasks": [{"name": t, "budget": str(budgets[t]), "metric": metric[t]}
                                               for t in tasks], "families": lines})
    return out


# --- task page ----------------------------------------------------------------------------------------------
def task_page(card: dict, rows: list[dict], method_specs: dict) -> dict[str, Any]:
    profiles = [p["name"] for p in card["profiles"] if p["n"]] or [p["name"] for p in card["profiles"]]
    counts = Counter(x["profile"] for x in rows)
    default = sorted(profiles, key=lambda p: (-counts[p], p))[0] if profiles else ""
    families = sorted({x["family"] for x in rows}, key=_family_key)
    methods = D.sorted_unique(x["method"] for x in rows)
    tiers = D.sorted_unique(x["tier"] for x in rows)
    keep = ("id", "file", "page", "tier", "profile", "matched", "method", "family", "hp", "hps", "seed", "value",
            "ref", "delta", "dlo", "dhi", "speedup", "slo", "shi", "speed_ok", "speed_reasons", "precision",
            "noise", "mem", "mem_ref", "params", "nonzero", "bytes", "cost_s", "verified", "date", "created_at")
    noise = [p["noise"] for p in card["profiles"] if p["name"] in profiles]
    budget = budget_control(card["metric"], card["budget_text"])
    payload = {"task": card["name"], "metric": card["metric"], "hib": card["hib"], "budget": budget["default"],
               "units": [u["value"] for u in budget["units"]],
               "pct": D.is_fraction_metric(card["metric"]), "profiles": profiles, "default_profile": default,
               "families": families, "methods": methods, "tiers": tiers,
               "noise": {nf["profile"]: nf["row"]["id"] if nf["row"] else None for nf in noise},
               "rows": [{k: x[k] for k in keep} for x in rows]}
    return {"task": card, "profiles": profiles, "default_profile": default, "families": families,
            "methods": methods, "tiers": tiers, "noise": noise, "budget": budget, "data": payload}


# --- method pages -------------------------------------------------------------------------------------------
def method_page(name: str, records: list, spec: Any) -> dict[str, Any]:
    latest = max(records, key=lambda t: (t[0].created_at, t[0].run_id))[0].method
    hp_sets = Counter(json.dumps(r.method.hyperparameters, sort_keys=True) for r, _, _ in records)
    results = []
    for r, rel, verified in sorted(records, key=lambda t: (t[0].task.name, t[0].profile.name, t[0].created_at,
                                                           t[0].run_id)):
        item = {"task": r.task.name, "profile": r.profile.name, "status": r.status, "seed": r.seed,
                "hps": D.hp_text(r.method.hyperparameters), "verified": verified, "date": r.created_at[:10],
                "page": "runs/" + rel[: -len(".json")] + ".html", "file": rel}
        if r.status == "ok":
            q, s = r.quality, r.speed
            item.update(metric=q.metric, value=D.num(q.value), delta=D.num(q.delta),
                        dlo=D.num(q.delta_interval.low) if q.delta_interval else None,
                        dhi=D.num(q.delta_interval.high) if q.delta_interval else None,
                        speedup=D.num(s.speedup), slo=D.num(s.interval.low), shi=D.num(s.interval.high),
                        speed_ok=s.status == "ok", speed_reasons=list(s.reasons),
                        noise=r.method.family == D.NOISE_FAMILY)
        else:
            item.update(metric="", error=f"{r.error.type}: {r.error.message}" if r.error else "")
        results.append(item)
    return {"name": name, "family": latest.family, "paper": latest.paper, "year": latest.year,
            "url": safe_url(latest.url) or safe_url(spec.url if spec else ""), "url_text": latest.url,
            "summary": spec.summary if spec else "", "version": latest.version,
            "modalities": list(spec.modalities) if spec else [],
            "hp_sets": [(D.hp_text(json.loads(h)), c) for h, c in sorted(hp_sets.items())],
            "hp_keys": D.sorted_unique(k for r, _, _ in records for k in r.method.hyperparameters),
            "results": results, "tasks": D.sorted_unique(x["task"] for x in results)}


def compatibility_view() -> dict[str, Any] | None:
    """The methods x tasks table of the methods page, from the registries (`bench.tables.compatibility`);
    None when the registries cannot be loaded (the site can be built from results alone)."""
    try:
        from bench.tables import compatibility

        tasks, methods, cells = compatibility()
    except Exception:  # noqa: BLE001
        return None
    rows = [{"name": m.name, "family": m.family,
             "cells": [{"state": "yes" if cells[m.name, t.name] == "" else ("needs" if cells[m.name, t.name]
                                                                           else "other"),
                        "text": cells[m.name, t.name] or ""} for t in tasks]} for m in methods]
    return {"tasks": [{"name": t.name, "tier": t.tier, "modality": t.modality} for t in tasks], "rows": rows}


# --- run pages ----------------------------------------------------------------------------------------------
def _pairs(d: dict[str, Any], skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in d.items() if k not in skip]


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def speed_verdict(r) -> dict[str, Any]:
    """The speed figure's verdict for the run page: status, reasons, precision, contention, attempts."""
    s = r.speed
    facts: list[tuple[str, str]] = []
    if s.precision is not None:
        target = f" (target ±{s.precision_target:.1%})" if s.precision_target is not None else ""
        facts.append(("precision", f"±{s.precision:.1%} relative half-width of the interval{target}"))
    c = s.contention
    if c is not None:
        facts.append(("other processes", f"{_share(c.other_cpu_share)} of the {c.cpus} CPUs during "
                      f"{fsecs(c.wall_s)} of timing (limit {c.limit:.0%})"))
        if c.steal_share is not None:
            facts.append(("CPU steal", _share(c.steal_share)))
        if c.load_average_1m is not None:
            facts.append(("load average (1 min)", f"{c.load_average_1m:.2f}"))
        if c.gpu_other_processes is not None:
            facts.append(("other GPU processes", str(c.gpu_other_processes)))
        if c.gpu_sm_clock_mhz_min is not None and c.gpu_sm_clock_mhz_max is not None:
            top = f" (top {c.gpu_sm_clock_max_mhz} MHz)" if c.gpu_sm_clock_max_mhz is not None else ""
            facts.append(("GPU SM clock", f"{c.gpu_sm_clock_mhz_min}–{c.gpu_sm_clock_mhz_max} MHz{top}"))
    if s.processes > 1:
        facts.append(("worker processes", f"{s.processes} (pairs pooled)"))
    if s.remeasured is not None:
        m = s.remeasured
        facts.append(("re-timed", f"{m.at} by `{m.command}` (bench {m.bench_version})"))
    attempts = [{"speed": fspeed_ci(a.speedup, a.interval.low, a.interval.high), "pairs": a.pairs,
                 "other": _share(a.other_cpu_share), "status": a.status, "reasons": "; ".join(a.reasons)}
                for a in s.attempts]
    return {"ok": s.status == "ok", "status": s.status, "reasons": list(s.reasons),
            "speed": fspeed_ci(s.speedup, s.interval.low, s.interval.high), "facts": facts, "attempts": attempts}


def verification_view(verified: bool, verification: tuple[str, list[str]] | None = None) -> dict[str, Any]:
    """What the run page says about a record's verification (`data.verification_status`'s state and details):
    "verified" (with the differences it was verified past, as warnings), "forced" (reproduced with --force past
    version differences: shown as such, never as verified, with the differences), or "unverified" (no file, or
    one that verifies nothing, which `bench leaderboard build` names)."""
    state, details = verification or ("verified" if verified else "none", [])
    if state == "verified":
        return {"state": "verified", "label": "verified", "css": "ok", "differences": list(details),
                "text": "Reproduced by bench reproduce: same quality, speed within the re-run's interval"
                        + (", past these differences, which do not refuse a reproduction (packages the task and "
                           "method do not import, or the pinned environment):" if details else ".")}
    if state == "forced":
        return {"state": "forced", "label": "forced", "css": "warn", "differences": list(details[1:]),
                "text": (details[0][:1].upper() + details[0][1:] if details else "Reproduced with --force")
                        + ". The differences:"}
    return {"state": "none", "label": "unverified", "css": "muted", "differences": [],
            "text": "Not verified: the command below reproduces it and writes its verification."}


def run_page(r, rel: str, verified: bool, raw: str, verification: tuple[str, list[str]] | None = None
             ) -> dict[str, Any]:
    """The run page's context; `verification`: `Loaded.verification`'s (state, details) for this record."""
    check = verification_view(verified, verification)
    metric = r.quality.metric if r.quality else ""
    compare = []  # (what, reference, method, change, css class)
    verdict = speed_verdict(r) if r.status == "ok" and r.speed else None
    if r.status == "ok":
        q, s, m, z, c = r.quality, r.speed, r.memory, r.size, r.cost
        ci = (f" [{fdelta(q.delta_interval.low, metric)}, {fdelta(q.delta_interval.high, metric)}]"
              if q.delta_interval else "")
        compare.append((q.metric, fq(q.reference_value, metric), fq(q.value, metric), fdelta(q.delta, metric) + ci,
                        ""))
        if r.fidelity:
            compare.append((r.fidelity.metric, "", ffidelity(r.fidelity.value, r.fidelity.metric),
                            fdivergence(r.fidelity.divergence), ""))
        for ctl in r.controls:
            gi = ctl.gain_interval
            gain = (f"method - control {fdelta(q.value - ctl.value, metric)} [{fdelta(gi.low, metric)}, "
                    f"{fdelta(gi.high, metric)}]; " if gi else "")
            compare.append((f"control: {ctl.name}", "", fq(ctl.value, metric), gain + ctl.description, ""))
        compare.append((f"time per call ({s.unit})", f"{s.reference.median_s * 1e3:.3f} ms",
                        f"{s.method.median_s * 1e3:.3f} ms",
                        f"speedup {fspeed(s.speedup)} [{fspeed(s.interval.low)}, {fspeed(s.interval.high)}] "
                        f"(n={s.reference.n}, {s.order})"
                        + ("" if s.status == "ok" else " — unreliable: " + "; ".join(s.reasons)),
                        "" if s.status == "ok" else "unreliable"))
        compare.append(("peak memory", fbytes(m.reference_peak_bytes), fmem(m.method_peak_bytes, m.reference_peak_bytes),
                        m.measure, ""))
        compare.append(("parameters (non-zero)", f"{z.reference.parameters:,} ({z.reference.nonzero_parameters:,})",
                        f"{z.method.parameters:,} ({z.method.nonzero_parameters:,})",
                        f"sparsity {z.sparsity:.1%}" + ("" if z.runtime_exploits_sparsity or z.sparsity == 0
                                                        else " (not exploited by the runtime)"), ""))
        compare.append(("serialized size", fbytes(z.reference.bytes), fbytes(z.method.bytes), "", ""))
        if r.compute:
            compare.append((f"{r.compute.unit} per call", fcount(r.compute.reference), fcount(r.compute.method),
                            f"{fratio(r.compute.method, r.compute.reference)} the reference's", ""))
        tokens = f", {c.tokens_seen:,} tokens" if c.tokens_seen is not None else ""
        compare.append(("training / calibration", "", f"{fsecs(c.seconds)}, {c.steps:,} steps, "
                        f"{c.samples_seen:,} samples{tokens}", c.description, ""))
    p, d = r.provenance, json.loads(raw)  # the record as written: every field, in the file's order
    sections = [
        ("Run", [("run id", r.run_id), ("created", r.created_at), ("status", r.status), ("seed", str(r.seed)),
                 ("verified", check["label"])]),
        ("Task", _pairs(d["task"])),
        ("Method", _pairs(d["method"], skip=("hyperparameters",))),
        ("Hyper-parameters", _pairs(d["method"]["hyperparameters"])),
        ("Profile", _pairs(d["profile"], skip=("detected",))),
        ("Detected machine", _pairs(d["profile"]["detected"])),
        ("Provenance", [("command", p.command), ("git sha", p.git_sha or "(not a git checkout)"),
                        ("git dirty", json.dumps(p.git_dirty)), ("bench version", p.bench_version),
                        ("config hash", p.config_hash), ("python", p.python), ("platform", p.platform),
                        ("lock", f"{p.lock.name}, pins sha256 {p.lock.sha256}, install "
                                 f"{'matched' if p.lock.matched else 'differed: ' + '; '.join(p.lock.differences)}"
                         if p.lock else "(none: made before bench pinned its environment)")]),
        ("Packages", sorted(p.packages.items())),
        *([("Packages the task and method import", sorted(p.imported_packages.items()))]
          if p.imported_packages is not None else []),
    ]
    return {"r": r, "rel": rel, "file": "results/" + rel, "verified": verified, "metric": metric,
            "reproduce": f"bench reproduce results/{rel}", "command": p.command, "compare": compare,
            "sections": sections, "raw": raw, "method_url": safe_url(r.method.url), "verdict": verdict,
            "verification": check,
            "noise_floor": r.method.family == D.NOISE_FAMILY,
            "noise_command": D.noise_floor_command(r.task.name, r.profile.name)}
