"""One run, end to end: resolve, check the machine, load, evaluate, apply, measure side by side, write.

Names and overrides are checked before any work, then the preflight (`bench.preflight`: the results folder
and the cache writable, the seed in range, the profile possible on this machine, the task's data and models at
hand), then whether the machine is the profile's (a mismatch is refused unless `allow_mismatch`, and the
refusal names the profiles that match); a mistake there writes nothing. Once work has started, any exception
still produces a record with `status: failed`, the error and its traceback (paths in it relative to the
repository or the Python installation, `bench.tracepaths`: a record is published, the contributor's folders
are not), so a sweep sees what broke; Ctrl-C writes nothing and says which step it stopped (`RunInterrupted`).
Every file is written atomically.
"""

from __future__ import annotations

import os
import secrets
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import __version__, cache, preflight, registry
from bench.config import to_jsonable
from bench.hardware import ProfileMismatch, busy_warning, detect_machine, match_profile, mismatch_message
from bench.profiles import load_profile
from bench.progress import Reporter
from bench.tracepaths import relative_paths
from bench.provenance import config_hash, provenance
from bench.divergence import analyse as analyse_divergence
from bench.result import (Compute, Control, Cost, Divergence, ErrorInfo, Fidelity, Interval, MethodInfo, Memory,
                          ProfileInfo, Quality, Quantization, Result, Secondary, Size, SizeOf, TaskInfo,
                          Training)
from bench.store import DEFAULT_RESULTS, write_result
from bench.api import Evaluation, RunContext, offers


@dataclass
class RunOutcome:
    result: Result
    path: Path


def _interval(lo_hi: tuple[float, float]) -> Interval:
    return Interval(low=lo_hi[0], high=lo_hi[1])


