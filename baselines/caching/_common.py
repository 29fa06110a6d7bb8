"""Plumbing shared by the diffusion caching methods: how a cached forward is put into a task's sampling loop.

A diffusion task's subject carries its sampling procedure in `extra` (see tasks/digits_gen.py):
`extra["denoise"](model, x_t, t, labels, step_index) -> eps` is called by the loop once per step, and
`extra["on_batch_start"]()` (optional) at the start of every batch. A caching method keeps the task's own
`denoise` (whatever it does around the network: classifier-free guidance, output splitting) and hands it a
*proxy* in place of the network. Each call of the proxy runs the method's cached forward with the step index
and the call's position within the step (the branch: with classifier-free guidance done as two calls, the
conditional and unconditional branches get separate caches; a batched call keeps its rows apart anyway).
Caches are dropped at every batch start, and also when the step index goes backwards (a new sampling loop
that did not announce itself), so two batches in a row give what each gives alone.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tasks.base import Subject


class CacheNeverUsed(RuntimeError):
    """The task's `denoise` returned without calling the (cached) denoiser it was handed: the method did nothing."""


class Tracker:
    """Step and branch bookkeeping for one cached subject, and the counters behind `Applied.stats`."""

    def __init__(self, reset_caches: Callable[[], None]):
        self._reset_caches = reset_caches
        self.step = -1
        self.branch = 0
        self.counts: dict[str, float] = {"nfe_full": 0, "nfe_partial": 0}

    def reset(self) -> None:
        self.step, self.branch = -1, 0
        self._reset_caches()

    def enter_step(self, step_index: int) -> None:
        if step_index < self.step:  # a new sampling loop began without on_batch_start: start clean
            self.reset()
        if step_index != self.step:
            self.step, self.branch = int(step_index), 0

    def next_branch(self) -> int:
        b = self.branch
        self.branch += 1
        return b

    def count(self, key: str, n: float = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def stats(self) -> dict[str, float]:
        return dict(self.counts)


class DenoiserProxy:
    """Stands in for the denoiser inside the task's `denoise`: `proxy(x, t, class_labels=...)` runs `call`.

    Attribute reads (`config`, `dtype`, `device`, ...) go to the real model, so the task's code cannot tell.
    """

    def __init__(self, model, call: Callable[..., Any]):
        self._model = model
        self._call = call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def split_call(args: tuple, kwargs: dict, first: str, text: bool = False) -> tuple[Any, Any, Any, bool, Any]:
    """(sample, timestep, class_labels, return_dict, encoder_hidden_states) from a denoiser-style call.

    `text=False`: a UNet2DModel / DiTTransformer2DModel call, (sample, timestep, class_labels, return_dict);
    encoder_hidden_states is then always None. `text=True`: a UNet2DConditionModel call, (sample, timestep,
    encoder_hidden_states, class_labels), return_dict by keyword. Any other non-None argument is refused.
    """
    kwargs = dict(kwargs)
    names = [first, "timestep", "encoder_hidden_states", "class_labels"] if text else \
        [first, "timestep", "class_labels", "return_dict"]
    values = dict(zip(names, args))
    for alias in ("sample", "hidden_states"):
        if alias in kwargs:
            values[first] = kwargs.pop(alias)
    for k in (*names[1:], "return_dict"):
        if k in kwargs:
            values[k] = kwargs.pop(k)
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if extra:
        accepted = ", ".join(names + (["return_dict"] if text else []))
        raise TypeError(f"the cached denoiser takes ({accepted}); got unsupported arguments {sorted(extra)}")
    return (values.get(first), values.get("timestep"), values.get("class_labels"), values.get("return_dict", True),
            values.get("encoder_hidden_states"))


def wrap_output(model, sample, return_dict: bool):
    """Return `sample` the way `model.forward` would have (a diffusers output object, or a 1-tuple)."""
    if not return_dict:
        return (sample,)
    if is_dit(model):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    if hasattr(model, "get_time_embed"):  # UNet2DConditionModel
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)
    from diffusers.models.unets.unet_2d import UNet2DOutput

    return UNet2DOutput(sample=sample)


def is_dit(model) -> bool:
    return hasattr(model, "transformer_blocks") and hasattr(model, "proj_out_1")


def is_unet(model) -> bool:
    return hasattr(model, "down_blocks") and hasattr(model, "up_blocks") and hasattr(model, "conv_in")


def require_backbone(model, kind: str, method: str) -> None:
    """Raise a clear error when `method` (which needs a `kind` backbone: "dit" or "unet") gets another one."""
    ok = is_dit(model) if kind == "dit" else is_unet(model)
    if not ok:
        want = {"dit": "a DiT (diffusers DiTTransformer2DModel)",
                "unet": "a UNet (diffusers UNet2DModel or UNet2DConditionModel)"}[kind]
        raise ValueError(f"{method} needs {want}; the task's denoiser is a {type(model).__name__}. "
                         f"Use a task with that backbone (e.g. digits-gen or coco for UNet methods, digits-gen-dit "
                         f"or imagenet-fid for DiT methods).")


def require_diffusion_subject(subject: "Subject", method: str) -> None:
    if "denoise" not in subject.extra:
        raise ValueError(f"{method} needs a diffusion subject whose extra has 'denoise' (the per-step call the "
                         f"sampling loop makes); this one has {sorted(subject.extra)}")


def cached_subject(subject: "Subject", tracker: Tracker, make_call: Callable[[Any, int, int], Callable]) -> "Subject":
    """A copy of `subject` whose `denoise` hands the task's own `denoise` a proxy running the cached forward.

    `make_call(model, step_index, branch)` returns the function a proxy call runs (same arguments as the
    model). The subject's model is the same object: nothing is changed in it.
    """
    from tasks.base import Subject

    inner = subject.extra["denoise"]
    previous_start = subject.extra.get("on_batch_start")

    def denoise(model, x_t, t, labels, step_index):
        tracker.enter_step(step_index)

        calls = tracker.branch

        def call(*args, **kwargs):
            return make_call(model, step_index, tracker.next_branch())(*args, **kwargs)

        out = inner(DenoiserProxy(model, call), x_t, t, labels, step_index)
        if tracker.branch == calls:
            raise CacheNeverUsed(f"the task's denoise returned at step {step_index} without calling the denoiser it "
                                 f"was given, so the caching method never ran")
        return out

    def on_batch_start():
        if previous_start is not None:
            previous_start()
        tracker.reset()

    extra = dict(subject.extra, denoise=denoise, on_batch_start=on_batch_start)
    return dataclasses.replace(subject, extra=extra)


def full_step(step_index: int, interval: int, warmup: int = 1) -> bool:
    """Uniform refresh: every step before `warmup`, then every `interval`-th step counted from step warmup-1.

    With warmup=1: steps 0, N, 2N, ...; interval 1 computes every step in full.
    """
    if step_index < warmup:
        return True
    return (step_index - (warmup - 1)) % interval == 0
