"""Benchmark (run with `pytest --benchmark-only tests/benchmarks/test_decoding_speed.py`): the decoding methods
on arith's timed workload (greedy answers to the first test questions, batch 1), with the published reference
and draft.

- `speculative` against `assisted` with the same draft, interleaved in one process: the ratio
  t(assisted) / t(speculative) (> 1: the hand-written loop is faster), at transformers' defaults and at the
  same draft length (4 drafts, no confidence stopping).
- each decoding method against plain greedy `generate` (the reference's own procedure): the paired speedup,
  beside the method's acceptance statistics (`extra_info`), so a speedup can be read against its cause.
  `medusa` trains its heads the first time (minutes; cached after), with its default sparse tree and the chain.

Tiny models on a CPU are overhead-bound (see FIELD-NOTES): a ratio near or below 1 is a finding, not a failure,
so nothing here asserts a speedup; it asserts only that the outputs are the reference's own.
"""

from __future__ import annotations

import pytest

from bench.timing import TimingRules, paired_timing

RULES = TimingRules(warmup=2, min_time_s=5.0, min_repeats=10, max_repeats=60)


@pytest.fixture(scope="module")
def arith():
    """(task, ctx, reference subject), or a skip when the published arith reference and draft are absent."""
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
    profile = load_profile("cpu")
    torch.set_num_threads(profile.threads)
    ctx = RunContext(profile=profile, seed=0, progress=Reporter(), device=profile.device, dtype=profile.dtype,
                     batch_size=profile.batch_for("causal-lm"), budget="full")
    task = arith_module.Arith()
    task.load(ctx)
    ref_w = task.reference_weights(ctx)
    if not ref_w.canonical or not task.draft_weights(ctx).canonical:
        pytest.skip(f"the arith reference or draft is not the published one ({ref_w.source})")
    return task, ctx, task.subject_from_state(ref_w.state, ctx)


def applied(name: str, overrides: dict[str, str], arith):
    from bench.registry import create_method

    task, ctx, reference = arith
    return create_method(name, overrides).apply(reference, task, ctx)


def same_outputs(a, b) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a(), b()))


ASSISTED = {"library-defaults": {},
            "matched-k4": {"num_assistant_tokens": "4", "assistant_confidence_threshold": "0"}}


@pytest.mark.parametrize("assisted_config", list(ASSISTED))
def test_speculative_against_assisted(benchmark, arith, assisted_config):
    task, ctx, _ = arith
    spec = applied("speculative", {"num_draft_tokens": "4"}, arith)
    assisted = applied("assisted", ASSISTED[assisted_config], arith)
    spec_fn, items, _ = task.workload(spec.subject, ctx)
    assisted_fn, _, _ = task.workload(assisted.subject, ctx)
    assert same_outputs(spec_fn, assisted_fn)
    t = benchmark.pedantic(paired_timing, args=(assisted_fn, spec_fn, RULES), rounds=1, iterations=1)
    benchmark.extra_info.update(
        ratio_assisted_over_speculative=t.speedup, low=t.interval[0], high=t.interval[1], pairs=t.n,
        tokens_per_call=items, speculative_stats=spec.stats(), assisted_stats=assisted.stats())
    assert t.interval[0] <= t.speedup <= t.interval[1]


@pytest.mark.parametrize("method,overrides", [("speculative", {}), ("assisted", {}), ("prompt-lookup", {}),
                                              ("medusa", {}), ("medusa", {"tree": "chain"})],
                         ids=["speculative", "assisted", "prompt-lookup", "medusa", "medusa-chain"])
def test_speedup_over_greedy(benchmark, arith, method, overrides):
    task, ctx, reference = arith
    a = applied(method, overrides, arith)
    ref_fn, items, _ = task.workload(reference, ctx)
    met_fn, _, _ = task.workload(a.subject, ctx)
    assert same_outputs(ref_fn, met_fn)  # greedy: the reference's answers, token for token
    t = benchmark.pedantic(paired_timing, args=(ref_fn, met_fn, RULES), rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=t.speedup, low=t.interval[0], high=t.interval[1], pairs=t.n,
                                tokens_per_call=items, **a.stats())
    assert t.interval[0] <= t.speedup <= t.interval[1]