def setup_torch(profile, seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts
    import torch

    torch.set_num_threads(profile.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if profile.device == "cuda":
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)


def reference_evaluation(task, subject, ctx: RunContext, ref_sha: str) -> Evaluation:
    """The reference's quality, cached per task, reference weights, data, profile and seed."""
    key = cache.key("with-metrics", task.spec.version, ref_sha, task.data_fingerprint(), ctx.profile.name, ctx.seed,
                    ctx.budget)  # "with-metrics": entries cached before Evaluation.metrics existed lack them
    path = cache.cache_dir() / "evals" / task.spec.name / f"{key}.json"

    def build() -> dict:
        with ctx.progress.step("Evaluating the reference (cached afterwards)"):
            return task.evaluate(subject, ctx).to_json()

    payload, _ = cache.cached_json(path, build)
    return Evaluation.from_json(payload)


def code_digest(*classes: type) -> str:
    """A hash of the source a run's numbers come from: each class's module, the private helpers beside it
    (`_*.py` in its package), and the task kit, so an edit to any of them invalidates a cached evaluation."""
    import hashlib
    import inspect

    files: set[Path] = set()
    for cls in classes:
        try:
            src = Path(inspect.getsourcefile(cls) or "")
        except TypeError:  # a class without a source file
            continue
        if src.is_file():
            files.add(src)
            files.update(src.parent.glob("_*.py"))
            if src.parent.name == "tasks":
                files.update((src.parent / "_kit").glob("*.py"))
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def method_evaluation_path(task, key: str) -> Path:
    return cache.cache_dir() / "evals" / task.spec.name / "methods" / f"{key}.json"


def method_evaluation(task, method, applied, ctx: RunContext, key: str, resume: bool = True
                      ) -> tuple[Evaluation, dict[str, float]]:
    """The method's quality and its statistics as they stood right after the evaluation, kept under `key`
    (the run's configuration, reference, data and code) until the run's record is written: a failure or an
    interruption in a later step (timing, MACs, sizes) resumes from here instead of evaluating again, which on
    a GPU task can take hours. A finished run removes the entry (`_run`), so a later run of the same
    configuration evaluates anew and its statistics (some are seconds) are its own. `resume=False` evaluates
    anew even when an entry exists (a reproduction must not read an earlier answer back)."""
    path = method_evaluation_path(task, key)
    if not resume:
        path.unlink(missing_ok=True)

    def build() -> dict:
        with ctx.progress.step(f"Evaluating {method.spec.name} (cached afterwards)"):
            ev = task.evaluate(applied.subject, ctx)
        stats = {k: float(v) for k, v in (applied.stats() if applied.stats else {}).items()}
        return {"evaluation": ev.to_json(), "stats": stats}

    payload, built = cache.cached_json(path, build)
    if not built:
        ctx.progress.log(f"{method.spec.name}: evaluation resumed from the cache ({path}), kept by an earlier run "
                         f"of this configuration, reference, data and code that failed or was interrupted after "
                         f"it; delete that file to evaluate again")
    return Evaluation.from_json(payload["evaluation"]), payload["stats"]


def run(task_name: str, method_name: str, profile_name: str = "cpu", seed: int = 0,
        overrides: dict[str, str] | None = None, allow_mismatch: bool = False, results_root: Path = DEFAULT_RESULTS,
        reporter: Reporter | None = None, budget: str = "full", argv: list[str] | None = None,
        processes: int = 1, resume: bool = True, compile: bool = False) -> RunOutcome:
    """Run `method_name` on `task_name` and write its record (see the module docstring). Raises the resolving
    errors and `PreflightError` (nothing written), `RunFailed` (a failed record written) or `RunInterrupted`."""
    reporter = _Tracking(reporter or Reporter())
    try:
        return _run(task_name, method_name, profile_name, seed, overrides, allow_mismatch, Path(results_root),
                    reporter, budget, argv, processes, resume, compile)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        doing = reporter.interrupted_in or (f"the run, after {reporter.last[:1].lower() + reporter.last[1:]}"
                                            if reporter.last else "starting the run")
        raise RunInterrupted(doing, task_name, method_name) from None


def _run(task_name, method_name, profile_name, seed, overrides, allow_mismatch, results_root, reporter, budget, argv,
         processes, resume=True, compile=False) -> RunOutcome:
    # --- resolve: every mistake here is the user's, and writes nothing ------------------------------------
    tspec = registry.get_task_spec(task_name)
    mspec = registry.get_method_spec(method_name)
    registry.check_supports(mspec, tspec)
    profile = load_profile(profile_name)
    method = registry.create_method(method_name, overrides)
    hparams = to_jsonable(method.config)
    if compile and processes > 1:
        from bench.config import ConfigError

        raise ConfigError("--compile times both arms in this process; it does not combine with --processes "
                          f"{processes} (the workers rebuild eager subjects): drop one of them")
    machine = detect_machine()
    mismatches = match_profile(profile, machine)
    ctx = RunContext.for_profile(profile, tspec.modality, seed, reporter, budget)
    task = tspec.cls()
    uses = frozenset(c for r in registry.requirements(mspec, tspec.modality)
                     for c in (r if isinstance(r, tuple) else (r,)) if offers(task, c))
    # --- preflight: what would fail later for a reason found now; raises PreflightError, writes nothing ---
    preflight.check(seed=seed, profile=profile, machine=machine, task=task, ctx=ctx, uses=uses,
                    results_folder=results_root / profile.name / tspec.name / mspec.name)
    if mismatches and not allow_mismatch:
        raise ProfileMismatch(mismatch_message(profile, machine, mismatches))
    for m in mismatches:
        warnings.warn(f"profile mismatch: {m} (--allow-mismatch; the result records it)", stacklevel=3)
    if busy := busy_warning(machine):
        warnings.warn(busy, stacklevel=3)

    cfg_hash = config_hash(tspec.name, tspec.version, mspec.name, mspec.version, hparams, profile.name, seed,
                           __version__, compiled=compile)
    with reporter.step("Checking the pinned environment and what the code imports (cached afterwards)"):
        prov = provenance(cfg_hash, argv, lock=profile.lock, code=(tspec, mspec))
    now = datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{cfg_hash[:8]}-{secrets.token_hex(2)}"
    common = dict(
        run_id=run_id, created_at=now.isoformat(timespec="seconds"), seed=seed, budget=budget,
        method=MethodInfo(name=mspec.name, family=mspec.family, version=mspec.version, hyperparameters=hparams,
                          paper=mspec.paper, year=mspec.year, url=mspec.url),
        profile=ProfileInfo(name=profile.name, device=profile.device, dtype=profile.dtype, threads=profile.threads,
                            batch_size=ctx.batch_size, detected=machine, matched=not mismatches,
                            mismatches=mismatches, compiled=compile),
        provenance=prov,
    )
    task_info = TaskInfo(name=tspec.name, version=tspec.version, tier=tspec.tier, modality=tspec.modality,
                         data_fingerprint="", reference_sha256="", reference_canonical=False)
    try:
        setup_torch(profile, seed)
        with reporter.step(f"Loading {tspec.name}"):
            task.load(ctx)
        ref_w = task.reference_weights(ctx)
        task_info = task_info.model_copy(update=dict(data_fingerprint=task.data_fingerprint(),
                                                     reference_sha256=ref_w.sha256,
                                                     reference_canonical=ref_w.canonical))
        from bench.speed import RunSpec

        spec = RunSpec(tspec.name, mspec.name, hparams, profile.name, seed, budget)
        body = _measure(task, method, ref_w, ctx, processes, spec, resume, compile)
        evaluation_entry = body.pop("evaluation_entry")
        result = Result(status="ok", task=task_info, **common, **body)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure becomes a failed record, then propagates
        result = Result(status="failed", task=task_info, **common,
                        error=ErrorInfo(type=type(e).__name__, message=relative_paths(str(e)),
                                        traceback=relative_paths(traceback.format_exc())))
        path = _write(result, results_root)
        raise RunFailed(result, path) from e
    out = RunOutcome(result, _write(result, results_root))
    evaluation_entry.unlink(missing_ok=True)  # the record holds it now: nothing left to resume
    return out


class RecordNotWritten(OSError):
    """The results folder refused the record after the run (the disk filled up while it ran): the record was
    kept in the temporary folder instead, and the message says where, so the work is not lost."""


def _write(result: Result, root: Path) -> Path:
    try:
        return write_result(result, root)
    except OSError as e:
        import tempfile

        from bench.store import atomic_write_text

        kept = Path(tempfile.gettempdir()) / f"bench-unwritten-{result.run_id}.json"
        try:
            atomic_write_text(kept, result.to_json())
            where = f"it was kept at {kept}; move it to {root / result.relpath()} once there is room"
        except OSError:
            where = "and it could not be kept in the temporary folder either"
        raise RecordNotWritten(f"the record could not be written under {root}: {e.strerror or e}; {where}") from e


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM in a worker) during a run, saying which step it stopped. Nothing was written: the
    record is written only at the end, and every cache entry is complete or absent. A KeyboardInterrupt, so
    whoever stops on Ctrl-C (the sweep worker, the executors) stops on this too."""

    def __init__(self, doing: str, task: str, method: str):
        self.doing, self.task, self.method = doing, task, method
        super().__init__(f"interrupted while {doing} ({method} on {task}): nothing was written, no record and no "
                         f"partial cache entry; the same command starts it again")


class _Tracking(Reporter):
    """The run's reporter, remembering which steps were under way when an exception left them (`doing`)."""

    def __init__(self, inner: Reporter):
        self.inner = inner
        self.open: list[str] = []
        self.last: str | None = None  # the last step entered
        self.interrupted_in: str | None = None

    def log(self, message: str) -> None:
        self.inner.log(message)

    @contextmanager
    def step(self, description: str, total: int | None = None):
        self.open.append(description)
        self.last = description
        try:
            with self.inner.step(description, total) as advance:
                yield advance
        except BaseException:
            if self.interrupted_in is None:  # the innermost step sees it first
                self.interrupted_in = " > ".join(d[:1].lower() + d[1:] for d in self.open)
            raise
        finally:
            self.open.pop()


