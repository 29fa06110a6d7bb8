"""`bench leaderboard build|serve` and `bench recommend`.

Registered on the main app by bench/cli.py. Module scope imports only typer and rich (which `bench` loads
anyway); jinja2, the result models and the builder are imported inside the commands.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

leaderboard_app = typer.Typer(no_args_is_help=True, help="Build and serve the static leaderboard site.")
_out = Console()
_err = Console(stderr=True)

ResultsOpt = Annotated[Path, typer.Option("--results", help="root of the results tree")]
OutOpt = Annotated[Path, typer.Option("--out", help="folder the site is written to")]


def _fail(message: str, code: int = 2) -> None:
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _warn_invalid(invalid: list) -> None:
    for e in invalid:
        _err.print(f"warning: skipped invalid result {e.path}: " + "; ".join(e.problems), markup=False,
                   highlight=False, soft_wrap=True)


@leaderboard_app.command("build")
def build(results: ResultsOpt = Path("results"), out: OutOpt = Path("site"),
          strict: Annotated[bool, typer.Option(help="fail when any result file is invalid")] = False,
          repo_url: Annotated[str | None, typer.Option("--repo-url", help="https address of the repository the "
                                                       "methodology page links to (default: the package's "
                                                       "[project.urls])")] = None) -> None:
    """Build the static site from every result under --results (a pure function: same input, same bytes)."""
    from leaderboard.build import BuildError, build_site

    try:
        report = build_site(results, out, strict=strict, repo_url=repo_url)
    except FileNotFoundError as e:
        _fail(str(e))
    except BuildError as e:
        _fail(str(e), code=1)
    _warn_invalid(report.invalid)
    skipped = f", {len(report.invalid)} invalid file(s) skipped" if report.invalid else ""
    unreliable = (f"; {report.unreliable} with an unreliable speed, shown greyed and not ranked: re-time them "
                  f"with `bench remeasure`" if report.unreliable else "")
    _out.print(f"wrote {report.pages} pages to {out}/: {report.results} results ({report.ranked} ranked{unreliable}) on "
               f"{report.tasks} task(s){skipped}\nopen {out / 'index.html'} in a browser, or run "
               f"`bench leaderboard serve --out {out}`", markup=False, highlight=False, soft_wrap=True)


def make_server(out: Path, port: int):
    """An HTTP server for `out` on 127.0.0.1 (port 0 picks a free one); the caller runs serve_forever."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one line per request on stderr, without the timestamp noise
            _err.out(f"{self.address_string()} {fmt % args}", highlight=False)

    handler = functools.partial(Quiet, directory=str(out))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


