"""Markdown results tables generated from the result records, for the README (`bench report`).

Every figure in the README's results block comes from the JSON records under `results/`, so it cannot drift
from them: `bench report --write-readme README.md` rewrites the block between the markers below, and
`bench report --check-readme README.md` (and a test) fail when the block differs from what the records say.

One table per (profile, task), rows in a stable order (family, method, the hyper-parameters that tell two
records of a method apart, seed, run id). The output depends only on the records and on the path given as the
results root (it is the prefix of each row's link to its record), never on the machine or the clock.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from bench import formats
from bench.result import Result
from bench.store import InvalidResult, iter_result_files, load_result

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"
FAMILY_ORDER = ("distillation", "caching", "pruning", "decoding", "quantization", "none")  # bench.registry.FAMILIES
METRIC_LABEL = {"top1_accuracy": "top-1", "exact_match": "exact match", "accuracy": "accuracy", "fid": "FID",
                "vqa_accuracy": "VQA accuracy"}


class MarkerError(ValueError):
    """The text lacks the results markers, or holds them out of order or more than once."""


# --- number formatting, by metric ------------------------------------------------------------------------


def is_percent_metric(metric: str) -> bool:
    """Fractions shown as percentages (deltas in percentage points): accuracies, exact match, agreement."""
    return formats.is_fraction_metric(metric)


def fmt_value(v: float, metric: str) -> str:
    return formats.fq(v, metric)


def fmt_delta(v: float, metric: str, unit: bool = True) -> str:
    return formats.fdelta(v, metric, unit)


def fmt_delta_with_interval(delta: float, interval: Any, metric: str) -> str:
    text = fmt_delta(delta, metric)
    if interval is not None:
        text += f" [{fmt_delta(interval.low, metric, unit=False)}, {fmt_delta(interval.high, metric, unit=False)}]"
    return text


def fmt_speed(r: Result) -> str:
    s = r.speed
    text = (f"{formats.fspeed(s.speedup, 'x')} [{formats.fspeed(s.interval.low, '')}, "
            f"{formats.fspeed(s.interval.high, '')}]")
    return text if s.status == "ok" else f"{text} (unreliable)"


def fmt_compute(r: Result) -> str:
    c = r.compute
    if c is None or c.reference <= 0:
        return ""
    ratio = c.method / c.reference
    text = f"{ratio:.3f}" if ratio >= 0.001 or ratio == 0 else f"{ratio:.2e}"
    return text if c.unit == "MACs" else f"{text} ({c.unit})"


def fmt_params(r: Result) -> str:
    m = r.size.method
    text = f"{m.parameters:,}"
    if m.nonzero_parameters < 0.99 * m.parameters:  # only real sparsity, not the odd zero entry
        text += f" ({m.nonzero_parameters:,} non-zero)"
    return text


def fmt_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.1f} s"
    return f"{s:.2f} s"


def _fmt_fidelity(value: float, metric: str) -> str:
    return formats.ffidelity(value, metric)


def _fmt_secondary(value: float, name: str) -> str:
    return f"{value * 100:.1f}%" if is_percent_metric(name) else f"{value:.4g}"


def _hp_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _hp_sort_key(v: Any) -> tuple:
    if isinstance(v, bool):
        return (1, int(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (2, 0.0, _hp_value(v))


_MISSING = object()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- loading and labelling --------------------------------------------------------------------------------


def load_records(results_root: Path) -> tuple[list[Result], list[InvalidResult]]:
    """The valid records under `results_root` and the files that failed validation."""
    root = Path(results_root)
    ok, bad = [], []
    for p in iter_result_files(root):
        try:
            ok.append(load_result(p, root if root.is_dir() else None))
        except InvalidResult as e:
            bad.append(e)
    return ok, bad


def _differing_keys(records: list[Result]) -> list[str]:
    """Hyper-parameters whose values differ between these records (of one method), in the methods' own order."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.method.hyperparameters if k not in keys]
    out = []
    for k in keys:
        hps = [r.method.hyperparameters for r in records]
        if len({json.dumps(hp[k], sort_keys=True) if k in hp else "<missing>" for hp in hps}) > 1:
            out.append(k)
    return out


def _labelled(records: list[Result]) -> list[tuple[str, Result]]:
    """(label, record) in table order: 'sparsegpt (structure=2:4)' where records of one method differ."""
    by_method: dict[str, list[Result]] = defaultdict(list)
    for r in records:
        by_method[r.method.name].append(r)
    rows: list[tuple[tuple, str, Result]] = []
    for name, group in by_method.items():
        keys = _differing_keys(group)
        seeds_differ = len({r.seed for r in group}) > 1
        for r in group:
            hp = r.method.hyperparameters
            parts = [f"{k}={_hp_value(hp[k])}" if k in hp else f"{k} unset" for k in keys]
            if seeds_differ:
                parts.append(f"seed={r.seed}")
            label = f"{name} ({', '.join(parts)})" if parts else name
            hp_key = tuple(_hp_sort_key(hp[k]) if k in hp else (3, 0.0, "") for k in keys)
            family = FAMILY_ORDER.index(r.method.family) if r.method.family in FAMILY_ORDER else len(FAMILY_ORDER)
            rows.append(((family, r.method.family, name, hp_key, r.seed, r.run_id), label, r))
    rows.sort(key=lambda t: t[0])
    counts: dict[str, int] = defaultdict(int)
    for _, label, _ in rows:
        counts[label] += 1
    seen: dict[str, int] = defaultdict(int)
    out = []
    for _, label, r in rows:
        if counts[label] > 1:  # the same configuration run more than once: number the runs in run-id order
            seen[label] += 1
            label = f"{label} (run {seen[label]})" if "(" not in label else f"{label[:-1]}, run {seen[label]})"
        out.append((label, r))
    return out


