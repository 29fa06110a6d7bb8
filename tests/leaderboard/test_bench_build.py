"""Benchmark: `bench leaderboard build` over 5,000 synthetic valid results (target: under 10 s on 2 cores).

Runs only with `python -m pytest tests/leaderboard/test_bench_build.py --benchmark-only -m slow`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from leaderboard.build import build_site
from lb_synth import synthetic_tree

N = 5000


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "results"
    synthetic_tree(root, N)
    return root


@pytest.mark.slow
def test_build_5000_results(benchmark, big_tree: Path, tmp_path: Path):
    out = tmp_path / "site"
    report = benchmark.pedantic(build_site, args=(big_tree, out), rounds=3, iterations=1, warmup_rounds=0)
    assert report.results == N and report.invalid == []
    assert report.pages == N + 3 + 2 + 7  # runs + task pages + home and methods index + method pages
    median = statistics.median(benchmark.stats.stats.data)
    print(f"\nbuild of {N} results: median {median:.2f} s over 3 rounds "
          f"({report.pages} pages, {sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 2**20:.0f} MiB)")
    assert median < 10, f"building {N} results took {median:.1f} s (target: under 10 s)"
