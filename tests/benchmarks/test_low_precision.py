"""Benchmark (slow; `pytest -m slow -s tests/benchmarks/test_low_precision.py`): lossless decoding in bfloat16 on
arith, the rehearsal of the GPU profiles' dtype on this machine (profile `cpu-bf16`).

The reference (plain greedy `generate`, token by token) and `speculative` (the draft's 4 guesses verified in
one pass of 5 tokens) answer the first `BENCH_BF16_PROBLEMS` test problems (default 100) in bfloat16; every
differing answer is classified by `bench.divergence` (a rounding flip at a near tie, or beyond rounding). The
summary (with each flip's margin and measured noise) is printed and written to `$BENCH_OUT/low-precision.json`
when `BENCH_OUT` is set, the token answers beside it (`low-precision-answers.json`). It asserts that the
algorithm is exact: no flip beyond rounding. (bfloat16 matmuls are emulated on this CPU: ~5 s an answer.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from published import published_arith

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arith_bf16():
    return published_arith("cpu-bf16", batch_size=1)


def answers(subject, contexts: list[list[int]], max_new: int) -> "list[list[int]]":
    import torch

    from tasks._kit.lm import generate_ids

    eos = subject.extra["tokenizer"].eos_token_id
    out = []
    for c in contexts:
        ids = torch.tensor([c])
        with torch.inference_mode():
            new = generate_ids(subject, ids, max_new)[0, len(c):].tolist()
        out.append(new[:new.index(eos) + 1] if eos in new else new)
    return out


@pytest.mark.parametrize("method", ["speculative"])
def test_bf16_flips_are_rounding(arith_bf16, method):
    import numpy as np

    from bench.divergence import analyse
    from bench.registry import create_method
    from tasks._kit import lm, lm_harness

    task, ctx, reference = arith_bf16
    n = int(os.environ.get("BENCH_BF16_PROBLEMS", "100"))
    tok = reference.extra["tokenizer"]
    contexts = tok([lm.prompt_of(p["question"]) for p in task.test[:n]], add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    ref = answers(reference, contexts, lm_harness.MAX_GEN_TOKS)
    applied = create_method(method).apply(reference, task, ctx)
    met = answers(applied.subject, contexts, lm_harness.MAX_GEN_TOKS)
    width = max(map(len, ref + met))
    pad = lambda rows: np.array([r + [-1] * (width - len(r)) for r in rows])  # noqa: E731
    d = analyse(reference.model, contexts, pad(ref), pad(met), limit=n, details=True)
    summary = {"method": method, "profile": ctx.profile.name, "problems": n,
               "identical_answers": 1 - d["differing"] / n, **d, "seconds": time.perf_counter() - t0}
    print(json.dumps(summary, indent=1))
    if out := os.environ.get("BENCH_OUT"):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "low-precision.json").write_text(json.dumps(summary, indent=1) + "\n")
        (Path(out) / "low-precision-answers.json").write_text(json.dumps({"contexts": contexts, "reference": ref,
                                                                          method: met}) + "\n")
    assert d["beyond_rounding"] == 0, summary
