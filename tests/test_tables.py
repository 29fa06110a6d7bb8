"""`bench.tables` and `bench report`: Markdown results tables generated from the records, and the README block
that must equal them (so no figure in the README can drift from the JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.result import Result
from bench.tables import BEGIN, END, MarkerError, between_markers, markdown_tables, replace_between_markers

sys.path.insert(0, str(Path(__file__).parent / "leaderboard"))  # the synthetic-record helpers
from lb_synth import make_result, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
cli = CliRunner()


def verdict(r: Result, status: str) -> Result:
    """The record with this speed verdict, whatever the helper's default: 'ok' as a quiet timing leaves it,
    'unreliable' with its reason (as every record timed before the verdict existed loads)."""
    data = r.model_dump(by_alias=True)
    reasons = [] if status == "ok" else ["timed before bench measured contention and precision"]
    data["speed"].update(status=status, reasons=reasons)
    return Result.model_validate(data)


def retimed(r: Result) -> Result:
    return verdict(r, "ok")


def untimed(r: Result) -> Result:
    return verdict(r, "unreliable")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    hp = {"temperature": 4.0, "alpha": 0.5}
    write(retimed(make_result(method="kd", hp=hp, ref=0.9822, delta=-0.0044, dci=0.011, speedup=1.9, sci=0.02,
                              n=1)), root)
    write(untimed(make_result(method="kd", hp={"temperature": 2.0, "alpha": 0.5}, ref=0.9822, delta=0.0022,
                              dci=0.005, speedup=6.34, sci=0.01, n=2)), root)
    write(untimed(make_result(method="none", hp={}, ref=0.9822, delta=0.0, dci=0.0, speedup=1.01, sci=0.01, n=3)),
          root)
    write(make_result(method="kd", hp=hp, status="failed", n=4), root)
    write(retimed(make_result(task="digits-gen", method="deepcache", hp={"interval": 3}, metric="fid", hib=False,
                              ref=12.14, delta=0.29, dci=0.98, speedup=1.81, sci=0.05, n=5)), root)
    return root


def table_rows(text: str, method: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| [{method}")]


def test_tables_format_every_figure_from_the_records(tree):
    text = markdown_tables(tree)
    assert text == markdown_tables(tree)  # deterministic
    assert "### `digits` on the `cpu` profile" in text and "### `digits-gen` on the `cpu` profile" in text
    assert text.index("### `digits` on") < text.index("### `digits-gen` on")
    assert "Not shown: 1 failed run." in text

    # two kd records that differ in one hyper-parameter: the label names it, rows sorted by its value
    kd = table_rows(text, "kd")
    assert [r.split("]")[0] for r in kd] == ["| [kd (temperature=2)", "| [kd (temperature=4)"]
    fast, slow = kd
    # accuracy as %, deltas in pp with 1 decimal and the paired interval, speedup with its interval
    assert "| 98.4% | 98.2% | +0.2 pp [-0.3, +0.7] |" in fast
    assert "6.34x [6.28, 6.40] (unreliable)" in fast  # the verdict the record carries is shown
    assert "| 97.8% | 98.2% | -0.4 pp [-1.5, +0.7] |" in slow
    assert "1.90x [1.86, 1.94] |" in slow and "unreliable" not in slow
    # MACs method / reference, parameters, training seconds and steps, the control-free fidelity column
    assert "| 0.042 |" in slow and "| 3,700 |" in slow and "| 12.5 s, 300 steps |" in slow
    assert "| 97.0% |" in slow
    assert "(results" not in slow and f"({(tree / 'cpu/digits/kd').as_posix()}/" in slow  # links to its record

    none = table_rows(text, "none")[0]
    assert "| 0.0 pp [0.0, 0.0] |" in none and "1.01x [1.00, 1.02] (unreliable)" in none
    assert text.index("| [kd (temperature=4)") < text.index("| [none]")  # families first, the control last

    # FID to 2 decimals, lower is better
    dc = table_rows(text, "deepcache")[0]
    assert "| 12.43 | 12.14 | +0.29 [-0.69, +1.27] |" in dc and "1.81x [1.72, 1.90] |" in dc
    assert "FID (`fid`, lower is better)" in text


def test_identical_configurations_are_numbered(tmp_path):
    root = tmp_path / "results"
    for n in (1, 2):
        write(make_result(method="kd", n=n, speedup=2.0 + n / 10), root)
    rows = table_rows(markdown_tables(root), "kd")
    assert [r.split("]")[0] for r in rows] == ["| [kd (run 1)", "| [kd (run 2)"]


def test_the_readme_block_is_generated_from_the_committed_records(monkeypatch):
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    generated = markdown_tables(Path("results"))
    assert between_markers(readme).strip("\n") == generated.strip("\n"), \
        "README.md's results block differs from the records: run `bench report --write-readme README.md`"
    assert replace_between_markers(readme, generated) == readme


@pytest.mark.parametrize("text, words", [
    ("no markers at all", f"no {BEGIN} and {END} marker"),
    (f"{BEGIN}\nonly the start", f"no {END} marker"),
    (f"only the end\n{END}", f"no {BEGIN} marker"),
    (f"{END}\nreversed\n{BEGIN}", "out of order"),
    (f"{BEGIN}\n{END}\n{BEGIN}\n{END}", "once each"),
], ids=["none", "no-end", "no-begin", "reversed", "twice"])
def test_replace_between_markers_refuses_bad_markers(text, words):
    with pytest.raises(MarkerError) as e:
        replace_between_markers(text, "| table |")
    assert words in str(e.value)


def test_replace_between_markers_keeps_the_rest():
    text = f"# title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n"
    new = replace_between_markers(text, "new table\n")
    assert new == f"# title\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\nafter\n"
    assert replace_between_markers(new, "new table") == new  # idempotent


def test_report_command_writes_and_checks_the_readme(tree, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nstale | 9.99x\n{END}\n\nend\n")
    res = cli.invoke(app, ["report", "--results", str(tree), "--check-readme", str(readme)])
    assert res.exit_code == 1 and "bench report --write-readme" in res.output.replace("\n", " ")
    res = cli.invoke(app, ["report", "--results", str(tree), "--write-readme", str(readme)])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith(f"{END}\n\nend\n") and "9.99x" not in text
    assert between_markers(text).strip("\n") == markdown_tables(tree).strip("\n")
    res = cli.invoke(app, ["report", "--results", str(tree), "--check-readme", str(readme)])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["report", "--results", str(tree), "--markdown"])
    assert res.exit_code == 0 and "### `digits` on the `cpu` profile" in res.output
    readme.write_text("# no markers\n")
    res = cli.invoke(app, ["report", "--results", str(tree), "--check-readme", str(readme)])
    assert res.exit_code == 1 and "marker" in res.output
