"""Running diffusers' own cache hooks (`diffusers.hooks.apply_*`) inside a task's sampling loop, and proving
they ran.

The hooks are attached to a deep copy of the denoiser (the reference keeps its plain model; the runner times
both). Every denoiser call is wrapped in the hooks' cache context: `CacheMixin.cache_context`, used unbound,
because `DiTTransformer2DModel` and `UNet2DModel` do not inherit `CacheMixin` but the context only needs the
module tree. The context's name is the call's branch within the step (separate state for conditional and
unconditional calls, for the hooks whose state is keyed by context). Hook state is reset at every batch start
with `CacheMixin._reset_stateful_cache` (diffusers' `HookRegistry.reset_stateful_hooks`).

A hook that never fires is an error, not a silent no-op: a counting `ModelHook` is registered beside each
cache hook, and a denoiser call during which none of them fired raises `HookNeverFired`, as does an
`apply_*` that attached to no module at all. The counters also give `hook_calls` and how many of those calls
ran the wrapped module (`hook_computed`) for `Applied.stats`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tasks.base import Subject


from baselines.caching._common import CacheNeverUsed


class HookNeverFired(CacheNeverUsed):
    """A diffusers cache hook was attached (or should have been) but did not run."""


@dataclasses.dataclass
class HookedModule:
    name: str
    module: object
    calls: int = 0
    computed: int = 0


def _counting(hooked: HookedModule, hook) -> None:
    """Count the hook's calls (its pre_forward runs on every call) and the calls that ran the real module."""
    fn_ref = hook.fn_ref
    pre, original = fn_ref.pre_forward, getattr(fn_ref, "original_forward", None)

    def counted_pre(module, *args, **kwargs):
        hooked.calls += 1
        return pre(module, *args, **kwargs)

    fn_ref.pre_forward = counted_pre
    if original is not None:
        def counted_original(*args, **kwargs):
            hooked.computed += 1
            return original(*args, **kwargs)

        fn_ref.original_forward = counted_original


def find_hooked(model, hook_name: str) -> list[HookedModule]:
    """Every module of `model` carrying the diffusers hook `hook_name`, with counters attached."""
    found = []
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(hook_name) if registry is not None else None
        if hook is not None:
            h = HookedModule(name or "<root>", module)
            _counting(h, hook)
            found.append(h)
    return found


@dataclasses.dataclass
class Clock:
    """Where the sampling loop is; read by the hooks' timestep callbacks."""

    timestep: float = 0.0
    step: int = -1
    num_steps: int = 0


def hooked_subject(subject: "Subject", method: str, install: Callable[[object, Clock], list[str]],
                   one_call_per_step: bool = False, witness: int = 0):
    """(subject, stats): the task's subject with `install(model_copy, clock)` applied to a copy of its model.

    `install` applies diffusers hooks and returns the hook names to look for. `one_call_per_step`: the hooks'
    state is not keyed by the cache context (PAB, FasterCache), so a second denoiser call within one step
    (classifier-free guidance as two calls) would mix the branches; that is refused. `witness`: the hooked
    module (index) whose computed / reused calls are reported as nfe_full / nfe_partial.
    """
    import torch
    from diffusers.models.cache_utils import CacheMixin

    from baselines.caching._common import Tracker, cached_subject, require_diffusion_subject

    require_diffusion_subject(subject, method)
    model = copy.deepcopy(subject.model)
    clock = Clock(num_steps=int(subject.extra.get("num_inference_steps", 0) or 0))
    hooked = [h for name in install(model, clock) for h in find_hooked(model, name)]
    if not hooked:
        raise HookNeverFired(f"{method}: diffusers attached no hook to any module of {type(model).__name__}; "
                             f"check the block identifiers")
    tracker = Tracker(lambda: CacheMixin._reset_stateful_cache(model))

    def make_call(real_model, step, branch):
        if one_call_per_step and branch > 0:
            raise ValueError(f"{method}: the task calls the denoiser more than once per step (classifier-free "
                             f"guidance as separate calls); diffusers' hook keeps one state per layer, which would "
                             f"mix the branches")

        def call(*args, **kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            clock.timestep = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
            clock.step = step
            before = sum(h.calls for h in hooked)
            with CacheMixin.cache_context(model, f"branch{branch}", step_index=step,
                                          num_inference_steps=clock.num_steps, timestep=clock.timestep):
                out = model(*args, **kwargs)
            fired = sum(h.calls for h in hooked) - before
            if fired == 0:
                raise HookNeverFired(f"{method}: none of the {len(hooked)} hooked modules "
                                     f"({', '.join(h.name for h in hooked[:4])}, ...) ran during a denoiser call")
            tracker.count("denoiser_calls")
            return out

        return call

    new = cached_subject(subject, tracker, make_call)
    new = dataclasses.replace(new, model=model)

    def stats() -> dict[str, float]:
        s = {k: v for k, v in tracker.stats().items() if k not in ("nfe_full", "nfe_partial")}
        w = hooked[witness]
        s["nfe_full"], s["nfe_partial"] = w.computed, w.calls - w.computed
        s["hooked_modules"] = len(hooked)
        s["hook_calls"] = sum(h.calls for h in hooked)
        s["hook_computed"] = sum(h.computed for h in hooked)
        if s["hook_calls"]:
            s["hook_reuse_share"] = 1 - s["hook_computed"] / s["hook_calls"]
        return s

    return new, stats, hooked