# --- tables -----------------------------------------------------------------------------------------------


def _consistent(values: Iterable[Any]) -> Any:
    vals = list(values)
    return vals[0] if vals and all(v == vals[0] for v in vals) else _MISSING


def _table(profile: str, task: str, records: list[Result], results_root: Path) -> str:
    rows = _labelled(records)
    metrics = sorted({r.quality.metric for r in records})
    metric = metrics[0] if len(metrics) == 1 else "quality"
    hib = _consistent(r.quality.higher_is_better for r in records)
    secondary = sorted({name for r in records for name in r.quality.secondary})
    fid_metrics = sorted({r.fidelity.metric for r in records if r.fidelity})
    has_controls = any(r.controls for r in records)
    has_compute = any(r.compute is not None for r in records)
    compute_units = sorted({r.compute.unit for r in records if r.compute is not None})

    lines = [f"### `{task}` on the `{profile}` profile", ""]
    about = [f"{METRIC_LABEL.get(metric, metric)} (`{metric}`"
             + ("" if hib is _MISSING else ", higher is better" if hib else ", lower is better") + ")"]
    n = _consistent(r.quality.n for r in records)
    if n is not _MISSING:
        about.append(f"on {n:,} evaluation examples")
    ref = _consistent(r.quality.reference_value for r in records)
    if ref is not _MISSING and len(metrics) == 1:
        about.append(f"reference {fmt_value(ref, metric)}")
    for name in secondary:
        sref = _consistent(r.quality.secondary[name].reference_value for r in records if name in r.quality.secondary)
        if sref is not _MISSING:
            about.append(f"reference {name} {_fmt_secondary(sref, name)}")
    lines += ["Quality: " + ", ".join(about) + f"; {len(records)} record{'s' if len(records) != 1 else ''}.", ""]

    header = ["method", "family", METRIC_LABEL.get(metric, metric), "reference", "delta [95% CI]"]
    header += secondary
    if fid_metrics:
        header.append(f"fidelity ({', '.join(fid_metrics)})")
    if has_controls:
        header.append("control: value; method - control [95% CI]")
    header += ["speedup [95% CI]"]
    if has_compute:
        header.append(f"{'/'.join(compute_units)} method / reference")
    header += ["params (method)", "training"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---" for _ in header) + " |")

    for label, r in rows:
        q = r.quality
        link = (Path(results_root) / r.relpath()).as_posix()
        cells = [f"[{label.replace('[', '(').replace(']', ')')}]({link})", r.method.family, fmt_value(q.value, q.metric),
                 fmt_value(q.reference_value, q.metric), fmt_delta_with_interval(q.delta, q.delta_interval, q.metric)]
        for name in secondary:
            sec = q.secondary.get(name)
            if sec is None:
                cells.append("")
                continue
            refs = _consistent(x.quality.secondary[name].reference_value for x in records
                               if name in x.quality.secondary)
            text = _fmt_secondary(sec.value, name)
            if refs is _MISSING:
                text += f" (reference {_fmt_secondary(sec.reference_value, name)})"
            cells.append(text)
        if fid_metrics:
            f = r.fidelity
            cells.append("" if f is None else _fmt_fidelity(f.value, f.metric)
                         + ("" if len(fid_metrics) == 1 else f" ({f.metric})"))
        if has_controls:
            parts = []
            for c in r.controls:
                gain = fmt_delta_with_interval(q.value - c.value, c.gain_interval, q.metric)
                parts.append(f"{c.name} {fmt_value(c.value, q.metric)}; {gain}")
            cells.append("<br>".join(parts))
        cells.append(fmt_speed(r))
        if has_compute:
            cells.append(fmt_compute(r))
        cost = fmt_seconds(r.cost.seconds)
        if r.cost.steps:
            cost += f", {r.cost.steps:,} steps"
        cells += [fmt_params(r), cost]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def markdown_tables(results_root: Path) -> str:
    """The results block: one Markdown table per (profile, task) from every valid, full-budget, status 'ok'
    record under `results_root`. Deterministic: the same records always give the same text."""
    results_root = Path(results_root)
    records, invalid = load_records(results_root)
    shown = [r for r in records if r.status == "ok" and r.budget == "full"]
    failed = sum(1 for r in records if r.status != "ok")
    smoke = sum(1 for r in records if r.status == "ok" and r.budget != "full")
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in shown:
        groups[(r.profile.name, r.task.name)].append(r)

    root = results_root.as_posix()
    intro = (f"Generated by `bench report --write-readme README.md` from the records under `{root}/` (do not edit "
             "this block by hand; `bench report --check-readme README.md` fails when it differs from the records). "
             "Each method links to its record. Deltas are method minus reference with their paired 95% interval; "
             "the speedup is the median of paired time ratios t_reference / t_method with its 95% interval; "
             "a speedup marked `(unreliable)` is one whose record's speed verdict is unreliable (timed on a busy "
             "machine, too imprecise, or timed before bench measured either: `bench show <record>` gives the "
             "reasons, `bench remeasure <record>` re-times it); quality figures are unaffected. The MACs column is "
             "the method's MACs per timed call over the reference's; training is the method's own training or "
             "calibration time.")
    parts = [intro]
    left_out = []
    if failed:
        left_out.append(f"{failed} failed run{'s' if failed != 1 else ''}")
    if smoke:
        left_out.append(f"{smoke} smoke-budget record{'s' if smoke != 1 else ''}")
    if invalid:
        left_out.append(f"{len(invalid)} invalid file{'s' if len(invalid) != 1 else ''} (`bench validate`)")
    if left_out:
        parts.append("Not shown: " + ", ".join(left_out) + ".")
    if not groups:
        parts.append("No results yet.")
    for (profile, task) in sorted(groups):
        parts.append(_table(profile, task, groups[(profile, task)], results_root))
    parts.append(compatibility_matrix())
    return "\n\n".join(parts) + "\n"


def compatibility() -> tuple[list, list, dict[tuple[str, str], str | None]]:
    """(tasks, methods, cells) from the registries: which registered method runs on which registered task (a
    modality it supports, and the capabilities it needs declared by the task, `bench.api`). A cell is "" when
    the method runs there, "needs X, Y" when only capabilities are missing, None for another modality. This is
    what `bench list methods --task T` answers, for every T; the README and the site show it."""
    from bench.registry import FAMILIES, METHODS, TASKS, missing_capabilities, requirement_name, supports

    tasks = sorted(TASKS, key=lambda t: (t.tier, t.modality, t.name))
    methods = sorted(METHODS, key=lambda m: (FAMILIES.index(m.family), m.name))
    cells: dict[tuple[str, str], str | None] = {}
    for m in methods:
        for t in tasks:
            if supports(m, t):
                cells[m.name, t.name] = ""
            elif t.modality in m.modalities:
                cells[m.name, t.name] = "needs " + ", ".join(requirement_name(r) for r in missing_capabilities(m, t))
            else:
                cells[m.name, t.name] = None
    return tasks, methods, cells


def compatibility_matrix() -> str:
    """`compatibility()` as a markdown table."""
    tasks, methods, cells = compatibility()
    head = "| method | " + " | ".join(f"`{t.name}`" for t in tasks) + " |"
    rule = "| --- |" + " --- |" * len(tasks)

    def cell(m, t) -> str:
        c = cells[m.name, t.name]
        return "yes" if c == "" else (c or "")

    rows = [f"| `{m.name}` | " + " | ".join(cell(m, t) for t in tasks) + " |" for m in methods]
    intro = ("### What runs where\n\nFrom the registries (a method runs on a task of a modality it supports that "
             "declares the capabilities it needs; `bench list methods --task T` lists them). Embedded tasks "
             "first, then full ones: " + ", ".join(f"`{t.name}` ({t.tier})" for t in tasks) + ".")
    return "\n".join([intro, "", head, rule, *rows])


# --- the README block -------------------------------------------------------------------------------------


def _marker_positions(text: str) -> tuple[int, int]:
    nb, ne = text.count(BEGIN), text.count(END)
    if nb == 0 or ne == 0:
        missing = " and ".join(m for m, c in ((BEGIN, nb), (END, ne)) if c == 0)
        raise MarkerError(f"the text has no {missing} marker: put the lines {BEGIN} and {END} where the "
                          "generated results tables belong")
    if nb > 1 or ne > 1:
        raise MarkerError(f"the markers must appear once each; found {BEGIN} {nb} times and {END} {ne} times")
    i, j = text.index(BEGIN), text.index(END)
    if j < i:
        raise MarkerError(f"the markers are out of order: {END} comes before {BEGIN}")
    return i, j


def between_markers(text: str) -> str:
    """What the text holds between its results markers."""
    i, j = _marker_positions(text)
    return text[i + len(BEGIN):j]


def replace_between_markers(text: str, generated: str) -> str:
    """`text` with everything between the results markers replaced by `generated` (markers kept, each on its
    own line); raises `MarkerError` when the markers are missing, repeated or out of order."""
    i, j = _marker_positions(text)
    return text[:i + len(BEGIN)] + "\n" + generated.strip("\n") + "\n" + text[j:]
