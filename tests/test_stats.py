"""The quality delta's interval is paired: the same examples resampled for method and reference. A method that
agrees with the reference on 98% of examples has a narrow delta interval; unpaired, it would be ~7x wider."""

from __future__ import annotations

import numpy as np
import pytest

from bench.stats import bootstrap_interval, paired_delta_interval


def scores(n: int = 1000, flips: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = (rng.random(n) < 0.8).astype(float)  # 80% correct
    met = ref.copy()
    idx = rng.choice(np.flatnonzero(ref == 1), flips, replace=False)
    met[idx] = 0.0  # the method loses exactly `flips` examples the reference had right
    return met, ref


def test_the_paired_interval_is_much_narrower_than_the_unpaired_one():
    met, ref = scores()
    lo, hi = paired_delta_interval(met, ref)
    assert lo <= -0.02 <= hi and hi <= 0 + 1e-12  # every difference is <= 0: the interval cannot cross zero
    width = hi - lo
    # the known widths: paired, sqrt(p(1-p)/n) with p = 0.02 -> 1.96 * 0.0044 * 2 = 0.0173;
    # unpaired, sqrt(2 * 0.8 * 0.2 / n) -> 1.96 * 0.0179 * 2 = 0.070
    assert width == pytest.approx(0.0173, rel=0.2)
    rng = np.random.default_rng(1)
    unpaired = [bootstrap_interval(met, seed=1), bootstrap_interval(rng.permutation(ref), seed=2)]
    boots = np.random.default_rng(3)
    d = [met[boots.integers(0, 1000, 1000)].mean() - ref[boots.integers(0, 1000, 1000)].mean() for _ in range(2000)]
    unpaired_width = float(np.diff(np.quantile(d, [0.025, 0.975]))[0])
    assert unpaired_width == pytest.approx(0.070, rel=0.2) and width < unpaired_width / 3
    assert unpaired  # (kept: the per-arm intervals exist for both)


def test_shuffling_the_reference_breaks_it():
    """The mutation the issue names: shuffling the reference's scores before differencing loses the pairing."""
    met, ref = scores()
    paired = paired_delta_interval(met, ref)
    shuffled = paired_delta_interval(met, np.random.default_rng(0).permutation(ref))
    assert (shuffled[1] - shuffled[0]) > 3 * (paired[1] - paired[0])


def test_the_runner_records_the_paired_interval(tmp_path):
    """End to end: the record's delta interval is the paired one over the same per-example scores."""
    from bench.runner import run

    out = run("digits", "magnitude", overrides={"sparsity": 0.5}, budget="smoke", results_root=tmp_path)
    q = out.result.quality
    from bench.speed import RunSpec, prepare

    p = prepare(RunSpec("digits", "magnitude", {"sparsity": 0.5}, "cpu", 0, "smoke"))
    met = p.task.evaluate(p.applied.subject, p.ctx).per_example
    ref = p.task.evaluate(p.reference, p.ctx).per_example
    assert q.n == ref.shape[0] and (met != ref).any()
    lo, hi = paired_delta_interval(met, ref)
    assert (q.delta_interval.low, q.delta_interval.high) == pytest.approx((lo, hi))
    shuffled = paired_delta_interval(met, np.random.default_rng(0).permutation(ref))
    assert (q.delta_interval.low, q.delta_interval.high) != pytest.approx(shuffled)
