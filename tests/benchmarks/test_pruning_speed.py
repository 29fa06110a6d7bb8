"""Benchmark (run with `pytest --benchmark-only tests/benchmarks/test_pruning_speed.py`): what the pruning
methods buy in time at a *fixed amount of work*, interleaved in one process against the reference.

The runner's timed workload for `arith` is greedy answers to test questions, so a pruned model that writes
shorter (or longer) answers is timed on a different number of tokens. Here every arm generates exactly
`TOKENS` new tokens for the same prompts (EOS ignored), so the ratio is the per-token speedup:
- `layer-drop` must be faster (fewer blocks: less compute and less per-block framework overhead);
- `wanda` / `sparsegpt` (unstructured zeros, dense kernels) must not be: their ratio is reported, near 1.
For `arith-nli` (an encoder), the task's own workload is fixed work already (classify the 1,000 test pairs);
`head-prune` must be faster there.
"""

from __future__ import annotations

import pytest

from bench.timing import TimingRules, paired_timing

RULES = TimingRules(warmup=2, min_time_s=5.0, min_repeats=10, max_repeats=60)
TOKENS = 48  # new tokens per prompt, every arm


def context():
    import torch

    from bench.profiles import load_profile
    from bench.progress import Reporter
    from tasks.base import RunContext

    profile = load_profile("cpu")
    torch.set_num_threads(profile.threads)
    return RunContext(profile=profile, seed=0, progress=Reporter(), device=profile.device, dtype=profile.dtype,
                      batch_size=profile.batch_for("causal-lm"), budget="full")


def published(task, ctx):
    w = task.reference_weights(ctx)
    if not w.canonical:
        pytest.skip(f"the {task.spec.name} reference is not the published one ({w.source})")
    return task.subject_from_state(w.state, ctx)


@pytest.fixture(scope="module")
def arith():
    from tasks.arith import Arith

    ctx = context()
    task = Arith()
    task.load(ctx)
    return task, ctx, published(task, ctx)


def fixed_length(subject, task, ctx):
    import torch

    tok = subject.extra["tokenizer"]
    prompts = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in task.workload_prompts(ctx)]

    def run():
        with torch.inference_mode():
            return [subject.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                                           pad_token_id=tok.pad_token_id) for ids in prompts]

    return run


@pytest.mark.parametrize("method,overrides,faster", [("layer-drop", {}, True), ("wanda", {}, False),
                                                     ("sparsegpt", {}, False)],
                         ids=["layer-drop", "wanda", "sparsegpt"])
def test_per_token_speedup_on_arith(benchmark, arith, method, overrides, faster):
    from bench.registry import create_method

    task, ctx, reference = arith
    a = create_method(method, overrides).apply(reference, task, ctx)
    ref_fn, met_fn = fixed_length(reference, task, ctx), fixed_length(a.subject, task, ctx)
    assert [o.shape for o in met_fn()] == [o.shape for o in ref_fn()]  # the same number of tokens, every arm
    t = benchmark.pedantic(paired_timing, args=(ref_fn, met_fn, RULES), rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=t.speedup, low=t.interval[0], high=t.interval[1], pairs=t.n,
                                tokens_per_call=TOKENS * len(task.workload_prompts(ctx)))
    if faster:
        assert t.interval[0] > 1, f"{method}: no measured speedup ({t.speedup:.3f}, {t.interval})"
    else:
        assert t.interval[0] < 1.1, f"{method}: dense kernels should not gain from zeros ({t.speedup:.3f})"


def test_head_prune_speedup_on_arith_nli(benchmark):
    from bench.registry import create_method
    from tasks.arith_nli import ArithNLI

    ctx = context()
    ctx.batch_size = ctx.profile.batch_for("text-classification")
    task = ArithNLI()
    task.load(ctx)
    reference = published(task, ctx)
    a = create_method("head-prune", {}).apply(reference, task, ctx)
    ref_fn, items, _ = task.workload(reference, ctx)
    met_fn, _, _ = task.workload(a.subject, ctx)
    t = benchmark.pedantic(paired_timing, args=(ref_fn, met_fn, RULES), rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=t.speedup, low=t.interval[0], high=t.interval[1], pairs=t.n,
                                pairs_per_call=items, **a.stats())
    assert t.interval[0] > 1, f"head-prune: no measured speedup ({t.speedup:.3f}, {t.interval})"