class RunFailed(RuntimeError):
    def __init__(self, result: Result, path: Path):
        self.result, self.path = result, path
        super().__init__(f"{result.error.type}: {result.error.message} (record: {path})")


def _measure(task, method, ref_w, ctx: RunContext, processes: int = 1, spec=None, resume: bool = True,
             compile: bool = False) -> dict:
    from contextlib import nullcontext

    import numpy as np

    from bench.compiled import backend as compile_backend, compiled_arms

    from bench.measure import count_macs, peak_memory
    from bench.stats import bootstrap_interval, paired_delta_interval
    from bench.speed import measure_speed, speed_record

    reference = task.subject_from_state(ref_w.state, ctx)
    ref_eval = reference_evaluation(task, reference, ctx, ref_w.sha256)
    applied = method.apply(reference, task, ctx)
    subject = applied.subject
    key = cache.key("method-eval", __version__, task.spec.name, task.spec.version, method.spec.name,
                    method.spec.version, to_jsonable(method.config), ctx.profile.name, ctx.seed, ctx.budget,
                    ref_w.sha256, task.data_fingerprint(), code_digest(type(task), type(method)))
    met_eval, method_stats = method_evaluation(task, method, applied, ctx, key, resume)
    evaluation_entry = method_evaluation_path(task, key)

    quality = Quality(
        metric=task.spec.metric, higher_is_better=task.spec.higher_is_better, value=met_eval.value,
        reference_value=ref_eval.value, delta=met_eval.value - ref_eval.value,
        interval=_interval(bootstrap_interval(met_eval.per_example)),
        delta_interval=_interval(paired_delta_interval(met_eval.per_example, ref_eval.per_example)),
        n=int(met_eval.per_example.shape[0]),
        secondary={k: Secondary(value=v, reference_value=ref_eval.metrics[k]) for k, v in met_eval.metrics.items()
                   if k in ref_eval.metrics})
    fid_metric, fid_value = task.fidelity(ref_eval, met_eval)
    divergence = None
    if fid_value < 1 and subject.model is reference.model and met_eval.contexts is not None:
        # a decoding method on the reference's own weights: were the differing answers rounding flips?
        with ctx.progress.step("Re-running the reference where the answers differ"):
            divergence = Divergence(**analyse_divergence(reference.model, met_eval.contexts, ref_eval.outputs,
                                                         met_eval.outputs))

    def gain(c):  # method minus control, paired over the same examples
        if c.per_example is None or np.shape(c.per_example) != np.shape(met_eval.per_example):
            return None
        return _interval(paired_delta_interval(met_eval.per_example, c.per_example))

    controls = [Control(name=c.name, description=c.description, value=c.value, cost_seconds=c.cost_seconds,
                        interval=_interval(bootstrap_interval(c.per_example)) if c.per_example is not None else None,
                        gain_interval=gain(c))
                for c in applied.controls]

    ref_fn, items, unit = task.workload(reference, ctx)
    met_fn, _, _ = task.workload(subject, ctx)
    with compiled_arms(reference, subject) if compile else nullcontext():  # --compile: both arms alike
        if compile:
            ctx.progress.log(f"timing both arms under torch.compile (backend {compile_backend()}); each arm "
                             f"compiles in its untimed warm-up")
        timing, rules = measure_speed(ref_fn, met_fn, ctx, ctx.progress, processes, spec)
        ref_mem, measure = peak_memory(reference, ref_fn, ctx.device)  # each arm's own state only
        met_mem, _ = peak_memory(subject, met_fn, ctx.device)

    ref_size, met_size = model_size(reference.model), model_size(subject.model, applied.quantization)
    sparsity = 1 - met_size.nonzero_parameters / met_size.parameters if met_size.parameters else 0.0
    c = applied.cost
    return dict(
        evaluation_entry=evaluation_entry,
        quality=quality, fidelity=Fidelity(metric=fid_metric, value=fid_value, divergence=divergence), controls=controls,
        method_stats=method_stats,
        speed=speed_record(timing, rules, unit, items),
        memory=Memory(measure=measure, reference_peak_bytes=ref_mem, method_peak_bytes=met_mem),
        size=Size(reference=ref_size, method=met_size, sparsity=float(np.clip(sparsity, 0, 1)),
                  runtime_exploits_sparsity=applied.runtime_exploits_sparsity,
                  runtime_low_precision=applied.runtime_low_precision,
                  quantization=Quantization(**applied.quantization) if applied.quantization is not None else None),
        compute=Compute(unit="MACs", reference=count_macs(ref_fn), method=count_macs(met_fn)),
        cost=Cost(seconds=c.seconds, steps=c.steps, samples_seen=c.samples_seen, tokens_seen=c.tokens_seen,
                  description=c.description),
        training=training_record(applied.training),
    )


