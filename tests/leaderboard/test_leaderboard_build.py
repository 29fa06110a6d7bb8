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
from lb_synth import XSS, make_result, synthetic_tree, write

runner = CliRunner()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def embedded(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="lb-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(m.group(1))


def test_pages_for_every_task_method_and_run(results_tree: Path, tmp_path: Path):
    out = tmp_path / "site"
    report = build_site(results_tree, out)
    assert (report.results, report.ranked, report.tasks, report.invalid) == (9, 8, 1, [])
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
    assert "tasks/digits.html" in home and "98.00%" in home  # the reference value
    data = embedded(out / "tasks" / "digits.html")
    assert data["profiles"] == ["cpu", "h100-bf16"] and data["default_profile"] == "cpu"
    assert len(data["rows"]) == 8 and sum(r["verified"] for r in data["rows"]) == 1
    for r in data["rows"]:  # every row links to an existing run page and raw file
        assert (out / r["page"]).is_file() and (out / "results" / r["file"]).is_file()


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
    assert res.exit_code == 0 and "9 results (8 ranked) on 1 task(s)" in res.output
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
