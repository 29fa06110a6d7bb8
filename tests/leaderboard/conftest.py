from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for lb_synth, under --import-mode=importlib too

from lb_synth import XSS, make_result, write  # noqa: E402


@pytest.fixture
def results_tree(tmp_path: Path) -> Path:
    """A small results tree: one task on two profiles, every family, a tie, a verified and a failed run,
    and strings that try to inject markup."""
    root = tmp_path / "results"
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1), root)
    write(make_result(method="kd", hp={"temperature": 4.0, "alpha": 0.5}, delta=-0.004, speedup=3.0, n=2), root,
          verified=True)
    write(make_result(method="kd", hp={"temperature": 2.0, "alpha": 0.9}, delta=-0.03, speedup=3.1, n=3), root)
    write(make_result(method="magnitude", hp={"sparsity": 0.5, XSS: XSS}, delta=-0.002, speedup=1.4, n=4,
                      paper=XSS, url="javascript:alert(1)", command=f"bench run --set note='{XSS}'"), root)
    write(make_result(method="magnitude", hp={"sparsity": 0.9}, delta=-0.05, speedup=1.5, n=5), root)
    write(make_result(method="deepcache", hp={"interval": 3}, delta=-0.006, speedup=2.2, n=6), root)
    write(make_result(method="speculative", hp={"k": 4}, delta=0.0, speedup=0.9, n=7), root)
    write(make_result(method="kd", status="failed", n=8), root)
    write(make_result(method="kd", profile="h100-bf16", hp={"temperature": 4.0, "alpha": 0.5}, delta=-0.001,
                      speedup=5.0, n=9), root)
    return root


@pytest.fixture(scope="module")
def browser():
    """The system Chromium under Playwright, for the modules that import `browser_kit` (which skips them when
    either is absent)."""
    from browser_kit import ARGS, CHROMIUM, sync_api

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()
