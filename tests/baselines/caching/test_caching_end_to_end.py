"""Whole runs through the runner on the digits-gen tasks (smoke budget): a UNet method on `digits-gen` and a DiT
method on `digits-gen-dit`. Slow: each trains a smoke reference and its FID classifier, samples the evaluation
set twice and times both samplers."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("task, method", [("digits-gen", "deepcache"), ("digits-gen-dit", "taylorseer"),
                                          ("digits-gen-dit", "diffusers-taylorseer"),
                                          ("digits-gen-dit", "teacache")])
def test_smoke_run(tmp_path, task, method):
    from bench.runner import run

    result = run(task, method, budget="smoke", results_root=tmp_path).result
    assert result.status == "ok"
    assert result.method_stats["nfe_partial"] > 0 and result.method_stats["nfe_full"] > 0
    assert result.compute.method < result.compute.reference  # fewer MACs: the ideal speedup is above 1
