"""The site builder: pages, purity (byte-identical output), escaping, invalid files, the CLI and the server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from leaderboard.build import MARKER, BuildError, build_site
from lb_synth import CONTENDED, XSS, make_result, synthetic_tree, unreliable_tree, write

runner = CliRunner()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def embedded(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="lb-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(m.group(1))


def test_pages_for_every_task_method_and_run(results_tree: Path, tmp_path: Path):
    out = tmp_path / "site"
    report = build_site(results_tree, out)
    # 8 rows shown; 7 ranked: the `none` row is the noise floor, never ranked
    assert (report.results, report.shown, report.ranked, report.unreliable, report.tasks, report.invalid) == \
        (9, 8, 7, 0, 1, [])
    for rel in ("index.html", "tasks/digits.html", "methods/index.html", "methods/kd.html", "assets/task.js",
                "assets/site.css", "assets/site.js", MARKER):
        assert (out / rel).is_file(), rel
    sources = sorted(p for p in results_tree.rglob("*.json") if not p.name.endswith(".verified.json"))
    assert len(sources) == 9
    for src in sources:
        rel = src.relative_to(results_tree).as_posix()
        assert (out / "results" / rel).read_bytes() == src.read_bytes()  # the raw files, for download
        page = (out / "runs" / rel).with_suffix(".html").read_text()
        assert f"bench reproduce results/{rel}" in page
        assert f'href="../../../../results/{rel}"' in page
    assert len(list((out / "results").rglob("*.verified.json"))) == 1
    home = (out / "index.html").read_text()
    assert "tasks/digits.html" in home and "98.0%" in home  # the reference value
    data = embedded(out / "tasks" / "digits.html")
    assert data["profiles"] == ["cpu", "h100-bf16"] and data["default_profile"] == "cpu"
    assert len(data["rows"]) == 8 and sum(r["verified"] for r in data["rows"]) == 1
    for r in data["rows"]:  # every row links to an existing run page and raw file
        assert (out / r["page"]).is_file() and (out / "results" / r["file"]).is_file()


def test_the_methods_page_shows_what_runs_where_from_the_registries(results_tree: Path, tmp_path: Path):
    """Every registered method against every registered task, with or without results: a tick where the
    registry says it runs, the missing capability where only that is lacking, nothing for another modality."""
    from bench.registry import METHODS, TASKS, missing_capabilities, supports

    build_site(results_tree, tmp_path / "site")
    page = (tmp_path / "site" / "methods" / "index.html").read_text()
    table = page[page.index('id="compatibility"'):]
    rows = re.findall(r"<tr><td><span[^>]*>([^<]+)</span></td>\s*(.*?)</tr>", table, re.S)
    assert {name for name, _ in rows} == {m.name for m in METHODS}
    heads = re.findall(r'<th title="[^"]*">([^<]+)</th>', table)
    assert set(heads) == {t.name for t in TASKS}
    specs = {t.name: t for t in TASKS}
    for name, cells in rows:
        m = next(x for x in METHODS if x.name == name)
        states = re.findall(r'<td class="fit-(\w+)"', cells)
        for t, state in zip(heads, states):
            want = "yes" if supports(m, specs[t]) else ("needs" if specs[t].modality in m.modalities else "other")
            assert state == want, (name, t)
            if want == "needs":
                assert missing_capabilities(m, specs[t])
    assert "fit-needs" in table and "fit-yes" in table  # both kinds occur in this registry


def test_the_site_is_readable_by_a_web_server_whatever_the_umask(results_tree: Path, tmp_path: Path):
    import os
    import stat

    old = os.umask(0o077)  # the strictest usual umask: nothing for group and others
    try:
        build_site(results_tree, tmp_path / "site")
    finally:
        os.umask(old)
    for p in [tmp_path / "site", *(tmp_path / "site").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_best_per_family_is_per_profile(results_tree: Path, tmp_path: Path):
    build_site(results_tree, tmp_path / "site")
    home = (tmp_path / "site" / "index.html").read_text()
    cpu, h100 = home.split('data-profile="cpu"')[1].split('data-profile="h100-bf16"')
    assert "3.00×" in cpu and "5.00×" not in cpu  # kd T=4 on cpu; the h100 run is never ranked with it
    assert "5.00×" in h100


def test_build_is_a_pure_function(results_tree: Path, tmp_path: Path):
    a = build_site(results_tree, tmp_path / "a").out
    moved = tmp_path / "elsewhere" / "res"
    shutil.copytree(results_tree, moved)
    b = build_site(moved, tmp_path / "b").out
    assert tree_bytes(a) == tree_bytes(b)
    assert str(tmp_path) not in "".join(v.decode() for k, v in tree_bytes(a).items() if k.endswith(".html"))
    build_site(results_tree, a)  # a rebuild in place gives the same bytes again
    assert tree_bytes(a) == tree_bytes(b)


def test_rebuild_drops_removed_results_and_leaves_no_temporaries(results_tree: Path, tmp_path: Path):
    out = tmp_path / "site"
    build_site(results_tree, out)
    gone = next(results_tree.rglob("deepcache/*.json"))
    gone.unlink()
    build_site(results_tree, out)
    assert not list((out / "runs").rglob("deepcache/*.html")) and not list((out / "results").rglob("deepcache/*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "site"]


def test_refuses_to_replace_a_folder_it_did_not_build(results_tree: Path, tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="refusing"):
        build_site(results_tree, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_strings_from_results_are_escaped(results_tree: Path, tmp_path: Path):
    out = build_site(results_tree, tmp_path / "site").out
    pages = {k: v.decode() for k, v in tree_bytes(out).items() if k.endswith(".html")}
    for name, text in pages.items():
        assert XSS not in text, name
        assert "<script>alert" not in text, name
        assert 'href="javascript:' not in text.lower(), name
    run = next(v for k, v in pages.items() if k.startswith("runs/") and "&lt;script&gt;alert(1)&lt;/script&gt;" in v)
    assert "javascript:alert(1)" in run  # shown as text, never as a link
    task = pages["tasks/digits.html"]
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in task
    rows = embedded(out / "tasks" / "digits.html")["rows"]
    assert any(XSS in r["hp"] for r in rows)  # the data itself is intact once parsed


def write_invalid(root: Path) -> dict[str, str]:
    """Four kinds of bad file, each with (part of) the reason the build must name."""
    bad = {}
    p = root / "cpu" / "digits" / "kd" / "broken.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("{not json")
    bad[str(p)] = "not JSON"
    p = root / "cpu" / "digits" / "kd" / "other.json"
    p.write_text(json.dumps({"schema": "something/2"}))
    bad[str(p)] = "schema"
    r = make_result(method="kd", n=77)
    p = write(r, root)
    d = json.loads(p.read_text())
    d["quality"]["delta"] = 0.5  # breaks delta == value - reference
    p.write_text(json.dumps(d))
    bad[str(p)] = "quality.delta"
    r = make_result(method="deepcache", hp={"interval": 9}, n=78)
    p = root / "cpu" / "digits" / "kd" / f"{r.run_id}.json"  # under the wrong method's folder
    p.write_text(r.to_json())
    bad[str(p)] = "fields place it at"
    return bad


def test_invalid_files_are_skipped_with_a_warning(results_tree: Path, tmp_path: Path):
    bad = write_invalid(results_tree)
    report = build_site(results_tree, tmp_path / "site")
    assert report.results == 9
    assert {str(e.path): "; ".join(e.problems) for e in report.invalid}.keys() == bad.keys()
    for e in report.invalid:
        assert bad[str(e.path)] in "; ".join(e.problems)
    res = runner.invoke(app, ["leaderboard", "build", "--results", str(results_tree), "--out",
                              str(tmp_path / "site2")])
    assert res.exit_code == 0, res.output
    for path, reason in bad.items():
        assert f"skipped invalid result {path}" in res.output
    assert "4 invalid file(s) skipped" in res.output


def test_strict_fails_and_writes_nothing(results_tree: Path, tmp_path: Path):
    write_invalid(results_tree)
    with pytest.raises(BuildError, match="broken.json"):
        build_site(results_tree, tmp_path / "site", strict=True)
    res = runner.invoke(app, ["leaderboard", "build", "--results", str(results_tree), "--out",
                              str(tmp_path / "site"), "--strict"])
    assert res.exit_code == 1 and "invalid" in res.output
    assert not (tmp_path / "site").exists()


def test_verification_records_are_not_read_as_results(results_tree: Path, tmp_path: Path):
    report = build_site(results_tree, tmp_path / "site")
    assert report.invalid == [] and report.results == 9  # the kd run's .verified.json is a flag, not a result


def test_empty_and_missing_trees(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    build_site(tmp_path / "empty", tmp_path / "site")
    assert "No results yet" in (tmp_path / "site" / "index.html").read_text()
    res = runner.invoke(app, ["leaderboard", "build", "--results", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "site")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_cli_build_and_serve(results_tree: Path, tmp_path: Path):
    from leaderboard.cli import make_server

    out = tmp_path / "site"
    res = runner.invoke(app, ["leaderboard", "build", "--results", str(results_tree), "--out", str(out)])
    assert res.exit_code == 0 and "9 results (7 ranked) on 1 task(s)" in res.output
    server = make_server(out, 0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks/digits.html", timeout=10) as r:
            assert r.status == 200 and b'id="lb-data"' in r.read()
    finally:
        server.shutdown()
        server.server_close()
    res = runner.invoke(app, ["leaderboard", "serve", "--out", str(tmp_path / "none")])
    assert res.exit_code == 2 and "bench leaderboard build" in res.output


def test_many_results_spread_over_tasks_and_profiles(tmp_path: Path):
    synthetic_tree(tmp_path / "results", 120)
    report = build_site(tmp_path / "results", tmp_path / "site")
    assert (report.results, report.tasks, report.invalid) == (120, 3, [])
    for task in ("digits", "digits-gen", "arith"):
        data = embedded(tmp_path / "site" / "tasks" / f"{task}.html")
        assert data["profiles"] == ["cpu", "h100-bf16"]
        assert {r["family"] for r in data["rows"]} >= {"distillation", "pruning", "caching", "decoding"}


def test_import_is_light():
    code = ("import sys, leaderboard.cli, leaderboard.build, leaderboard.data, leaderboard.pages; "
            "print(sorted(m for m in ('torch', 'jinja2', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unreliable_speeds_are_greyed_with_their_reasons_and_never_ranked(tmp_path: Path):
    from bench.result import LEGACY_REASON

    root = unreliable_tree(tmp_path / "results")
    report = build_site(root, tmp_path / "site")
    assert (report.shown, report.ranked, report.unreliable) == (5, 2, 2)
    site = report.out
    rows = {r["method"]: r for r in embedded(site / "tasks" / "digits.html")["rows"] if r["profile"] == "cpu"}
    assert rows["magnitude"]["speed_ok"] is False and rows["magnitude"]["speed_reasons"] == [CONTENDED,
                                                                                           f"imprecise: {XSS}"]
    assert rows["deepcache"]["speed_ok"] is False and rows["deepcache"]["speed_reasons"] == [LEGACY_REASON]
    assert rows["kd"]["speed_ok"] is True and rows["none"]["noise"] is True
    assert rows["magnitude"]["value"] is not None  # quality is shown as usual

    # home card: the fastest pick per family skips the unreliable speeds, and says why a family has none
    home = (site / "index.html").read_text()
    card = home.split('<section class="card"')[1]
    cpu = card.split('data-profile="cpu"')[1].split('data-profile="h100-bf16"')[0]
    assert "2.00×" in cpu and "4.00×" not in cpu and "6.00×" not in cpu
    assert "1 ranked result," in cpu and "2 with an unreliable speed" in cpu
    assert cpu.count("1 within the budget with an unreliable speed") == 2  # pruning and caching
    # run page: the speed greyed, marked and explained; quality untouched
    run = next((site / "runs" / "cpu" / "digits" / "magnitude").glob("*.html")).read_text()
    assert 'class="unreliable"' in run and '<span class="flag">unreliable</span>' in run
    assert CONTENDED in run and "&lt;script&gt;" in run and XSS not in run
    assert "bench remeasure results/cpu/digits/magnitude/" in run
    assert "50% of the 2 CPUs" in run  # the contention measured
    legacy = next((site / "runs" / "cpu" / "digits" / "deepcache").glob("*.html")).read_text()
    assert "timed before bench measured contention and precision" in legacy
    ok = next((site / "runs" / "cpu" / "digits" / "kd").glob("*.html")).read_text()
    assert 'Speed verdict: <span class="ok">ok</span>' in ok and '<span class="flag">unreliable</span>' not in ok
    # method page: greyed, marked, with the reasons as text and as a tooltip
    method = (site / "methods" / "magnitude.html").read_text()
    assert '<td class="unreliable" title="unreliable speed: ' + CONTENDED in method
    assert '<span class="flag">unreliable</span>' in method
    assert '<span class="flag">unreliable</span>' not in (site / "methods" / "kd.html").read_text()


def test_task_page_shows_the_noise_floor_or_how_to_make_one(tmp_path: Path):
    root = unreliable_tree(tmp_path / "results")
    site = build_site(root, tmp_path / "site").out
    task = (site / "tasks" / "digits.html").read_text()
    cpu = task.split('class="noise-floor" data-profile="cpu"')[1].split("</p>")[0]
    assert "Noise floor</strong> (reference vs itself" in cpu
    assert '<span class="nf-speed">1.00× [0.98×, 1.02×]</span>' in cpu
    h100 = task.split('data-profile="h100-bf16" hidden>')[1].split("</p>")[0]
    assert "no noise-floor record yet: <code>bench run --method none --task digits --profile h100-bf16</code>" in h100
    assert embedded(site / "tasks" / "digits.html")["noise"] == {
        "cpu": next(r["id"] for r in embedded(site / "tasks" / "digits.html")["rows"] if r["method"] == "none"),
        "h100-bf16": None}
    home = (site / "index.html").read_text()
    assert "Noise floor (reference vs itself): <a href=" in home
    assert "No noise-floor record yet: <code>bench run --method none --task digits --profile h100-bf16</code>" in home
    none_run = next((site / "runs" / "cpu" / "digits" / "none").glob("*.html")).read_text()
    assert "<strong>noise floor</strong>" in none_run


def test_noise_floor_prefers_a_reliable_run_and_greys_an_unreliable_one(tmp_path: Path):
    root = tmp_path / "results"
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1, seed=1,
                      created_at="2025-01-01T00:00:00+00:00"), root)
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.1, sci=0.2, n=2, seed=2, speed_status="unreliable",
                      created_at="2025-02-01T00:00:00+00:00"), root)
    task = (build_site(root, tmp_path / "site").out / "tasks" / "digits.html").read_text()
    assert "1.00× [0.98×, 1.02×]" in task and "(the latest reliable one of 2 <code>none</code> runs)" in task
    root2 = tmp_path / "results2"
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.1, sci=0.2, n=2, speed_status=None), root2)
    task = (build_site(root2, tmp_path / "site2").out / "tasks" / "digits.html").read_text()
    assert 'class="noise-floor unreliable" data-profile="cpu"' in task
    assert "Unreliable: timed before bench measured contention and precision" in task


def test_legacy_records_all_build_and_none_is_ranked(tmp_path: Path):
    """Records made before the speed verdict load as unreliable: the site shows them all, ranks none."""
    root = tmp_path / "results"
    for i, m in enumerate(("none", "kd", "magnitude")):
        write(make_result(method=m, hp={} if m == "none" else None, delta=0.0 if m == "none" else -0.003,
                          speedup=1.0 if m == "none" else 2.0 + i, n=i, speed_status=None), root)
    res = runner.invoke(app, ["leaderboard", "build", "--results", str(root), "--out", str(tmp_path / "site")])
    assert res.exit_code == 0, res.output
    assert "3 results (0 ranked; 2 with an unreliable speed, shown greyed and not ranked" in res.output
    home = (tmp_path / "site" / "index.html").read_text()
    assert "0 ranked results" in home and "2 with an unreliable speed" in home
