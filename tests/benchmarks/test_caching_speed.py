"""Benchmark (run with `pytest --benchmark-only tests/benchmarks/test_caching_speed.py -s`): each diffusion caching
method's and each sampler's measured speedup over the reference sampler, next to the ideal speedup its compute implies.

The digits-gen denoisers (UNet2DModel and DiTTransformer2DModel at the tasks' sizes; random weights, since speed
does not depend on them) in the tasks' own loop: DDIM, 50 steps, a batch of 64 (the cpu profile's). Per method:
the paired timing ratio (bench.timing, interleaved), the MAC ratio (bench.measure.count_macs: what the runner records, so the
ideal speedup) and the full-NFE ratio. On small models on a CPU the measured speedup falls short of the MAC
ratio (per-call overhead, the part of every step caching cannot skip); the caching papers report both for
that reason. Checked loosely: the ideal speedup is not below 1 (first-block-cache is dynamic and may skip
nothing on random weights) and the measured one is positive.
"""

from __future__ import annotations

import pytest

from bench.timing import TimingRules, paired_timing

CASES = [  # (backbone, method, overrides): each method's defaults unless a hook needs a setting to do anything
    ("unet", "ddim", {}),
    ("unet", "dpm-solver", {}),
    ("unet", "unipc", {}),
    ("dit", "dpm-solver", {}),
    ("unet", "deepcache", {}),
    ("unet", "pab", {}),
    ("dit", "fora", {}),
    ("dit", "toca", {}),
    ("dit", "taylorseer", {}),
    ("dit", "diffusers-taylorseer", {}),
    ("dit", "first-block-cache", {"threshold": "0.1"}),
    ("dit", "pab", {}),
    ("dit", "fastercache", {}),
]


def _subject(backbone: str):
    import torch

    from tasks._kit import diffusion
    from tasks.base import Subject

    torch.set_num_threads(1)
    model = (diffusion.build_unet() if backbone == "unet" else diffusion.build_dit()).eval()
    return Subject(model, "image-generation", diffusion.sampling_extra(backbone))


@pytest.mark.parametrize("backbone, name, overrides", CASES, ids=[f"{b}-{m}" for b, m, _ in CASES])
def test_caching_speedup(benchmark, backbone, name, overrides):
    from bench import registry
    from bench.measure import count_macs
    from tasks._kit.diffusion import eval_inputs, sample

    reference = _subject(backbone)
    applied = registry.create_method(name, overrides).apply(reference, None, None)
    noise, labels = eval_inputs(64, 10_000)  # the cpu profile's image-generation batch

    def ref_fn():
        return sample(reference, noise, labels)

    def met_fn():
        return sample(applied.subject, noise, labels)

    ref_macs, met_macs = count_macs(ref_fn), count_macs(met_fn)
    stats = applied.stats()  # of the counted call: one batch
    calls = stats.get("nfe_full", 0) + stats.get("nfe_partial", 0)
    if "nfe" in stats:  # a sampler: every evaluation is a full one, against the reference's 50
        calls, stats = 50, {"nfe_full": stats["nfe"]}
    rules = TimingRules(warmup=1, min_time_s=5.0, min_repeats=5, max_repeats=20)
    t = benchmark.pedantic(paired_timing, args=(ref_fn, met_fn, rules), rounds=1, iterations=1)
    ideal_macs = ref_macs / met_macs
    ideal_nfe = calls / stats["nfe_full"] if stats.get("nfe_full") else float("nan")
    benchmark.extra_info.update(measured_speedup=t.speedup, low=t.interval[0], high=t.interval[1],
                                mac_ratio=ideal_macs, nfe_ratio=ideal_nfe, pairs=t.n,
                                share_of_ideal=t.speedup / ideal_macs)
    print(f"\n{backbone:4s} {name:22s} measured {t.speedup:5.2f}x [{t.interval[0]:.2f}, {t.interval[1]:.2f}]  "
          f"ideal (MACs) {ideal_macs:5.2f}x  full-NFE ratio {ideal_nfe:5.2f}x  "
          f"measured/ideal {t.speedup / ideal_macs:4.2f}")
    assert ideal_macs >= 0.999
    assert t.speedup > 0


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_denoiser_overhead(benchmark, backbone):
    """Is a denoising step compute-bound? The fixed per-call cost is at most the whole step at batch 1, so
    t(1) / t(B) bounds the share of a step at batch B that no caching method can remove."""
    import time

    import torch

    from tasks._kit import diffusion

    subject = _subject(backbone)
    denoise = diffusion.DENOISERS[backbone]

    def step_ms(b: int) -> float:
        x, y, t = torch.randn(b, 1, diffusion.SIZE, diffusion.SIZE), torch.arange(b) % 10, torch.tensor(500)
        with torch.inference_mode():
            for _ in range(3):
                denoise(subject.model, x, t, y, 0)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(5):
                    denoise(subject.model, x, t, y, 0)
                times.append((time.perf_counter() - t0) / 5 * 1e3)
        return sorted(times)[3]

    ms = benchmark.pedantic(lambda: {b: step_ms(b) for b in (1, 16, 64)}, rounds=1, iterations=1)
    benchmark.extra_info.update({f"ms_per_step_b{b}": v for b, v in ms.items()})
    print(f"\n{backbone}: " + ", ".join(f"B={b}: {v:.1f} ms/step (overhead <= {ms[1] / v:.0%})" for b, v in ms.items()))
    assert ms[64] > ms[1]
