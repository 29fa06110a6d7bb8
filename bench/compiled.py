"""`bench run --compile`: both arms timed under `torch.compile`, alike, so a user can measure the regime they
deploy rather than eager PyTorch's.

Eager batch-1 decoding of a 0.5-1.5B model on a GPU is bound by Python and kernel-launch overhead, not by the
GPU: a method that saves FLOPs (a draft, a cache) can then show ~1x for reasons that are the harness's. Under
`--compile` every module an arm keeps resident (`bench.measure.reachable`: its model, a draft, a copied
denoiser) has its `forward` replaced by `torch.compile(forward)` for the timing and the memory measure, and a
Hugging Face model's generation config asks for the static KV cache (`cache_implementation="static"`, the
layout `torch.compile` needs to avoid recompiling as the cache grows). A module both arms hold (the reference's
weights under a cache or a verifier) is compiled once and serves both. Quality and MACs are measured on the
eager modules (compiled kernels compute the same function; the flop counter counts eager operators), and the
forwards are restored afterwards. The first calls of each arm compile inside the untimed warm-up; shapes that
first appear later (longer generations) recompile inside the timing, which the record's interval then shows.

The backend is inductor (torch's default); `BENCH_COMPILE_BACKEND` names another (the tests use `eager`, which
runs Dynamo's capture without code generation). The record says `profile.compiled: true`, and the flag is part
of the configuration hash.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

BACKEND_ENV = "BENCH_COMPILE_BACKEND"


def backend() -> str:
    return os.environ.get(BACKEND_ENV) or "inductor"


@contextmanager
def compiled_arms(*subjects) -> Iterator[list]:
    """Within the context, every module the `subjects` keep resident runs compiled (module docstring); yields
    the modules compiled. Everything is restored on exit, also after an error."""
    import torch

    from bench.measure import reachable

    modules: list = []
    for s in subjects:
        for m in reachable(s)[0]:
            if not any(m is k for k in modules):
                modules.append(m)
    saved = []
    try:
        for m in modules:
            gen = getattr(m, "generation_config", None)
            saved.append((m, m.__dict__.get("forward"), gen, getattr(gen, "cache_implementation", None)))
            m.forward = torch.compile(m.forward, backend=backend())
            if gen is not None:
                gen.cache_implementation = "static"
        yield modules
    finally:
        for m, forward, gen, cache_impl in saved:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
            if gen is not None:
                gen.cache_implementation = cache_impl
