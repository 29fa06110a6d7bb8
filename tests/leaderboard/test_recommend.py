"""`bench recommend` and the selection logic it shares with the site: fronts, tie-aware ranks, budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from leaderboard import data as D
from lb_synth import make_result, unreliable_tree, write

runner = CliRunner()


def row(speedup, delta, slo=None, shi=None, dlo=None, dhi=None, hib=True, ref=0.9, name="m", i=0, ok=True,
        reasons=None):
    return {"speedup": speedup, "delta": delta, "slo": slo if slo is not None else speedup * 0.95,
            "shi": shi if shi is not None else speedup * 1.05, "dlo": dlo, "dhi": dhi, "hib": hib, "ref": ref,
            "method": name, "hps": "", "id": f"r{i}", "family": "none" if name == "none" else "pruning", "speed_ok": ok,
            "speed_reasons": [] if ok else (reasons or ["contended: other processes used 50% of the 2 CPUs"])}


def test_pareto_front():
    rows = [row(1.0, 0.0), row(2.0, -0.01), row(3.0, -0.05), row(1.5, -0.02), row(2.0, -0.01), row(0.9, 0.01),
            row(3.0, -0.06)]
    assert D.pareto_front(rows) == {0, 1, 2, 4, 5}  # 3 is dominated by 1; 6 by 2; 1 and 4 are equal
    assert D.pareto_front([]) == set()
    lower = [row(1.0, 0.0, hib=False), row(2.0, 1.0, hib=False), row(2.0, -1.0, hib=False)]
    assert D.pareto_front(lower) == {2}  # lower is better: a negative delta is an improvement


def test_the_reference_itself_bounds_the_front():
    # not compressing at all (1x, no change) dominates a row that is slower and no better, or as fast and worse
    rows = [row(0.9, 0.0), row(0.8, 0.01), row(1.0, -0.01), row(2.0, -0.02)]
    assert D.pareto_front(rows) == {1, 3}  # without the reference, 0 and 2 would be on it too
    assert D.pareto_front([row(1.0, 0.0)]) == {0}  # equal to the reference: not dominated


def test_ranks_are_ties_when_intervals_overlap():
    ivs = [(2.9, 3.1), (2.8, 3.0), (1.0, 1.2), (0.5, 2.95)]
    assert D.tied_ranks(ivs) == [1, 1, 3, 1]
    # rows that share a rank never have separated intervals
    ranks = D.tied_ranks(ivs)
    for a in range(len(ivs)):
        for b in range(len(ivs)):
            if ranks[a] == ranks[b]:
                assert not (ivs[a][0] > ivs[b][1] or ivs[b][0] > ivs[a][1])


@pytest.mark.parametrize("text,amount,relative", [("1%", 1.0, True), ("0.5 %", 0.5, True), ("1pp", 0.01, False),
                                                   ("0.5 PP", 0.005, False), ("0%", 0.0, True), ("2fid", 2.0, False)])
def test_parse_budget(text, amount, relative):
    b = D.parse_budget(text)
    assert (b.amount, b.relative) == (pytest.approx(amount), relative)


@pytest.mark.parametrize("text", ["abc", "-1%", "-0.1", "nan", "1%%", "inf%", "1pp%"])
def test_bad_budget(text):
    with pytest.raises(D.BudgetError):
        D.parse_budget(text)


def test_a_bare_number_is_refused_showing_both_readings():
    """'0.5' once meant 50% of nothing in particular: relative or absolute must be written."""
    with pytest.raises(D.BudgetError) as e:
        D.parse_budget("0.5", "top1_accuracy")
    assert "'0.5%'" in str(e.value) and "'0.5pp'" in str(e.value) and "'0.5top1_accuracy'" in str(e.value)
    with pytest.raises(D.BudgetError, match="not this task's metric"):
        D.parse_budget("2fid", "top1_accuracy")
    assert str(D.parse_budget("0.5pp")) == "0.5 pp (absolute)" and str(D.parse_budget("1%")) == "1% of the reference"


def test_budget_in_metric_units():
    assert D.parse_budget("1%").allowed(0.9) == pytest.approx(0.009)
    assert D.parse_budget("2pp").allowed(0.9) == pytest.approx(0.02)
    assert D.parse_budget("2fid", "fid").allowed(12.0) == pytest.approx(2.0)


def test_recommend_ranks_what_fits_the_budget_with_a_measured_speedup():
    rows = [row(1.0, 0.0, name="none"), row(3.0, -0.004, name="kd", dlo=-0.012, dhi=0.004),
            row(3.1, -0.03, name="kd2"), row(2.0, -0.002, name="prune", i=1), row(1.5, -0.008, name="slow"),
            row(1.1, 0.0, name="tiny", slo=0.97, shi=1.2), row(0.8, 0.0, name="slower")]
    picks = D.recommend(rows, D.parse_budget("1%"))  # 0.009 allowed
    # not only the front: "slow" is within the budget and faster than the reference beyond doubt; "tiny"'s
    # interval includes 1x and "slower" lies below it: no measured speedup; the noise floor is never a pick
    assert [p["method"] for p in picks] == ["kd", "prune", "slow"]
    assert [p["rank"] for p in picks] == [1, 2, 3]
    assert picks[0]["sure"] is False and picks[1]["sure"] is True  # kd's interval reaches -0.012
    assert [r["method"] for r in D.left_out(rows, D.parse_budget("1%"), "no-speedup")] == ["tiny", "slower"]
    assert [r["method"] for r in D.left_out(rows, D.parse_budget("1%"), "outside")] == ["kd2"]
    assert [p["method"] for p in D.recommend(rows, D.parse_budget("5pp"))] == ["kd2", "kd", "prune", "slow"]
    # the order the page lists them in: noise floor, ranked, no speedup, unreliable, outside
    assert [r["standing"] for r in D.rank_within(rows, D.parse_budget("1%"))] == \
        ["noise", "ranked", "ranked", "ranked", "no-speedup", "no-speedup", "outside"]


def test_measured_speedup_needs_the_whole_interval_above_one():
    assert D.measured_speedup(row(1.84, 0.0, slo=1.01, shi=1.97))
    assert not D.measured_speedup(row(1.84, 0.0, slo=0.75, shi=1.97))  # toca's 1.84x [0.75, 1.97]
    assert not D.measured_speedup(row(1.0, 0.0, slo=1.0, shi=1.0))
    assert not D.measured_speedup(row(0.9, 0.0, slo=0.68, shi=1.37))  # sparsegpt's 0.90x [0.68, 1.37]


def test_one_tie_rule_a_mark_means_overlapping_intervals():
    # kd-lm 1.90x [1.86, 1.92] overlapped four rows ranked 1 yet showed a plain "2": a rank counts the rows
    # faster beyond doubt, and '=' marks exactly the rows whose intervals overlap another ranked row's
    rows = [row(2.02, 0.0, slo=1.97, shi=2.08, name="minillm"), row(1.96, 0.0, slo=1.91, shi=2.02, name="seqkd"),
            row(1.90, 0.0, slo=1.86, shi=1.92, name="kd-lm"), row(1.41, 0.0, slo=1.39, shi=1.44, name="spec")]
    picks = {p["method"]: p for p in D.recommend(rows, D.parse_budget("1%"))}
    assert {m: p["rank"] for m, p in picks.items()} == {"minillm": 1, "seqkd": 1, "kd-lm": 2, "spec": 4}
    assert [t.split(" (")[0] for t in picks["kd-lm"]["tied_with"]] == ["seqkd"]
    assert picks["spec"]["tied_with"] == []
    assert "rank 2: 1 result is faster beyond doubt" in D.tie_text(picks["kd-lm"])
    assert "= tied: its interval overlaps 1 other ranked result (seqkd" in D.tie_text(picks["kd-lm"])
    assert "tied" not in D.tie_text(picks["spec"])
    assert D.overlapping([(1, 2), (2, 3), (4, 5)]) == [[1], [0], []]  # touching intervals overlap


def test_family_best_is_the_fastest_pick_per_family_and_task():
    def fam(r, f, t):
        return {**r, "family": f, "task": t}
    rows = [fam(row(3.0, -0.004, name="kd"), "distillation", "a"), fam(row(5.0, -0.2, name="kd2"), "distillation", "a"),
            fam(row(2.0, 0.0, name="prune"), "pruning", "a"), fam(row(1.5, 0.0, name="wanda"), "pruning", "b"),
            fam(row(0.9, 0.0, name="slowp"), "pruning", "b")]
    best = D.family_best(rows, {"a": D.parse_budget("1%"), "b": D.parse_budget("1%")})
    assert {k: v["method"] for k, v in best.items()} == {("distillation", "a"): "kd", ("pruning", "a"): "prune",
                                                          ("pruning", "b"): "wanda"}


def test_unreliable_speeds_are_never_ranked_on_the_front_or_recommended():
    bad = ["contended: other processes used 50% of the 2 CPUs while the pairs ran (limit 10%)"]
    rows = [row(1.0, 0.0, name="none"), row(5.0, 0.0, name="fast", ok=False, reasons=bad),
            row(3.0, -0.004, name="kd"), row(2.0, -0.002, name="prune", i=1)]
    picks = D.recommend(rows, D.parse_budget("1%"))
    # "fast" would dominate both, but its speed is unreliable: it neither ranks nor shapes the front
    assert D.pareto_front([r for r in rows if D.rankable(r)]) == {0, 1}  # kd and prune, once "fast" is left out
    assert [p["method"] for p in picks] == ["kd", "prune"] and [p["rank"] for p in picks] == [1, 2]
    assert [r["method"] for r in D.unreliable_within(rows, D.parse_budget("1%"))] == ["fast"]
    assert D.unreliable_text(rows[1]) == "unreliable speed: " + bad[0]
    assert not D.rankable(rows[0]) and not D.rankable(rows[1]) and D.rankable(rows[2])
    only_bad = [row(1.0, 0.0, name="none"), row(5.0, 0.0, name="fast", ok=False)]
    assert D.recommend(only_bad, D.parse_budget("1%")) == []


def test_cli_recommend(results_tree: Path):
    res = runner.invoke(app, ["recommend", "--task", "digits", "--profile", "cpu", "--max-drop", "1%",
                              "--results", str(results_tree)])
    assert res.exit_code == 0, res.output
    out = res.output
    # within 0.98 pp with a measured speedup, fastest first: kd T=4 (3.0x), deepcache (2.2x), magnitude 0.5
    # (1.4x); speculative (0.9x) is within the budget with no measured speedup; kd T=2 (-3 pp) is outside
    order = [out.index(f"bench reproduce results/cpu/digits/{m}/") for m in ("kd", "deepcache", "magnitude")]
    assert order == sorted(order)
    assert "bench reproduce results/cpu/digits/none/" not in out  # the noise floor is never a pick
    assert "Noise floor (reference vs itself): 1.00× [0.98×, 1.02×]" in out
    assert "bench reproduce results/cpu/digits/speculative/" not in out
    tail = out.split("no measured speedup", 1)[1]
    assert "speculative (k=4)" in tail and "Outside the budget (2)" in tail and "temperature=2.0" in tail
    assert "5.00×" not in out  # nor the h100 run: profiles never mix
    assert "originally: bench run --method kd --task digits --profile cpu" in out
    assert "3.00×" in out and "[2.70×, 3.30×]" in out  # the interval beside the point estimate
    assert "<script>alert(1)</script>" in out  # printed as text, not eaten as rich markup


def test_cli_recommend_json(results_tree: Path):
    res = runner.invoke(app, ["recommend", "-t", "digits", "--max-drop", "0.5pp", "--json",
                              "--results", str(results_tree)])
    assert res.exit_code == 0, res.output
    picks = json.loads(res.stdout)
    assert [p["method"] for p in picks] == ["kd", "magnitude"] and [p["rank"] for p in picks] == [1, 2]
    assert all(p["reproduce"].startswith("bench reproduce results/cpu/digits/") for p in picks)
    assert picks[0]["tied_with"] == []
    # nothing but the noise floor within 0.001; speculative is slower than the reference at the same quality
    res = runner.invoke(app, ["recommend", "-t", "digits", "--max-drop", "0.1pp", "--json",
                              "--results", str(results_tree)])
    assert res.exit_code == 1 and json.loads(res.stdout) == []


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
    assert res.exit_code == 1 and "No method qualifies" in res.output
    assert "Outside the budget (1)" in res.output and "kd (temperature=4.0, alpha=0.5)" in res.output


def test_cli_recommend_default_budget_is_the_tasks_and_units_are_explicit(results_tree: Path):
    res = runner.invoke(app, ["recommend", "--task", "digits", "--results", str(results_tree)])
    assert res.exit_code == 0 and "the task's declared budget" in res.output and "1% of the reference" in res.output
    res = runner.invoke(app, ["recommend", "--task", "digits", "--max-drop", "0.5", "--results", str(results_tree)])
    assert res.exit_code == 2 and "'0.5%'" in res.output and "'0.5pp'" in res.output


def test_cli_recommend_leaves_unreliable_speeds_out_and_names_them(tmp_path: Path):
    root = unreliable_tree(tmp_path / "results")
    res = runner.invoke(app, ["recommend", "--task", "digits", "--max-drop", "1%", "--results", str(root)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "Recommended" in out and "bench reproduce results/cpu/digits/kd/" in out
    assert "bench reproduce results/cpu/digits/magnitude/" not in out
    assert "bench reproduce results/cpu/digits/deepcache/" not in out
    assert "Within the budget but the speed is unreliable" in out and "UNRELIABLE" in out
    assert "contended: other processes used 50% of the 2 CPUs" in out
    assert "timed before bench measured contention and precision" in out  # the legacy record's reason
    assert f"bench remeasure {root.as_posix()}/cpu/digits/magnitude/" in out
    res = runner.invoke(app, ["recommend", "--task", "digits", "--max-drop", "1%", "--json", "--results", str(root)])
    assert res.exit_code == 0 and [p["method"] for p in json.loads(res.stdout)] == ["kd"]
    assert "unreliable speed" in res.stderr and "magnitude" in res.stderr


def test_cli_recommend_when_only_unreliable_speeds_fit(tmp_path: Path):
    root = tmp_path / "results"
    write(make_result(method="kd", delta=-0.004, speedup=2.0, n=1, speed_status=None), root)
    write(make_result(method="magnitude", hp={"sparsity": 0.9}, delta=-0.05, speedup=4.0, n=2), root)
    res = runner.invoke(app, ["recommend", "--task", "digits", "--max-drop", "1%", "--results", str(root)])
    assert res.exit_code == 1, res.output
    assert "No method qualifies" in res.output and "Within the budget but the speed is unreliable" in res.output
    assert "kd (temperature=4.0, alpha=0.5)" in res.output and "UNRELIABLE" in res.output
    # and where a task has no noise floor on the profile, recommend says how to make one
    assert "no noise-floor record yet: bench run --method none --task digits --profile cpu" in res.output