def model_size(model, quantization: dict | None = None) -> SizeOf:
    """The size block of one arm's model. Weights packed inside torch's quantized modules (`torch.ao` dynamic
    int8 Linear: no Parameters, an opaque packed object in the state dict) are counted from their `weight()`; a
    layer with integer `codes` and a `dequantized()` weight has its non-zeros counted on the dequantized weight.
    A quantization method's bytes are its `serialized_bytes` (the packed size of what it would store), not the
    state dict of the model it times: that holds dequantized floats (fake quantization) or torch's packed
    objects, which safetensors cannot write."""
    import torch

    from bench.measure import count_parameters, serialized_bytes

    total, nonzero = count_parameters(model)
    for m in model.modules():
        if callable(getattr(m, "dequantized", None)) and isinstance(getattr(m, "codes", None), torch.Tensor):
            # a layer holding integer codes (baselines.quantization._kernels): a code of 0 is not a zero weight
            # (asymmetric grids), so its non-zeros are the dequantized weight's
            nonzero += int(torch.count_nonzero(m.dequantized()).item()) - int(torch.count_nonzero(m.codes).item())
        elif hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            w = m.weight()
            w = w.dequantize() if w.is_quantized else w
            total, nonzero = total + w.numel(), nonzero + int(torch.count_nonzero(w).item())
    size = quantization["serialized_bytes"] if quantization is not None else serialized_bytes(model)
    return SizeOf(parameters=total, nonzero_parameters=nonzero, bytes=size)


def training_record(t) -> Training | None:
    """The result's `training` block from a method's `TrainingComparison` (None: the method made none), with
    its ratios computed here, once."""
    if t is None:
        return None
    return Training(rows=t.rows, seconds=t.seconds, steps=t.steps, samples_seen=t.samples_seen,
                    full_rows=t.full_rows, full_seconds=t.full_seconds, full_steps=t.full_steps,
                    full_samples_seen=t.full_samples_seen, full_source=t.full_source,
                    preparation_seconds=t.preparation_seconds, time_ratio=t.seconds / t.full_seconds,
                    samples_ratio=t.samples_seen / t.full_samples_seen,
                    time_ratio_with_preparation=(t.preparation_seconds + t.seconds) / t.full_seconds,
                    description=t.description)
