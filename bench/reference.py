"""`bench reference build TASK`: train an embedded task's reference from scratch, deterministically.

The trained weights go to the cache (replacing any cached build); with `--publish` they are also written to
`tasks/artifacts/<task>/reference.safetensors`, the artifact every result is measured against. Publishing a
new reference changes results: record its sha256 as the task's `reference_sha256` and bump the task version.
"""

from __future__ import annotations

from pathlib import Path

from bench import cache
from bench.registry import RegistryError, get_task_spec
from tasks.base import ARTIFACTS, RunContext


def build_reference(task_name: str, publish: bool = False, console=None) -> tuple[str, Path, bool]:
    from bench.profiles import load_profile
    from bench.progress import Reporter, RichReporter
    from bench.runner import setup_torch

    spec = get_task_spec(task_name)
    if spec.tier != "embedded":
        raise RegistryError(f"task {task_name!r} is a {spec.tier} task; `bench reference build` trains only "
                            f"embedded tasks' references")
    profile = load_profile("cpu")
    setup_torch(profile, 0)
    reporter = RichReporter(console) if console is not None else Reporter()
    ctx = RunContext.for_profile(profile, spec.modality, 0, reporter)
    task = spec.cls()
    task.load(ctx)
    if hasattr(task, "build_artifacts"):  # a task whose artifact is several files (arith: tokenizer, reference
        digest, path = task.build_artifacts(ctx, publish)  # and draft) builds and publishes them itself
        return digest, path, digest == spec.cls.reference_sha256
    state = task.train_reference(ctx)
    path = task.reference_cache_path(ctx)
    digest = cache.save_weights(path, state)
    if publish:
        path = ARTIFACTS / spec.name / "reference.safetensors"
        cache.save_weights(path, state)
        path.with_name(path.name + ".sha256").unlink()  # the task module records the published hash
    return digest, path, digest == spec.cls.reference_sha256
