"""`bench run --compile`: both arms compiled alike (shared modules once, drafts found in closures), forwards
and generation configs restored afterwards, the record and the configuration hash say so. The tests compile
with the `eager` backend (Dynamo's capture, no code generation) to stay fast on 2 cores."""

from __future__ import annotations

import pytest
import torch

from bench.api import Subject


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    from bench import compiled

    monkeypatch.setenv(compiled.BACKEND_ENV, "eager")


def test_both_arms_are_compiled_alike_and_restored():
    from bench.compiled import compiled_arms

    shared, draft = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    gen = type("GenerationConfig", (), {"cache_implementation": None})()
    draft.generation_config = gen

    def generate(x):  # the method's procedure holds its draft in a closure
        return shared(x) + draft(x)

    ref, met = Subject(shared, "test"), Subject(shared, "test", {"generate": generate})
    x = torch.randn(2, 4)
    eager = generate(x)
    with compiled_arms(ref, met) as modules:
        assert len(modules) == 2 and any(m is shared for m in modules) and any(m is draft for m in modules)
        assert "forward" in shared.__dict__ and "forward" in draft.__dict__
        assert gen.cache_implementation == "static"
        torch.testing.assert_close(generate(x), eager)
    assert "forward" not in shared.__dict__ and "forward" not in draft.__dict__
    assert gen.cache_implementation is None


def test_restored_after_an_error():
    from bench.compiled import compiled_arms

    m = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with compiled_arms(Subject(m, "test")):
            raise RuntimeError("boom")
    assert "forward" not in m.__dict__


def test_a_compiled_run_says_so_and_hashes_apart(results_root):
    from bench.result import invariant_errors
    from bench.runner import run

    plain = run("digits", "none", budget="smoke", results_root=results_root).result
    comp = run("digits", "none", budget="smoke", results_root=results_root, compile=True).result
    assert comp.profile.compiled and not plain.profile.compiled
    assert comp.provenance.config_hash != plain.provenance.config_hash
    assert comp.quality == plain.quality and comp.speed.speedup > 0
    assert not invariant_errors(comp)  # its configuration hash recomputes, compiled included


def test_compile_does_not_combine_with_worker_processes(results_root):
    from bench.config import ConfigError
    from bench.runner import run

    with pytest.raises(ConfigError, match="--processes 2"):
        run("digits", "none", budget="smoke", results_root=results_root, compile=True, processes=2)
