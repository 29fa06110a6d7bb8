"""Shared fixtures. Every test session gets its own empty cache (BENCH_CACHE), so tests never read or
write the user's cache; the digits reference comes from the committed artifact, so nothing is retrained.
`BENCH_TEST_CACHE=<folder>` opts a session into that cache instead: the benchmarks then time the trained parts
`bench run` left there (the heads, drafts and adapted drafts of the records) rather than training their own."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config):
    os.environ["BENCH_CACHE"] = os.environ.get("BENCH_TEST_CACHE") or tempfile.mkdtemp(prefix="bench-test-cache-")


@pytest.fixture
def results_root(tmp_path):
    return tmp_path / "results"


@pytest.fixture(scope="session")
def kd_digits_run(tmp_path_factory):
    """One real `kd` run on digits at the default (full) budget, shared by the tests that read it."""
    from bench.runner import run

    root = tmp_path_factory.mktemp("kd-results")
    return run("digits", "kd", results_root=root)
