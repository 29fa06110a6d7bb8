"""Terminal rendering of a result record."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from bench.formats import fbytes, fcount, fdelta, fdivergence, ffidelity, fq, fratio, fspeed
from bench.result import Result


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
        ci = f" [{fdelta(q.delta_interval.low, q.metric)}, {fdelta(q.delta_interval.high, q.metric)}]" \
            if q.delta_interval else ""
        t.add_row(q.metric, fq(q.reference_value, q.metric), fq(q.value, q.metric), fdelta(q.delta, q.metric) + ci)
        for name, sec in q.secondary.items():
            t.add_row(name, f"{sec.reference_value:.4g}", f"{sec.value:.4g}", f"{sec.value - sec.reference_value:+.4g}")
        if r.fidelity:
            t.add_row(r.fidelity.metric, "", ffidelity(r.fidelity.value, r.fidelity.metric),
                      fdivergence(r.fidelity.divergence))
        for ctl in r.controls:
            gi = ctl.gain_interval
            gci = f" [{fdelta(gi.low, q.metric)}, {fdelta(gi.high, q.metric)}]" if gi else ""
            t.add_row(f"control: {ctl.name}", "", fq(ctl.value, q.metric),
                      f"method - control {fdelta(q.value - ctl.value, q.metric)}{gci}")
        t.add_row("time per call (median)", f"{s.reference.median_s * 1e3:.3f} ms", f"{s.method.median_s * 1e3:.3f} ms",
                  f"speedup {fspeed(s.speedup, 'x')} [{fspeed(s.interval.low, '')}, {fspeed(s.interval.high, '')}] "
                  f"(n={s.reference.n})")
        others = (f", others used {s.contention.other_cpu_share:.0%} of the CPUs"
                  if s.contention and s.contention.other_cpu_share is not None else "")
        prec = f"+-{s.precision:.1%} (target +-{s.precision_target:.1%})" if s.precision is not None else ""
        t.add_row("speed verdict", "", s.status.upper() if s.status != "ok" else "ok",
                  (prec + others + (f"; {len(s.attempts)} attempts" if len(s.attempts) > 1 else ""))
                  .lstrip(", "))
        t.add_row("peak memory", fbytes(m.reference_peak_bytes), fbytes(m.method_peak_bytes),
                  fratio(m.method_peak_bytes, m.reference_peak_bytes, "x"))
        t.add_row("parameters (non-zero)", f"{z.reference.parameters:,} ({z.reference.nonzero_parameters:,})",
                  f"{z.method.parameters:,} ({z.method.nonzero_parameters:,})",
                  f"sparsity {z.sparsity:.1%}" + ("" if z.runtime_exploits_sparsity or z.sparsity == 0
                                                  else " (not exploited by the runtime)"))
        t.add_row("serialized size", fbytes(z.reference.bytes), fbytes(z.method.bytes), "")
        if r.compute:
            t.add_row(f"{r.compute.unit} per call", fcount(r.compute.reference), fcount(r.compute.method),
                      fratio(r.compute.method, r.compute.reference, "x"))
        tokens = f", {c.tokens_seen:,} tokens" if c.tokens_seen is not None else ""
        t.add_row("method cost", "", f"{c.seconds:.1f} s, {c.steps} steps{tokens}", c.description)
        if r.training:
            tr = r.training
            t.add_row("training the architecture", f"{tr.full_seconds:.1f} s on {tr.full_rows:,} rows",
                      f"{tr.seconds:.1f} s on {tr.rows:,} rows",
                      f"time {tr.time_ratio:.3g}x ({tr.time_ratio_with_preparation:.3g}x with "
                      f"{tr.preparation_seconds:.1f} s of preparation), samples {tr.samples_ratio:.3g}x")
    if not r.profile.matched:
        t.add_row("profile mismatch", "", "; ".join(r.profile.mismatches), "")
    t.caption = f"{path}" if path else None
    return t
