"""Faults and hostile input (issue 18, cases 5-10): refused before any work, said plainly, nothing lost.

No test here needs the network: "offline" is `bench.preflight`'s probes answering no, and the local Hugging
Face cache is an empty temporary folder. Every refusal is checked through the command line for its exit code
(2), its message and for what it must not do: write a record, or start loading and training. `bench.preflight`
is imported where it is used, so that on the code before it existed each test shows that case's old behaviour.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app

cli = CliRunner()
REPOSITORY = Path(__file__).resolve().parents[1]
FULL_TASK_VARIABLES = ("BENCH_GSM8K_DATA", "BENCH_GSM8K_REFERENCE", "BENCH_GSM8K_DRAFT", "BENCH_COCO_DATA",
                       "BENCH_COCO_REFERENCE", "BENCH_COCO_CLIP", "BENCH_COCO_SPLIT", "BENCH_GLUE_DATA",
                       "BENCH_GLUE_SST2_REFERENCE", "BENCH_GLUE_MNLI_REFERENCE", "BENCH_IMAGENET_FID_REFERENCE",
                       "BENCH_IMAGENET_FID_STATS", "BENCH_IMAGENET_VAL", "BENCH_FID_WEIGHTS", "BENCH_FID_EXTRACTOR",
                       "BENCH_DATA")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and nothing in the local Hugging Face or torch hub caches."""
    import huggingface_hub.constants as hf
    import torch.hub

    try:
        from bench import preflight
    except ImportError:  # the code before the preflight: it meets this machine's real network, or none
        preflight = None
    if preflight is not None:
        monkeypatch.setattr(preflight, "reachable", lambda host, port=443: preflight.Reachability(
            False, f"{host} cannot be resolved (test: offline)"))
    for var in FULL_TASK_VARIABLES + ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return tmp_path


@pytest.fixture
def no_work(monkeypatch):
    """Any loading of a task's data fails the test: a refusal must come before it."""
    from tasks.base import Task

    started = []

    def load(self, ctx=None):
        started.append(self.spec.name)
        raise AssertionError(f"work started on {self.spec.name} before the refusal")

    for cls in _task_classes():
        monkeypatch.setattr(cls, "load", load)
    monkeypatch.setattr(Task, "reference_weights", lambda self, ctx: (_ for _ in ()).throw(AssertionError("work")))
    return started


def _task_classes():
    from bench.registry import TASKS

    return {t.cls for t in TASKS}


def bench_run(*args, results: Path, env: dict | None = None):
    start = time.perf_counter()
    r = cli.invoke(app, ["run", *args, "--results-dir", str(results)], env=env)
    return r, time.perf_counter() - start


def text(r) -> str:
    return " ".join(r.output.split())  # rich wraps long lines


def records(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()] if Path(root).exists() else []


# ---- case 5: an unwritable results folder is refused before the work, not after it --------------------------

def test_unwritable_results_folder_is_refused_before_any_work(tmp_path, no_work):
    (tmp_path / "a-file").write_text("in the way")
    results = tmp_path / "a-file" / "results"  # cannot be created, even by root
    r, _ = bench_run("--method", "kd", "--task", "digits", "--budget", "smoke", results=results)
    assert r.exit_code == 2, r.output
    assert "results folder" in text(r) and "--results-dir" in text(r) and "not writable" in text(r)
    assert not no_work and (tmp_path / "a-file").read_text() == "in the way"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_is_refused(tmp_path, no_work):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        r, _ = bench_run("--method", "none", "--task", "digits", "--budget", "smoke", results=results)
    finally:
        results.chmod(0o755)
    assert r.exit_code == 2 and "not writable" in text(r) and not no_work and not records(results)


def test_a_disk_that_fills_during_the_run_keeps_the_record(tmp_path, monkeypatch):
    """The preflight cannot foresee a disk filling up while the run trains: the record then goes to the
    temporary folder, and the error says where."""
    import errno
    import tempfile

    import bench.runner
    from bench.store import load_result

    def full(result, root):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bench.runner, "write_result", full)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r, _ = bench_run("--method", "none", "--task", "digits", "--budget", "smoke", results=tmp_path / "results")
    assert r.exit_code == 1 and "No space left on device" in text(r) and "it was kept at" in text(r), r.output
    (kept,) = tmp_path.glob("bench-unwritten-*.json")
    assert load_result(kept).status == "ok"


