"""Terminal rendering of a result record."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from bench.result import Result


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _q(v: float, metric: str) -> str:
    return f"{v:.2%}" if "accuracy" in metric or "match" in metric else f"{v:.4g}"


def _delta(v: float, metric: str) -> str:
    return f"{v * 100:+.2f} pp" if "accuracy" in metric or "match" in metric else f"{v:+.4g}"


def summary_table(r: Result, path: Path | None = None) -> Table:
    t = Table(title=f"{r.method.name} on {r.task.name} [{r.profile.name}] - {r.status}", show_header=True)
    t.add_column("")
    t.add_column("reference", justify="right")
    t.add_column(r.method.name, justify="right")
    t.add_column("change", justify="right")
    if r.status != "ok":
        t.add_row("error", "", f"{r.error.type}: {r.error.message}", "")
    else:
        q, s, m, z, c = r.quality, r.speed, r.memory, r.size, r.cost
        ci = f" [{_delta(q.delta_interval.low, q.metric)}, {_delta(q.delta_interval.high, q.metric)}]" \
            if q.delta_interval else ""
        t.add_row(q.metric, _q(q.reference_value, q.metric), _q(q.value, q.metric), _delta(q.delta, q.metric) + ci)
        for name, sec in q.secondary.items():
            t.add_row(name, f"{sec.reference_value:.4g}", f"{sec.value:.4g}", f"{sec.value - sec.reference_value:+.4g}")
        if r.fidelity:
            t.add_row(r.fidelity.metric, "", f"{r.fidelity.value:.4g}", "")
        for ctl in r.controls:
            gi = ctl.gain_interval
            gci = f" [{_delta(gi.low, q.metric)}, {_delta(gi.high, q.metric)}]" if gi else ""
            t.add_row(f"control: {ctl.name}", "", _q(ctl.value, q.metric),
                      f"method - control {_delta(q.value - ctl.value, q.metric)}{gci}")
        t.add_row("time per call (median)", f"{s.reference.median_s * 1e3:.3f} ms", f"{s.method.median_s * 1e3:.3f} ms",
                  f"speedup {s.speedup:.3f}x [{s.interval.low:.3f}, {s.interval.high:.3f}] (n={s.reference.n})")
        others = (f", others used {s.contention.other_cpu_share:.0%} of the CPUs"
                  if s.contention and s.contention.other_cpu_share is not None else "")
        prec = f"+-{s.precision:.1%} (target +-{s.precision_target:.1%})" if s.precision is not None else ""
        t.add_row("speed verdict", "", s.status.upper() if s.status != "ok" else "ok",
                  (prec + others + (f"; {len(s.attempts)} attempts" if len(s.attempts) > 1 else ""))
                  .lstrip(", "))
        t.add_row("peak memory", _bytes(m.reference_peak_bytes), _bytes(m.method_peak_bytes),
                  f"{m.method_peak_bytes / max(m.reference_peak_bytes, 1):.3f}x")
        t.add_row("parameters (non-zero)", f"{z.reference.parameters:,} ({z.reference.nonzero_parameters:,})",
                  f"{z.method.parameters:,} ({z.method.nonzero_parameters:,})",
                  f"sparsity {z.sparsity:.1%}" + ("" if z.runtime_exploits_sparsity or z.sparsity == 0
                                                  else " (not exploited by the runtime)"))
        t.add_row("serialized size", _bytes(z.reference.bytes), _bytes(z.method.bytes), "")
        if r.compute:
            t.add_row(f"{r.compute.unit} per call", f"{r.compute.reference:.3g}", f"{r.compute.method:.3g}",
                      f"{r.compute.method / max(r.compute.reference, 1):.3f}x")
        tokens = f", {c.tokens_seen:,} tokens" if c.tokens_seen is not None else ""
        t.add_row("method cost", "", f"{c.seconds:.1f} s, {c.steps} steps{tokens}", c.description)
    if not r.profile.matched:
        t.add_row("profile mismatch", "", "; ".join(r.profile.mismatches), "")
    t.caption = f"{path}" if path else None
    return t