@leaderboard_app.command("serve")
def serve(out: OutOpt = Path("site"),
          port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0 picks a free one)")] = 8000) -> None:
    """Serve the built site on 127.0.0.1 for a local look (Ctrl-C stops)."""
    if not (out / "index.html").is_file():
        _fail(f"{out}/index.html does not exist: run `bench leaderboard build --out {out}` first")
    try:
        server = make_server(out, port)
    except OSError as e:
        _fail(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}")
    with server:
        _out.print(f"serving {out}/ at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", highlight=False)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def recommend(
    task: Annotated[str, typer.Option("--task", "-t", help="task name")],
    profile: Annotated[str, typer.Option(help="hardware profile; results of other profiles are never mixed in")] = "cpu",
    max_drop: Annotated[str | None, typer.Option("--max-drop", help="the largest quality loss accepted, with its "
                                                 "unit: '1%' relative to the reference's value, '0.5pp' absolute "
                                                 "percentage points, '2fid' in the metric's own units; default: "
                                                 "the task's declared budget")] = None,
    results: ResultsOpt = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="print the recommendations as JSON")] = False,
) -> None:
    """The methods within a quality budget that are faster than the reference beyond doubt, fastest first, with
    tie-aware ranks, their intervals and the command to reproduce each; then what was left out and why (no
    measured speedup, an unreliable speed, outside the budget). The same rules as the leaderboard's task page."""
    from rich.text import Text

    from leaderboard import data as D
    from leaderboard.pages import fdelta, fq, fspeed, noise_floor_view, task_budget

    try:
        budget = D.parse_budget(max_drop) if max_drop is not None else None
        loaded = D.load_tree(results)
    except (D.BudgetError, FileNotFoundError) as e:
        _fail(str(e))
    _warn_invalid(loaded.invalid)
    rows = D.rows_of(loaded)
    tasks = D.sorted_unique(r["task"] for r in rows)
    task_rows = [r for r in rows if r["task"] == task]
    if not task_rows:
        near = difflib.get_close_matches(task, tasks, n=3, cutoff=0.5)
        _fail(f"no results for task {task!r} under {results}/."
              + (f" Did you mean {', '.join(repr(n) for n in near)}?" if near else "")
              + (f" Tasks with results: {', '.join(tasks)}." if tasks else " The results tree has none yet."))
    profiles = D.sorted_unique(r["profile"] for r in task_rows)
    prow = [r for r in task_rows if r["profile"] == profile]
    if not prow:
        _fail(f"no results for task {task!r} on profile {profile!r}. Profiles with results for "
              f"{task!r}: {', '.join(profiles)}.")
    metric = prow[0]["metric"]
    try:
        if max_drop is None:
            from bench.registry import RegistryError, get_task_spec

            try:
                budget = task_budget(get_task_spec(task), metric)
            except RegistryError:
                budget = D.parse_budget("1%")
        else:
            budget = D.parse_budget(max_drop, metric)  # now the unit can be checked against the metric
    except D.BudgetError as e:
        _fail(str(e))
    placed = D.rank_within(prow, budget)
    picks = [r for r in placed if r["standing"] == "ranked"]
    by = {k: [r for r in placed if r["standing"] == k] for k in ("no-speedup", "unreliable", "outside")}
    refs = D.sorted_unique(r["ref"] for r in prow if r["ref"] is not None)

    def line(r: dict, why: str = "") -> Text:
        return Text(f"  - {r['method']} ({r['hps'] or 'no hyper-parameters'}): Δ {metric} "
                    f"{fdelta(r['delta'], metric)}, speedup {fspeed(r['speedup'])} [{fspeed(r['slo'])}, "
                    f"{fspeed(r['shi'])}]" + (f" {why}" if why else ""))

    def left_out_lines() -> list[Text]:
        out = []
        if by["no-speedup"]:
            out.append(Text(f"Within the budget but no measured speedup (the 95% interval includes 1x or lies "
                            f"below), never recommended ({len(by['no-speedup'])}):"))
            out += [line(r) for r in by["no-speedup"]]
        if by["unreliable"]:
            out.append(Text(f"Within the budget but the speed is unreliable, never recommended: re-time on a quiet "
                            f"machine with `bench remeasure` ({len(by['unreliable'])}):"))
            for r in by["unreliable"]:
                out.append(line(r, f"UNRELIABLE: {'; '.join(r['speed_reasons'])}"))
                out.append(Text(f"    bench remeasure {(results / r['file']).as_posix()}", style="dim"))
        if by["outside"]:
            faster = [r for r in by["outside"] if D.measured_speedup(r) and r["speed_ok"]]
            out.append(Text(f"Outside the budget ({len(by['outside'])})"
                            + (f"; the fastest of them: {max(faster, key=lambda r: r['speedup'])['method']}"
                               if faster else "") + ":"))
            out += [line(r) for r in by["outside"]]
        return out

    if as_json:
        keep = ("rank", "tied_with", "method", "family", "hp", "speedup", "slo", "shi", "delta", "dlo", "dhi",
                "value", "ref", "allowed", "sure", "verified", "file", "command", "id")
        print(json.dumps([{**{k: p[k] for k in keep}, "reproduce": f"bench reproduce results/{p['file']}"}
                          for p in picks], indent=2, sort_keys=True))
        if by["unreliable"] or by["no-speedup"]:  # on stderr, so stdout stays JSON
            _err.print("note: left out: " + "; ".join(
                f"{r['method']} ({r['hps']}): {'unreliable speed' if r['standing'] == 'unreliable' else 'no measured speedup'}"
                for r in by["unreliable"] + by["no-speedup"]), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(0 if picks else 1)
    allowed = budget.allowed(refs[0]) if refs else budget.amount
    _out.print(Text(f"{task} on {profile}: reference {metric} {' / '.join(fq(v, metric) for v in refs)}; "
                    f"budget: lose at most {budget} (= {fdelta(-allowed, metric).lstrip('-+')})"
                    + ("" if max_drop is not None else ", the task's declared budget (--max-drop changes it)")
                    + f"; {len(prow)} result(s) on this profile."), soft_wrap=True)
    _out.print(Text(noise_floor_view(task, profile, prow)["text"]), soft_wrap=True)
    if not picks:
        methods = [r for r in prow if not D.is_noise_floor(r)]
        if not methods:
            _out.print(Text("Only the noise floor (`none`, the reference timed against itself) has results here: "
                            "no method to recommend."), soft_wrap=True)
            raise typer.Exit(1)
        _out.print(Text("No method qualifies: none is within the budget with a reliable speedup measured above 1x.",
                        style="bold"), soft_wrap=True)
        for t in left_out_lines():
            _out.print(t, soft_wrap=True)
        raise typer.Exit(1)
    _out.print(Text(f"Recommended: within the budget and faster than the reference beyond doubt, fastest first "
                    f"({len(picks)}):", style="bold"), soft_wrap=True)
    for p in picks:
        head = Text(f"{p['rank']}{'=' if p['tied_with'] else ''}".ljust(4), style="bold")
        head.append(p["method"], style="bold cyan")
        head.append(f" ({p['family']})  ")
        head.append(p["hps"] or "(no hyper-parameters)")
        _out.print(head, soft_wrap=True)
        _out.print(Text(f"    speedup {fspeed(p['speedup'])} [{fspeed(p['slo'])}, {fspeed(p['shi'])}]   "
                        f"Δ {metric} {fdelta(p['delta'], metric)} [{fdelta(p['dlo'], metric)}, "
                        f"{fdelta(p['dhi'], metric)}]   "
                        + ("whole interval within budget" if p["sure"] else "point estimate within budget") + "   "
                        + ("verified" if p["verified"] else "unverified")), soft_wrap=True)
        _out.print(Text(f"    {D.tie_text(p)}", style="dim"), soft_wrap=True)
        _out.print(Text(f"    bench reproduce results/{p['file']}"), soft_wrap=True)
        _out.print(Text(f"    originally: {p['command']}", style="dim"), soft_wrap=True)
    for t in left_out_lines():
        _out.print(t, soft_wrap=True)