def test_probe_leaves_nothing_behind(tmp_path):
    from bench import preflight

    target = tmp_path / "results" / "cpu" / "digits" / "kd"
    assert preflight.writable(target) is None
    assert not (tmp_path / "results").exists()  # the folders made for the probe are gone again
    (tmp_path / "file").write_text("")
    assert "not a folder" in preflight.writable(tmp_path / "file" / "sub")


# ---- case 6: faults of the invocation write no failed record ---------------------------------------------

def test_cuda_profile_without_cuda_is_refused_even_when_not_strict(tmp_path, monkeypatch, no_work):
    import bench.runner
    from bench.hardware import detect_machine

    machine = detect_machine().model_copy(update=dict(cuda_available=False, gpu_name=None, gpu_count=0))
    monkeypatch.setattr(bench.runner, "detect_machine", lambda: machine)
    r, _ = bench_run("--method", "none", "--task", "digits", "--profile", "h100-bf16", "--budget", "smoke",
                     results=tmp_path / "results")
    assert r.exit_code == 2, r.output
    assert "'h100-bf16' runs on a CUDA GPU" in text(r) and "use a CPU profile (cpu, cpu-bf16)" in text(r)
    assert not records(tmp_path / "results") and not no_work


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2 ** 32)])
def test_seed_out_of_range_is_refused(tmp_path, seed, no_work):
    r, _ = bench_run("--method", "none", "--task", "digits", "--seed", seed, "--budget", "smoke",
                     results=tmp_path / "results")
    assert r.exit_code == 2, r.output
    assert f"--seed {seed} is out of range" in text(r) and "4294967295" in text(r)
    assert not records(tmp_path / "results") and not no_work


def test_seed_at_the_limits_is_accepted():
    from bench import preflight

    assert preflight.seed_problem(0) is None and preflight.seed_problem(2 ** 32 - 1) is None


def test_coco_on_the_cpu_profile_names_eval_size_plainly(tmp_path, offline, no_work):
    r, _ = bench_run("--method", "lcm", "--task", "coco", results=tmp_path / "results")
    assert r.exit_code == 2, r.output
    said = text(r)
    assert "`coco = N` under [eval_size] in bench/profiles/cpu.toml" in said  # rich markup no longer eats it
    assert "l4-fp16 (1,000 images)" in said and "--budget smoke" in said
    assert not records(tmp_path / "results") and not no_work


def test_unwritable_cache_is_refused_naming_bench_cache(tmp_path, no_work):
    (tmp_path / "a-file").write_text("")
    r, _ = bench_run("--method", "none", "--task", "digits", "--budget", "smoke", results=tmp_path / "results",
                     env={"BENCH_CACHE": str(tmp_path / "a-file" / "cache")})
    assert r.exit_code == 2, r.output
    assert "BENCH_CACHE" in text(r) and "not writable" in text(r)
    assert not records(tmp_path / "results") and not no_work


