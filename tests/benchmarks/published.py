"""What the benchmarks share: the published arith task, loaded under a named profile."""

from __future__ import annotations

import pytest


def published_arith(profile_name: str, batch_size: int | None = None):
    """(task, ctx, reference subject) for arith under `profile_name` at the full budget (batch size: the given
    one, else the profile's for causal LMs), or a skip when the published reference and draft are absent or not
    the ones loaded."""
    import torch

    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks import arith as arith_module
    from tasks.base import RunContext

    art = arith_module.ART
    published = [art / "reference" / "model.safetensors", art / "draft" / "model.safetensors"]
    if not (arith_module.REFERENCE_SHA256 and arith_module.DRAFT_SHA256 and all(p.is_file() for p in published)):
        pytest.skip("the published arith reference and draft (tasks/artifacts/arith/) are not there yet; "
                    "`bench reference build arith --publish` makes them")
    profile = load_profile(profile_name)
    torch.set_num_threads(profile.threads)
    ctx = RunContext(profile=profile, seed=0, progress=Reporter(), device=profile.device, dtype=profile.dtype,
                     batch_size=profile.batch_for("causal-lm") if batch_size is None else batch_size,
                     budget="full")
    task = arith_module.Arith()
    task.load(ctx)
    ref_w = task.reference_weights(ctx)
    if not ref_w.canonical or not task.draft_weights(ctx).canonical:
        pytest.skip(f"the arith reference or draft is not the published one ({ref_w.source})")
    return task, ctx, task.subject_from_state(ref_w.state, ctx)
