"""`bench leaderboard build`: a pure function from `results/**/*.json` to a static site.

The same results tree gives byte-identical output: no timestamps, no absolute paths, every list stably
sorted, JSON with sorted keys. Pages are rendered by jinja2 with autoescaping; data embedded in a <script>
is JSON with `<`, `>` and `&` written as \\u003c, \\u003e, \\u0026, so no string from a result file can close
the script or open a tag. The site is written to a temporary folder beside `out` and swapped in whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaderboard import data as D
from leaderboard import methodology, pages

PACKAGE = Path(__file__).parent
STATIC = PACKAGE / "static"
TEMPLATES = PACKAGE / "templates"
MARKER = ".bench-leaderboard"  # marks a folder as a built site, so a rebuild may replace it


class BuildError(RuntimeError):
    pass


@dataclass
class BuildReport:
    out: Path
    results: int = 0  # valid records, any status
    shown: int = 0  # records in the tables (status ok, full budget)
    ranked: int = 0  # of those, the ones ranked: a reliable speed, not the noise floor
    unreliable: int = 0  # shown with an unreliable speed, never ranked (the noise floor aside)
    tasks: int = 0
    pages: int = 0
    invalid: list = field(default_factory=list)  # bench.store.InvalidResult, skipped


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: deterministic, and no character that HTML could read as markup."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(pages.FILTERS)
    return env


def _registry() -> tuple[dict, dict]:
    """Registered task and method specs, for summaries a result does not carry; empty when unavailable."""
    try:
        from bench.registry import METHODS, TASKS

        return {s.name: s for s in TASKS}, {s.name: s for s in METHODS}
    except Exception:  # noqa: BLE001 - the site can be built from results alone
        return {}, {}


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise BuildError(f"{out} exists and is not a site this command built (no {MARKER} in it); "
                         f"refusing to replace it: choose another --out or remove it")


def _swap(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / "site")
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publishable(site: Path) -> None:
    """The usual web permissions, whatever the umask: folders 755, files 644 (`mkdtemp` makes the root 700, so
    a web server running as another user could not read the site)."""
    import os

    for folder, dirs, files in os.walk(site):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def build_site(results: Path, out: Path, strict: bool = False, repo_url: str | None = None) -> BuildReport:
    """Build the site from `results` into `out`. Invalid files are skipped (listed in the report) unless
    `strict`, when they raise `BuildError` and nothing is written. `repo_url` (https) is the repository the
    methodology page links to; by default the package metadata's `[project.urls]`."""
    if repo_url is not None and not repo_url.startswith("https://"):
        raise BuildError(f"--repo-url {repo_url!r} must be an https:// address")
    results, out = Path(results), Path(out)
    loaded = D.load_tree(results)
    if strict and loaded.invalid:
        raise BuildError(f"{len(loaded.invalid)} invalid result file(s); --strict refuses to build:\n  "
                         + "\n  ".join(str(e) for e in loaded.invalid))
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        report = _render_all(loaded, results, tmp, repo_url)
        report.invalid = loaded.invalid
        _publishable(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out = out
    return report


def _render_all(loaded: D.Loaded, results: Path, site: Path, repo_url: str | None = None) -> BuildReport:
    env = _environment()
    task_specs, method_specs = _registry()
    rows = D.rows_of(loaded)
    report = BuildReport(out=site, results=len(loaded.results), shown=len(rows),
                         ranked=sum(1 for r in rows if D.rankable(r)),
                         unreliable=sum(1 for r in rows if not r["speed_ok"] and not D.is_noise_floor(r)))
    (site / "assets").mkdir(parents=True)
    for asset in sorted(STATIC.iterdir()):
        if asset.is_file():
            shutil.copyfile(asset, site / "assets" / asset.name)
    _write(site, MARKER, "built by `bench leaderboard build`; a rebuild replaces this folder\n")

    by_task: dict[str, list] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    records_by_task: dict[str, list] = defaultdict(list)
    records_by_method: dict[str, list] = defaultdict(list)
    for r, rel, verified in loaded.results:
        records_by_task[r.task.name].append((r, rel, verified))
        records_by_method[r.method.name].append((r, rel, verified))

    n = 0
    cards = []
    for task in sorted(records_by_task):
        card = pages.task_card(task, records_by_task[task], by_task[task], task_specs.get(task))
        cards.append(card)
        ctx = pages.task_page(card, by_task[task], method_specs)
        _write(site, f"tasks/{task}.html", env.get_template("task.html").render(
            root="../", data_json=script_json(ctx.pop("data")), **ctx))
        n += 1
    profiles = D.sorted_unique(p["name"] for c in cards for p in c["profiles"])
    docs = methodology.copy_docs(site)
    method_ctx = methodology.methodology_page(rows, loaded.results, task_specs, docs, repo_url)
    _write(site, "methodology.html", env.get_template("methodology.html").render(root="", m=method_ctx))
    n += 1
    _write(site, "index.html", env.get_template("index.html").render(
        root="", cards=cards, profiles=profiles, tiers=D.sorted_unique(c["tier"] for c in cards),
        n_results=report.results, n_invalid=len(loaded.invalid), families=pages.family_view(rows, task_specs),
        not_run=[t for t in method_ctx["tasks"] if not t["has_page"]],
        idle_profiles=[p for p in method_ctx["profiles"] if not p["n"]], latest=method_ctx["latest"]))
    methods = [pages.method_page(m, records_by_method[m], method_specs.get(m)) for m in sorted(records_by_method)]
    _write(site, "methods/index.html", env.get_template("methods.html").render(
        root="../", methods=methods, matrix=pages.compatibility_view()))
    method_t = env.get_template("method.html")
    for m in methods:
        _write(site, f"methods/{m['name']}.html", method_t.render(root="../", m=m))
    n += 2 + len(methods)

    run_t = env.get_template("run.html")
    for r, rel, verified in loaded.results:
        raw = (results / rel).read_bytes()
        (site / "results" / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / "results" / rel).write_bytes(raw)
        marker = loaded.verified_files.get(rel)
        if marker is not None:
            shutil.copyfile(marker, site / "results" / (rel[: -len(".json")] + D.VERIFIED_SUFFIX))
        depth = "../" * len(rel.split("/"))  # runs/<profile>/<task>/<method>/
        _write(site, f"runs/{rel[:-len('.json')]}.html",
               run_t.render(root=depth, run=pages.run_page(r, rel, verified, raw.decode("utf-8"),
                                                           loaded.verification.get(rel))))
        n += 1
    report.tasks, report.pages = len(cards), n
    return report