def test_every_problem_is_listed_at_once(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    r, _ = bench_run("--method", "none", "--task", "digits", "--seed", "-5", "--budget", "smoke",
                     results=tmp_path / "a-file" / "r", env={"BENCH_CACHE": str(tmp_path / "a-file" / "c")})
    assert r.exit_code == 2 and sum(line.startswith("  - ") for line in r.output.splitlines()) == 3, r.output


def test_cache_dir_names_the_variable(tmp_path, monkeypatch):
    from bench import cache

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(cache.CacheUnwritable, match="BENCH_CACHE"):
        cache.cache_dir()


# ---- case 7: offline, the full tasks say so at once and name their variables ----------------------------

@pytest.mark.parametrize("method, task, variables", [
    ("speculative", "gsm8k", ("BENCH_GSM8K_DATA", "BENCH_GSM8K_REFERENCE", "BENCH_GSM8K_DRAFT")),
    ("dllm-steps", "gsm8k-dllm", ("BENCH_GSM8K_DATA", "BENCH_GSM8K_DLLM_REFERENCE")),
    ("vtw", "textvqa", ("BENCH_TEXTVQA_DATA", "BENCH_TEXTVQA_REFERENCE")),
    ("lcm", "coco", ("BENCH_COCO_REFERENCE", "BENCH_COCO_DATA", "BENCH_COCO_CLIP", "BENCH_FID_WEIGHTS")),
    ("none", "glue-sst2", ("BENCH_GLUE_DATA", "BENCH_GLUE_SST2_REFERENCE")),
    ("none", "imagenet-fid", ("BENCH_IMAGENET_FID_REFERENCE", "BENCH_IMAGENET_FID_STATS", "BENCH_IMAGENET_VAL")),
])
def test_offline_full_tasks_say_so_at_once(tmp_path, offline, no_work, method, task, variables):
    r, seconds = bench_run("--method", method, "--task", task, "--budget", "smoke", results=tmp_path / "results")
    assert r.exit_code == 2, r.output
    said = text(r)
    assert "cannot reach" in said and "(test: offline)" in said
    for var in variables:
        assert var in said, var
    assert not records(tmp_path / "results") and not no_work
    assert seconds < 20  # was 31-60 s of hub retries; here it is the import of torch


def test_gsm8k_checks_the_draft_only_for_methods_that_read_it(offline):
    from bench.api import Draft, Student, TrainingRows
    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks.base import RunContext
    from tasks.gsm8k import GSM8K

    ctx = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), budget="smoke")
    assert not any("DRAFT" in p for p in GSM8K().preflight(ctx, frozenset()))
    assert any("BENCH_GSM8K_DRAFT" in p for p in GSM8K().preflight(ctx, frozenset({Draft})))
    assert any("BENCH_GSM8K_DRAFT" in p for p in GSM8K().preflight(ctx, frozenset({TrainingRows, Student})))


