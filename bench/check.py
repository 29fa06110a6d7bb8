"""`bench check`: what CI runs on a pull request, and what a contributor runs before opening one.

1. Every result file under the results tree: the schema and the record's invariants (delta, intervals, the
   config hash recomputed from the record, the file in the place its fields name); the method and the task
   exist in the registries with the family and modality the record says; neither is the generated
   template; the provenance names a clean git state (a sha, not dirty); the profile matched the machine it
   was measured on, so no other machine's numbers are mixed into a profile's table; the run had the full
   budget (a `--budget smoke` run is a CI check, not a result) and did not fail; its speed figure is plausible
   and reliable (`bench.plausibility`: an `ok` verdict, a `none` interval that contains 1.0, no speedup beyond
   its MAC ideal without a registered explanation). Verification records
   (`<run-id>.verified.json`) must parse, sit beside the result they verify and still verify it as it is now
   (`bench.reproduce.verification_problems`: the site's rule).
   Results the pull request adds or changes (or every result, with `strict`, or when there is no git history
   to compare with) are held to all of this; results already on the base branch only get warnings for the
   provenance and profile rules, so a rule added later does not fail every pull request.
2. Every registered method or task that is still the generated template is an error.
3. Every method whose module the pull request adds or changes (against `base`; or every method with
   `all_methods`) is smoke-run (`budget="smoke"`) on each embedded task it supports, each run in its own
   process, into a temporary folder. A run that fails is an error; one whose output is indistinguishable
   from the reference's is a warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.provenance import REPO_ROOT
from bench.store import VERIFIED_SUFFIX, DEFAULT_RESULTS


@dataclass
class Finding:
    level: str  # "error" or "warning"
    where: str
    message: str


@dataclass
class Smoke:
    method: str
    task: str
    status: str
    summary: str = ""
    note: str = ""


@dataclass
class CheckReport:
    base: str | None = None
    base_note: str = ""
    n_results: int = 0
    n_verified: int = 0
    changed_methods: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    smoke: list[Smoke] = field(default_factory=list)

    def add(self, level: str, where: str, message: str) -> None:
        self.findings.append(Finding(level, where, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors


# --- git ---------------------------------------------------------------------------------------------------

def _git(*args: str, root: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def resolve_base(base: str | None) -> tuple[str | None, str]:
    """(merge-base sha or None, how it was chosen). An explicit `base` that does not resolve is an error."""
    if _git("rev-parse", "--verify", "HEAD") is None:
        return None, "no git history here: every result is held to every rule, no method is smoke-run"
    if base:
        candidates = [base]
    else:
        gh = os.environ.get("GITHUB_BASE_REF")
        candidates = [os.environ.get("BENCH_CHECK_BASE"), f"origin/{gh}" if gh else None, "origin/main", "main"]
    for ref in filter(None, candidates):
        if _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}") is None:
            continue
        mb = _git("merge-base", "HEAD", ref)
        if mb:
            return mb.strip(), f"changes since {ref} (merge base {mb.strip()[:10]})"
    if base:
        raise ValueError(f"--base {base!r} is not a commit in this repository (fetch it first?)")
    return None, "no base branch found (origin/main, main): only uncommitted changes count as new"


def changed_files(base_sha: str | None) -> set[str]:
    """Paths (relative to the repository root) changed since `base_sha`, uncommitted and untracked included."""
    out: set[str] = set()
    if base_sha:
        out |= set((_git("diff", "--name-only", base_sha, "HEAD") or "").split("\n"))
    out |= set((_git("diff", "--name-only", "HEAD") or "").split("\n"))
    out |= set((_git("ls-files", "--others", "--exclude-standard") or "").split("\n"))
    return {p for p in out if p}


def _known_commit(sha: str, cache: dict[str, bool]) -> bool:
    if sha not in cache:
        cache[sha] = _git("cat-file", "-e", f"{sha}^{{commit}}") is not None
    return cache[sha]


# --- results -----------------------------------------------------------------------------------------------

def _repo_rel(p: Path) -> str | None:
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return None


def check_results(report: CheckReport, root: Path, is_new, strict: bool) -> None:
    from bench.registry import RegistryError, get_method_spec, get_task_spec
    from bench.reproduce import load_verification, verification_problems
    from bench.scaffold import is_template
    from bench.store import InvalidResult, iter_result_files, load_result

    if not root.is_dir():
        report.base_note += f"; no results folder at {root}"
        return
    shas: dict[str, bool] = {}
    for p in iter_result_files(root):
        report.n_results += 1
        where = str(p)
        try:
            r = load_result(p, root)
        except InvalidResult as e:
            for problem in e.problems:
                report.add("error", where, problem)
            continue
        level = "error" if (strict or is_new(p)) else "warning"
        try:
            m = get_method_spec(r.method.name)
            if m.family != r.method.family:
                report.add("error", where, f"method {m.name!r} is in family {m.family}, the record says "
                                           f"{r.method.family}")
            if is_template(m):
                report.add("error", where, f"made with {m.name!r}, which is still the generated template (it "
                                           f"does nothing): results of a template are not accepted")
            if m.version != r.method.version:
                report.add("warning", where, f"method {m.name!r} is at version {m.version}, the record used "
                                             f"{r.method.version}: re-run it")
        except RegistryError as e:
            report.add("error", where, f"the record's method is not registered here: {e}")
        try:
            t = get_task_spec(r.task.name)
            if t.modality != r.task.modality or t.tier != r.task.tier:
                report.add("error", where, f"task {t.name!r} is {t.tier}/{t.modality}, the record says "
                                           f"{r.task.tier}/{r.task.modality}")
            if is_template(t):
                report.add("error", where, f"made on {t.name!r}, which is still the generated template task: "
                                           f"results on a template are not accepted")
        except RegistryError as e:
            report.add("error", where, f"the record's task is not registered here: {e}")
        prov = r.provenance
        if prov.git_sha is None or prov.git_dirty is not False:
            state = "outside a git checkout" if prov.git_sha is None else "from a checkout with uncommitted changes"
            report.add(level, where, f"made {state}: a submitted result must come from committed code "
                                     f"(commit, then run)")
        elif not _known_commit(prov.git_sha, shas):
            report.add("warning", where, f"git sha {prov.git_sha[:10]} is not in this repository's history "
                                         f"(an unpushed commit, or a shallow clone)")
        if not r.profile.matched:
            report.add(level, where, f"measured on a machine that does not match profile {r.profile.name!r} ("
                                     + "; ".join(r.profile.mismatches) + "): it would mix another machine's "
                                     f"numbers into that profile's table")
        if r.status != "ok":
            report.add(level, where, f"a failed run ({r.error.type if r.error else 'no error'}): failed runs "
                                     f"are not submitted")
        from bench.plausibility import problems as plausibility

        for problem in plausibility(r):
            report.add(level, where, problem)
        if r.budget != "full":
            report.add(level, where, "a --budget smoke run (capped training, for CI checks): the leaderboard "
                                     "takes full-budget runs only")
    for v in sorted(root.rglob("*" + VERIFIED_SUFFIX)):
        target = v.with_name(v.name[: -len(VERIFIED_SUFFIX)] + ".json")
        try:
            ver = load_verification(v)
        except (OSError, ValueError) as e:
            report.add("error", str(v), f"not a verification record: {str(e).splitlines()[0]}")
            continue
        if not target.is_file():
            report.add("error", str(v), f"verifies {target.name}, which is not beside it")
            continue
        try:
            r = load_result(target, check_invariants=False)
        except InvalidResult:
            continue  # reported above
        problems = verification_problems(ver, r, target.name)  # judged as the site judges it, never trusted
        for problem in problems:
            report.add("error", str(v), f"does not verify {target.name}: {problem}")
        if not problems and not ver.forced:  # a forced one is honest, but shows the configuration runs only
            report.n_verified += 1


# --- methods -----------------------------------------------------------------------------------------------

def method_modules() -> dict[str, str]:
    """Registered method name -> its module file relative to the repository root."""
    from bench.registry import METHODS

    out = {}
    for spec in METHODS:
        mod = sys.modules.get(spec.cls.__module__)
        f = getattr(mod, "__file__", None)
        rel = _repo_rel(Path(f)) if f else None
        if rel:
            out[spec.name] = rel
    return out


def smoke_run(report: CheckReport, methods: list[str], jobs: int = 1) -> None:
    from bench.executors import LocalExecutor
    from bench.registry import TASKS
    from bench.sweep import SweepError, SweepFile, expand

    embedded = [t.name for t in TASKS if t.tier == "embedded"]
    try:
        runs, _ = expand(SweepFile(tasks=embedded, methods=methods, seeds=[0], profiles=["cpu"], budget="smoke"))
    except SweepError:
        runs = []
    covered = {r.method for r in runs}
    for m in methods:
        if m not in covered:
            report.add("warning", m, "supports no embedded task's modality: not smoke-run here (run it on a full "
                                     "task and attach the result)")
    if not runs:
        return
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        outcomes = []
        LocalExecutor(jobs).run(runs, Path(tmp), outcomes.append)
    for o in outcomes:
        r = o.result
        if o.status == "ok" and r is not None:
            q, s = r.quality, r.speed
            summary = (f"{q.metric} {q.value:.4f} ({q.delta:+.4f}), speedup {s.speedup:.2f}x, "
                       f"{r.size.method.nonzero_parameters:,} non-zero params")
            report.smoke.append(Smoke(o.spec.method, o.spec.task, "ok", summary))
            same = (q.delta == 0 and (r.fidelity is None or r.fidelity.value == 1.0)
                    and r.size.method == r.size.reference
                    and (r.compute is None or r.compute.method == r.compute.reference))
            if same:
                report.add("warning", o.spec.method, f"on {o.spec.task} its model and outputs are the "
                                                     f"reference's: does it do anything yet?")
        else:
            report.smoke.append(Smoke(o.spec.method, o.spec.task, o.status, note=o.note))
            report.add("error", o.spec.method, f"smoke run on {o.spec.task} {o.status}: "
                                               f"{o.note.splitlines()[-1] if o.note else ''}")


def run_check(results_root: Path = DEFAULT_RESULTS, base: str | None = None, all_methods: bool = False,
              smoke: bool = True, strict: bool = False, jobs: int = 1) -> CheckReport:
    from bench.registry import METHODS, TASKS
    from bench.scaffold import is_template

    base_sha, note = resolve_base(base)
    report = CheckReport(base=base_sha, base_note=note)
    have_git = _git("rev-parse", "--verify", "HEAD") is not None
    changed = changed_files(base_sha) if have_git else set()

    def is_new(p: Path) -> bool:
        rel = _repo_rel(p)
        return not have_git or rel is None or rel in changed

    check_results(report, Path(results_root), is_new, strict)
    templates = []
    for spec in METHODS:
        if is_template(spec):
            templates.append(spec.name)
            report.add("error", spec.name, f"still the generated template ({spec.cls.__module__}): make apply() do "
                                           f"the method's work, fill in paper and summary, delete BENCH_TEMPLATE")
    for tspec in TASKS:
        if is_template(tspec):
            report.add("error", tspec.name, f"task still the generated template ({tspec.cls.__module__}): give it "
                                            f"its real data and models, fill in its summary, delete BENCH_TEMPLATE")
    modules = method_modules()
    if all_methods:
        todo = sorted(modules)
    else:
        todo = sorted(n for n, f in modules.items() if f in changed)
    report.changed_methods = todo
    todo = [m for m in todo if m not in templates]
    if smoke and todo:
        smoke_run(report, todo, jobs)
    return report


def print_report(report: CheckReport, console) -> None:
    from rich.table import Table

    console.print(f"[bold]bench check[/]: {report.base_note}", highlight=False)
    console.print(f"results: {report.n_results} files, {report.n_verified} verified", highlight=False)
    console.print("methods new or changed: " + (", ".join(report.changed_methods) or "none"), highlight=False)
    if report.smoke:
        t = Table(title="Smoke runs (budget=smoke, cpu profile)")
        for col in ("method", "task", "status", "result"):
            t.add_column(col, overflow="fold")
        for s in report.smoke:
            t.add_row(s.method, s.task, s.status, s.summary or (s.note.splitlines()[-1] if s.note else ""))
        console.print(t)
    if report.findings:
        t = Table(title="Findings")
        for col in ("level", "where", "what"):
            t.add_column(col, overflow="fold")
        for f in sorted(report.findings, key=lambda f: (f.level != "error", f.where)):
            t.add_row("[red]error" if f.level == "error" else "[yellow]warning", f.where, f.message)
        console.print(t)
    n_err, n_warn = len(report.errors), len(report.findings) - len(report.errors)
    verdict = "[green]PASSED[/]" if report.ok else "[red]FAILED[/]"
    console.print(f"{verdict}: {n_err} errors, {n_warn} warnings", highlight=False)
