"""`bench recommend` and the selection logic it shares with the site: fronts, tie-aware ranks, budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from leaderboard import data as D
from lb_synth import make_result, write

runner = CliRunner()


def row(speedup, delta, slo=None, shi=None, dlo=None, dhi=None, hib=True, ref=0.9, name="m", i=0):
    return {"speedup": speedup, "delta": delta, "slo": slo if slo is not None else speedup * 0.95,
            "shi": shi if shi is not None else speedup * 1.05, "dlo": dlo, "dhi": dhi, "hib": hib, "ref": ref,
            "method": name, "id": f"r{i}"}


def test_pareto_front():
    rows = [row(1.0, 0.0), row(2.0, -0.01), row(3.0, -0.05), row(1.5, -0.02), row(2.0, -0.01), row(0.9, 0.01),
            row(3.0, -0.06)]
    assert D.pareto_front(rows) == {0, 1, 2, 4, 5}  # 3 is dominated by 1; 6 by 2; 1 and 4 are equal
    assert D.pareto_front([]) == set()
    lower = [row(1.0, 0.0, hib=False), row(2.0, 1.0, hib=False), row(2.0, -1.0, hib=False)]
    assert D.pareto_front(lower) == {2}  # lower is better: a negative delta is an improvement


def test_ranks_are_ties_when_intervals_overlap():
    ivs = [(2.9, 3.1), (2.8, 3.0), (1.0, 1.2), (0.5, 2.95)]
    assert D.tied_ranks(ivs) == [1, 1, 3, 1]
    # rows that share a rank never have separated intervals
    ranks = D.tied_ranks(ivs)
    for a in range(len(ivs)):
        for b in range(len(ivs)):
            if ranks[a] == ranks[b]:
                assert not (ivs[a][0] > ivs[b][1] or ivs[b][0] > ivs[a][1])


@pytest.mark.parametrize("text,amount,relative", [("1%", 1.0, True), ("0.5 %", 0.5, True), ("0.01", 0.01, False),
                                                   ("0", 0.0, False)])
def test_parse_budget(text, amount, relative):
    b = D.parse_budget(text)
    assert (b.amount, b.relative) == (amount, relative)


@pytest.mark.parametrize("text", ["abc", "-1%", "-0.1", "nan", "1%%"])
def test_bad_budget(text):
    with pytest.raises(D.BudgetError):
        D.parse_budget(text)


def test_budget_in_metric_units():
    assert D.parse_budget("1%").allowed(0.9) == pytest.approx(0.009)
    assert D.parse_budget("0.02").allowed(0.9) == pytest.approx(0.02)


def test_recommend_keeps_the_front_within_budget_fastest_first():
    rows = [row(1.0, 0.0, name="none"), row(3.0, -0.004, name="kd", dlo=-0.012, dhi=0.004),
            row(3.1, -0.03, name="kd2"), row(2.0, -0.002, name="prune", i=1), row(1.5, -0.008, name="slow")]
    picks = D.recommend(rows, D.parse_budget("1%"))  # 0.009 allowed
    assert [p["method"] for p in picks] == ["kd", "prune", "none"]
    assert [p["rank"] for p in picks] == [1, 2, 3]
    assert picks[0]["sure"] is False and picks[1]["sure"] is True  # kd's interval reaches -0.012
    assert [p["method"] for p in D.recommend(rows, D.parse_budget("0.05"))] == ["kd2", "kd", "prune", "none"]


def test_cli_recommend(results_tree: Path):
    res = runner.invoke(app, ["recommend", "--task", "digits", "--profile", "cpu", "--max-drop", "1%",
                              "--results", str(results_tree)])
    assert res.exit_code == 0, res.output
    out = res.output
    # front within 0.98 pp: kd T=4 (3.0x), magnitude 0.5 (1.4x), none; not kd T=2 (-3 pp), not deepcache
    # (within budget, but kd is faster and better), not speculative (slower than none at the same quality)
    order = [out.index(f"bench reproduce results/cpu/digits/{m}/") for m in ("kd", "magnitude", "none")]
    assert order == sorted(order)
    assert "deepcache" not in out and "speculative" not in out
    assert "temperature=2.0" not in out and "5.00×" not in out  # nor the h100 run: profiles never mix
    assert "originally: bench run --method kd --task digits --profile cpu" in out
    assert "3.00×" in out and "[2.70×, 3.30×]" in out  # the interval beside the point estimate
    assert "<script>alert(1)</script>" in out  # printed as text, not eaten as rich markup


def test_cli_recommend_json(results_tree: Path):
    res = runner.invoke(app, ["recommend", "-t", "digits", "--max-drop", "0.001", "--json",
                              "--results", str(results_tree)])
    assert res.exit_code == 0, res.output
    picks = json.loads(res.output)
    assert [p["method"] for p in picks] == ["none"] or picks[0]["method"] == "speculative"
    assert all(p["reproduce"].startswith("bench reproduce results/cpu/digits/") for p in picks)


def test_cli_recommend_errors(results_tree: Path, tmp_path: Path):
    res = runner.invoke(app, ["recommend", "--task", "digit", "--results", str(results_tree)])
    assert res.exit_code == 2 and "Did you mean 'digits'" in res.output
    res = runner.invoke(app, ["recommend", "--task", "digits", "--profile", "a100-bf16",
                              "--results", str(results_tree)])
    assert res.exit_code == 2 and "Profiles with results for 'digits': cpu, h100-bf16" in res.output
    res = runner.invoke(app, ["recommend", "--task", "digits", "--max-drop", "lots", "--results", str(results_tree)])
    assert res.exit_code == 2 and "--max-drop" in res.output
    res = runner.invoke(app, ["recommend", "--task", "digits", "--results", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_cli_recommend_nothing_within_budget(tmp_path: Path):
    root = tmp_path / "results"
    write(make_result(method="kd", delta=-0.05, speedup=3.0), root)
    res = runner.invoke(app, ["recommend", "--task", "digits", "--max-drop", "1%", "--results", str(root)])
    assert res.exit_code == 1 and "No method on the Pareto front is within the budget" in res.output
