"""End-to-end runs on `digits`: the record, determinism, failures and interruptions."""

from __future__ import annotations

import json

import pytest

from bench.registry import METHODS, get_task_spec
from bench.runner import RunFailed, run
from bench.store import load_result

DIGITS_METHODS = [n for n in METHODS.names() if "image-classification" in METHODS.get(n).modalities]


@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_every_method_runs_on_digits_and_validates(method, results_root):
    out = run("digits", method, budget="smoke", results_root=results_root)
    assert out.path.is_file() and out.path.parent == results_root / "cpu" / "digits" / method
    r = load_result(out.path, results_root)
    assert r.status == "ok" and 0 <= r.quality.value <= 1 and r.speed.speedup > 0
    assert r.quality.reference_value == pytest.approx(r.quality.value - r.quality.delta)


def test_quality_is_deterministic(results_root):
    import shutil

    from bench import cache

    a = run("digits", "kd", seed=3, budget="smoke", results_root=results_root).result
    shutil.rmtree(cache.cache_dir() / "evals" / "digits" / "methods")  # evaluate again, not from the cache
    b = run("digits", "kd", seed=3, budget="smoke", results_root=results_root).result
    assert a.quality == b.quality and a.controls[0].value == b.controls[0].value
    assert a.size == b.size and a.compute == b.compute
    assert a.provenance.config_hash == b.provenance.config_hash and a.run_id != b.run_id


def test_seed_changes_the_trained_student(results_root):
    a = run("digits", "magnitude", seed=0, overrides={"finetune_epochs": "1"}, budget="smoke",
            results_root=results_root).result
    b = run("digits", "magnitude", seed=1, overrides={"finetune_epochs": "1"}, budget="smoke",
            results_root=results_root).result
    assert a.provenance.config_hash != b.provenance.config_hash
    assert a.size.method.nonzero_parameters == b.size.method.nonzero_parameters  # same mask size either way


def test_kd_reports_its_control_and_cost(kd_digits_run):
    r = kd_digits_run.result
    (control,) = r.controls
    assert control.name == "student_without_teacher" and 0 < control.value <= 1
    assert r.cost.steps > 0 and r.cost.seconds > 0 and r.cost.samples_seen >= r.cost.steps
    assert r.size.method.parameters < r.size.reference.parameters / 10
    assert r.compute.method < r.compute.reference and r.speed.speedup > 1


def test_failed_run_writes_a_failed_record(results_root, monkeypatch):
    from baselines.pruning.magnitude import MagnitudePruning

    def broken(self, subject, task, ctx):
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(MagnitudePruning, "apply", broken)
    with pytest.raises(RunFailed) as e:
        run("digits", "magnitude", budget="smoke", results_root=results_root)
    r = load_result(e.value.path, results_root)
    assert r.status == "failed" and r.error.type == "RuntimeError" and "calibration exploded" in r.error.message
    assert "Traceback" in r.error.traceback and r.quality is None
    assert r.task.data_fingerprint  # what was known before the failure is kept


def test_a_failure_after_the_evaluation_resumes_from_it(results_root, monkeypatch):
    """A run that fails while timing keeps the method's evaluation (and the statistics it left): the same
    configuration run again evaluates nothing, says so, and records the same quality. A finished run keeps
    nothing (the next run evaluates anew); resume=False evaluates anew even after a failure."""
    import bench.speed
    from bench.progress import Reporter
    from tasks.digits import Digits

    calls = []
    evaluate = Digits.evaluate

    def counting(self, subject, ctx):
        calls.append(subject)
        return evaluate(self, subject, ctx)

    def broken(*args, **kwargs):
        raise RuntimeError("the timing crashed")

    class Log(Reporter):
        def __init__(self):
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    def failing_run():
        with monkeypatch.context() as m:
            m.setattr(bench.speed, "measure_speed", broken)
            with pytest.raises(RunFailed):
                run("digits", "none", seed=11, budget="smoke", results_root=results_root)

    monkeypatch.setattr(Digits, "evaluate", counting)
    failing_run()
    assert len(calls) == 2  # the reference's evaluation, then the method's
    log = Log()
    r = run("digits", "none", seed=11, budget="smoke", results_root=results_root, reporter=log).result
    assert len(calls) == 2 and r.status == "ok"  # both from the cache
    assert any("evaluation resumed from the cache" in line for line in log.lines)
    again = run("digits", "none", seed=11, budget="smoke", results_root=results_root).result
    assert len(calls) == 3 and again.quality == r.quality  # the finished run kept nothing to resume
    failing_run()
    assert len(calls) == 4
    fresh = run("digits", "none", seed=11, budget="smoke", results_root=results_root, resume=False).result
    assert len(calls) == 5 and fresh.quality == r.quality  # a reproduction evaluates anew


def test_interrupted_run_leaves_no_file(results_root, monkeypatch):
    from baselines.pruning.magnitude import MagnitudePruning

    def interrupted(self, subject, task, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(MagnitudePruning, "apply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("digits", "magnitude", budget="smoke", results_root=results_root)
    assert not results_root.exists() or not any(results_root.rglob("*"))


def test_bad_override_writes_nothing(results_root):
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match="valid keys"):
        run("digits", "kd", overrides={"T": "2"}, results_root=results_root)
    assert not results_root.exists()


def test_reference_evaluation_is_cached(results_root, monkeypatch):
    """The second run reads the reference's quality from the cache instead of evaluating it again."""
    from tasks.digits import Digits

    run("digits", "none", budget="smoke", results_root=results_root)
    calls = []
    original = Digits.evaluate
    monkeypatch.setattr(Digits, "evaluate", lambda self, s, c: calls.append(1) or original(self, s, c))
    run("digits", "none", budget="smoke", results_root=results_root)
    assert len(calls) == 1  # the method's evaluation only


def test_corrupt_cache_entries_are_rebuilt(tmp_path, monkeypatch, results_root):
    import os

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    first = run("digits", "kd", budget="smoke", results_root=results_root).result
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file() and p.suffix in (".json", ".safetensors"):
            p.write_bytes(p.read_bytes()[: max(1, os.path.getsize(p) // 2)])  # truncate every entry
    again = run("digits", "kd", budget="smoke", results_root=results_root).result
    assert again.quality == first.quality
    assert [c.value for c in again.controls] == [c.value for c in first.controls]


def test_digits_task_split_is_fixed():
    task = get_task_spec("digits").cls()
    task.load()
    assert task.train.x.shape == (1347, 1, 8, 8) and task.test.x.shape == (450, 1, 8, 8)
    assert json.dumps(task.data_fingerprint())


def test_the_cached_evaluation_is_keyed_by_the_code_beside_the_method(tmp_path, monkeypatch):
    """An edit to the method's module or to a private helper beside it changes the key (a stale evaluation
    would otherwise come back after a fix)."""
    import importlib.util

    from bench.runner import code_digest

    pkg = tmp_path / "fam"
    pkg.mkdir()
    (pkg / "m.py").write_text("class M:\n    pass\n")
    (pkg / "_helper.py").write_text("X = 1\n")
    spec = importlib.util.spec_from_file_location("fam_m", pkg / "m.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "fam_m", mod)
    spec.loader.exec_module(mod)
    first = code_digest(mod.M)
    assert code_digest(mod.M) == first
    (pkg / "_helper.py").write_text("X = 2\n")
    assert code_digest(mod.M) != first
