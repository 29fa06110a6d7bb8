"""What the diffusion samplers (`ddim`, `dpm-solver`, `unipc`) share: swap the subject's scheduler, count NFE.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.
The subject's sampling interface is documented in `tasks._kit.diffusion`; a sampler replaces only
`extra["scheduler"]` (built `from_config` of the reference's scheduler, so the noise schedule, the timestep
spacing and the prediction type stay the task's) and `extra["num_inference_steps"]`, and wraps
`extra["denoise"]` to count network evaluations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from baselines.base import Applied, Cost

if TYPE_CHECKING:
    from tasks.base import Subject


def check_diffusion_subject(subject: "Subject", method: str) -> None:
    missing = [k for k in ("scheduler", "num_inference_steps", "denoise") if k not in subject.extra]
    if missing:
        raise ValueError(f"method {method!r} needs a diffusion subject whose extra has 'scheduler', "
                         f"'num_inference_steps' and 'denoise' (see tasks/_kit/diffusion.py); this one lacks {missing}")


def with_scheduler(subject: "Subject", scheduler_cls: Any, steps: int, method: str, **overrides: Any) -> Applied:
    """A subject sampling with `scheduler_cls` for `steps` steps; stats: nfe (network evaluations per batch)."""
    from tasks.base import Subject

    check_diffusion_subject(subject, method)
    counts = {"calls": 0, "batches": 0}
    inner = subject.extra["denoise"]
    on_start = subject.extra.get("on_batch_start")

    def denoise(model, x, t, labels, step_index):
        counts["calls"] += 1
        return inner(model, x, t, labels, step_index)

    def batch_start():
        counts["batches"] += 1
        if on_start is not None:
            on_start()

    extra = dict(subject.extra)
    extra.update(scheduler=scheduler_cls.from_config(subject.extra["scheduler"].config, **overrides),
                 num_inference_steps=int(steps), denoise=denoise, on_batch_start=batch_start)

    def stats() -> dict[str, float]:
        return {"nfe": counts["calls"] / max(counts["batches"], 1), "num_inference_steps": float(steps)}

    return Applied(Subject(subject.model, subject.kind, extra),
                   cost=Cost(description="none: a training-free sampler"), stats=stats)