def test_a_hub_model_in_the_local_cache_counts_as_present_offline(offline):
    from tasks._kit import pretrained

    snapshot = offline / "hf" / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (offline / "hf" / "hub" / "models--org--tiny" / "refs").mkdir()
    (offline / "hf" / "hub" / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    assert pretrained.source_problem("BENCH_X_MODEL", "org/tiny", "test model") is None
    assert "BENCH_X_MODEL" in pretrained.source_problem("BENCH_X_MODEL", "org/other", "test model")
    (offline / "hf" / "datasets" / "openai___gsm8k").mkdir(parents=True)
    assert pretrained.dataset_cached("openai/gsm8k")


def test_a_local_folder_without_its_marker_file_is_refused(tmp_path, monkeypatch):
    from tasks._kit import pretrained

    monkeypatch.setenv("BENCH_X_MODEL", str(tmp_path))
    assert "has no config.json" in pretrained.source_problem("BENCH_X_MODEL", "org/tiny", "test model")
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.source_problem("BENCH_X_MODEL", "org/tiny", "test model") is None


def test_offline_variables_decide_without_a_connection(monkeypatch):
    from bench import preflight

    monkeypatch.setattr(preflight, "reachable", lambda *a: pytest.fail("probed the network"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert preflight.hub() == preflight.Reachability(False, "HF_HUB_OFFLINE=1 is set")


def test_the_network_is_probed_once_and_quickly(monkeypatch):
    import socket

    from bench import preflight

    calls = []

    def hang(address, timeout=None):
        calls.append(address)
        time.sleep(5)
        raise OSError("never")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(preflight, "PROBE_TIMEOUT_S", 0.2)
    preflight.reachable.cache_clear()
    try:
        start = time.perf_counter()
        first = preflight.reachable("example.invalid", 443)
        assert not first.ok and "did not answer" in first.why and time.perf_counter() - start < 2
        assert preflight.reachable("example.invalid", 443) is first and len(calls) == 1
    finally:
        preflight.reachable.cache_clear()


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from tasks._kit.latent_diffusion import INCEPTION_URL

    assert INCEPTION_URL == URL_INCEPTION_V3


def test_markup_in_errors_is_printed_as_written(tmp_path, monkeypatch):
    """`[ray]` in the pip hint, and brackets in a YAML error, reach the terminal intact."""
    import sys

    sweep = tmp_path / "s.yaml"
    sweep.write_text("tasks: [digits]\nmethods: [none]\nseeds: [0]\nbudget: smoke\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    r = cli.invoke(app, ["sweep", str(sweep), "--executor", "ray", "--results-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "pip install -e '.[ray]'" in r.output, r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [digits\nmethods: [bold]x\n")
    r = cli.invoke(app, ["sweep", str(bad), "--dry-run"])
    assert r.exit_code == 2 and "not valid YAML" in r.output
    assert "tasks: [digits" in r.output and "methods: [bold]x" in r.output, r.output  # was "tasks: ', but got"


# ---- case 8: a cache entry is one unit ---------------------------------------------------------------------

def test_kd_control_cost_survives_a_truncated_cost_entry(tmp_path, monkeypatch):
    from bench.runner import run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    first = run("digits", "kd", budget="smoke", results_root=tmp_path / "r").result
    assert first.controls[0].cost_seconds and first.controls[0].cost_seconds > 0
    controls = list((tmp_path / "cache").rglob("controls/*"))
    damaged = [p for p in controls if p.suffix == ".json"]
    assert damaged and any(p.suffix == ".safetensors" for p in controls)
    for p in damaged:  # the student's weights stay intact; what the build measured is cut in half
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    again = run("digits", "kd", budget="smoke", results_root=tmp_path / "r").result
    assert again.controls[0].cost_seconds is not None and again.controls[0].cost_seconds > 0
    assert again.controls[0].value == first.controls[0].value
    third = run("digits", "kd", budget="smoke", results_root=tmp_path / "r").result
    assert third.controls[0].cost_seconds == again.controls[0].cost_seconds  # and now it is cached again


def test_cached_bundle_is_read_as_one_unit(tmp_path):
    import torch

    from bench import cache

    path, builds = tmp_path / "e.safetensors", []

    def build():
        builds.append(1)
        return {"w": torch.arange(4.0)}, {"seconds": 1.5 * len(builds)}

    assert cache.cached_bundle(path, build)[1] == {"seconds": 1.5} and len(builds) == 1
    assert cache.cached_bundle(path, build)[1] == {"seconds": 1.5} and len(builds) == 1  # a hit
    manifest = path.with_name(path.name + ".manifest.json")
    manifest.write_text(manifest.read_text()[:10])  # the metadata half truncated
    assert cache.cached_bundle(path, build)[1] == {"seconds": 3.0} and len(builds) == 2
    path.write_bytes(path.read_bytes()[:20])  # the weights half truncated
    tensors, meta, _, built = cache.cached_bundle(path, build)
    assert built and meta == {"seconds": 4.5} and torch.equal(tensors["w"], torch.arange(4.0))


def test_no_method_caches_weights_and_their_cost_as_two_entries():
    """Case 8's cause, everywhere: a method that caches trained weights keeps what only their build knows (its
    seconds, steps, rounds) in the same entry (`cache.cached_bundle`), never in a sidecar that a damaged half
    would rebuild from a build that never ran."""
    root = Path(__file__).resolve().parents[1] / "baselines"
    bad = [f"{f.relative_to(root)}: {line.strip()}" for f in sorted(root.rglob("*.py"))
           for line in f.read_text().splitlines()
           if "cached_weights(" in line or re.search(r"cached_json\(\s*path\.with_suffix", line)]
    assert not bad, "use cache.cached_bundle for weights and their metadata:\n" + "\n".join(bad)


# ---- case 9: failed records keep no local paths ----------------------------------------------------------

def test_failed_record_traceback_has_no_absolute_paths(tmp_path, monkeypatch):
    import sysconfig

    from baselines.pruning.magnitude import MagnitudePruning
    from bench.runner import RunFailed, run
    from bench.store import load_result

    def broken(self, subject, task, ctx):
        import torch

        torch.nn.Linear(2, 3)(torch.zeros(5))  # a real error, raised inside torch's own modules

    monkeypatch.setattr(MagnitudePruning, "apply", broken)
    with pytest.raises(RunFailed) as e:
        run("digits", "magnitude", budget="smoke", results_root=tmp_path / "results")
    r = load_result(e.value.path)
    tb = r.error.traceback
    assert 'File "bench/runner.py"' in tb and 'File "tests/test_preflight.py"' in tb
    assert 'File "<site-packages>/torch/nn/modules/' in tb
    for private in (str(REPOSITORY), sysconfig.get_paths()["purelib"], os.path.expanduser("~") + "/"):
        assert private not in tb and private not in r.error.message, private
    assert json.loads(e.value.path.read_text())["error"]["traceback"] == tb


def test_relative_paths():
    import sysconfig

    from bench.tracepaths import relative_paths

    site = sysconfig.get_paths()["purelib"]
    assert relative_paths(f'File "{REPOSITORY}/bench/x.py", line 1') == 'File "bench/x.py", line 1'
    assert relative_paths(f"{site}/torch/nn/f.py") == "<site-packages>/torch/nn/f.py"
    assert relative_paths(f"cd {REPOSITORY} && ls") == "cd . && ls"
    assert not relative_paths(f"{REPOSITORY}line/x").startswith(("line", "./line"))  # another folder


# ---- case 10: Ctrl-C says what it stopped --------------------------------------------------------------------

def test_ctrl_c_says_what_was_interrupted_and_that_nothing_was_written(tmp_path, monkeypatch):
    from baselines.pruning.magnitude import MagnitudePruning

    def interrupted(self, subject, task, ctx):
        with ctx.progress.step("Pruning the weights"):
            raise KeyboardInterrupt

    monkeypatch.setattr(MagnitudePruning, "apply", interrupted)
    r, _ = bench_run("--method", "magnitude", "--task", "digits", "--budget", "smoke", results=tmp_path / "results")
    assert r.exit_code == 130, r.output
    said = text(r)
    assert "interrupted while pruning the weights (magnitude on digits)" in said and "nothing was written" in said
    assert not records(tmp_path / "results")


class FakeRay:
    """Just enough of Ray for RayExecutor: tasks never finish; Ctrl-C arrives during the first wait."""

    def __init__(self):
        self.specs, self.cancels, self.waits, self.shut = [], [], 0, False

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        pass

    def shutdown(self):
        self.shut = True

    def remote(self, fn):
        fake = self

        class Remote:
            def options(self, **kw):
                return self

            def remote(self, spec):
                fake.specs.append(spec)
                return f"ref{len(fake.specs)}"

        return Remote()

    def wait(self, refs, num_returns=1, timeout=None):
        self.waits += 1
        if self.waits == 1:
            for spec in self.specs:  # what a running task made, in the folder it was told to use
                assert spec.get("tmp_parent") and Path(spec["tmp_parent"]).is_dir()
                Path(spec["tmp_parent"], "bench-ray-task").mkdir(exist_ok=True)
            raise KeyboardInterrupt
        return list(refs), []  # cancelled gently, every task ended within the grace period

    def cancel(self, ref, force=False):
        self.cancels.append((ref, force))


def test_interrupted_ray_sweep_cancels_gently_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    import sys

    from bench.executors import RayExecutor
    from bench.sweep import expand, load_sweep

    sweep = tmp_path / "s.yaml"
    sweep.write_text("tasks: [digits]\nmethods: [none, magnitude]\nseeds: [0]\nbudget: smoke\n")
    runs, _ = expand(load_sweep(sweep), None)
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(KeyboardInterrupt):
        RayExecutor(jobs=1).run(runs, tmp_path / "results", lambda o: None)
    assert fake.cancels and all(not force for _, force in fake.cancels)  # gently: the tasks clean up
    assert {ref for ref, _ in fake.cancels} == {"ref1", "ref2"} and fake.shut
    assert not Path(fake.specs[0]["tmp_parent"]).exists()  # the driver's folder went, whatever was in it


def test_ray_task_removes_its_folder_when_interrupted(tmp_path, monkeypatch):
    import signal
    import sys

    from bench import executors, worker

    monkeypatch.setattr(worker, "command", lambda spec: [sys.executable, "-c", "import time; time.sleep(30)"])
    parent = tmp_path / "parent"
    parent.mkdir()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C, or Ray's gentle cancel
    timer.start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        executors.ray_task({"task": "digits", "method": "none", "tmp_parent": str(parent)})
    timer.cancel()
    assert time.perf_counter() - start < 10 and list(parent.iterdir()) == []
