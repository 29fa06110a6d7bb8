"""Synthetic but valid result records for the leaderboard tests and the build benchmark."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bench import __version__
from bench.provenance import config_hash
from bench.result import (ArmTiming, Compute, Contention, Cost, ErrorInfo, Fidelity, Interval, Machine, Memory,
                          MethodInfo, ProfileInfo, Provenance, Quality, Result, Size, SizeOf, Speed, TaskInfo)
from bench.store import write_result

XSS = "<script>alert(1)</script>"  # what a hostile result file might hold in any free-text field
FAMILY = {"none": "none", "kd": "distillation", "tinybert": "distillation", "magnitude": "pruning",
          "wanda": "pruning", "deepcache": "caching", "speculative": "decoding"}
MACHINE = Machine(cpu_model="Synthetic CPU @ 2.0GHz", cpu_count=2, arch="x86_64", os="Linux-6.1-x86_64",
                  cuda_available=False, torch="2.14.1", torch_threads=2)


def make_result(*, task: str = "digits", method: str = "kd", profile: str = "cpu", seed: int = 0,
                hp: dict[str, Any] | None = None, ref: float = 0.98, delta: float = -0.01, dci: float = 0.01,
                speedup: float = 2.0, sci: float = 0.1, n: int = 0, status: str = "ok", tier: str = "embedded",
                metric: str = "top1_accuracy", hib: bool = True, paper: str = "Hinton et al., Distilling",
                url: str = "https://arxiv.org/abs/1503.02531", command: str | None = None,
                created_at: str = "2025-01-01T00:00:00+00:00", speed_status: str | None = "ok",
                reasons: list[str] | None = None, other_share: float | None = None) -> Result:
    """A valid record. `speed_status` sets the speed verdict: "ok" (no reasons), "unreliable" (with `reasons`,
    a contention reason by default), or None for a record made before the verdict existed (the model's
    default: unreliable, with the legacy reason)."""
    hp = {"temperature": 4.0, "alpha": 0.5} if hp is None else hp
    family = FAMILY.get(method, "distillation")
    cfg = config_hash(task, "1", method, "1", hp, profile, seed, __version__)
    run_id = f"20250101T000000Z-{cfg[:8]}-{n:04x}"
    common = dict(
        run_id=run_id, created_at=created_at, seed=seed,
        task=TaskInfo(name=task, version="1", tier=tier, modality="image-classification", data_fingerprint="ab" * 32,
                      reference_sha256="cd" * 32, reference_canonical=True),
        method=MethodInfo(name=method, family=family, version="1", hyperparameters=hp, paper=paper, year=2015,
                          url=url),
        profile=ProfileInfo(name=profile, device="cpu", dtype="float32", threads=2, batch_size=64, detected=MACHINE,
                            matched=True),
        provenance=Provenance(bench_version=__version__, git_sha="0123456789abcdef0123456789abcdef01234567",
                              git_dirty=False, config_hash=cfg, packages={"torch": "2.14.1", "numpy": "2.3.0"},
                              command=command or f"bench run --method {method} --task {task} --profile {profile}",
                              platform="Linux-6.1-x86_64-with-glibc2.36", python="3.11.7"))
    if status != "ok":
        return Result(status="failed", **common,
                      error=ErrorInfo(type="RuntimeError", message="synthetic failure", traceback="Traceback ..."))
    value = ref + delta
    verdict: dict[str, Any] = {}
    if speed_status == "ok":
        verdict = dict(status="ok", reasons=[], precision=sci, precision_target=max(sci, 0.05))
    elif speed_status is not None:
        share = 0.5 if other_share is None else other_share
        verdict = dict(status=speed_status, reasons=reasons or [
            f"contended: other processes used {share:.0%} of the 2 CPUs while the pairs ran (limit 10%)"],
            precision=sci, precision_target=0.05,
            contention=Contention(other_cpu_share=share, steal_share=0.0, load_average_1m=2.5, cpus=2, wall_s=12.0,
                                  limit=0.1))
    return Result(
        status="ok", **common,
        quality=Quality(metric=metric, higher_is_better=hib, value=value, reference_value=ref, delta=value - ref,
                        interval=Interval(low=value - dci, high=value + dci),
                        delta_interval=Interval(low=value - ref - dci, high=value - ref + dci), n=449),
        fidelity=Fidelity(metric="top1_agreement", value=0.97),
        speed=Speed(unit="seconds per pass over 449 images", items_per_call=449,
                    reference=ArmTiming(median_s=0.02, iqr_s=0.001, n=30),
                    method=ArmTiming(median_s=0.02 / speedup, iqr_s=0.001, n=30), speedup=speedup,
                    interval=Interval(low=speedup * (1 - sci), high=speedup * (1 + sci)), synchronized=False,
                    **verdict),
        memory=Memory(measure="tracemalloc", reference_peak_bytes=4_000_000, method_peak_bytes=1_000_000),
        size=Size(reference=SizeOf(parameters=160_000, nonzero_parameters=160_000, bytes=640_000),
                  method=SizeOf(parameters=3_700, nonzero_parameters=3_700, bytes=14_800), sparsity=0.0,
                  runtime_exploits_sparsity=False),
        compute=Compute(unit="MACs", reference=2.4e6, method=0.1e6),
        cost=Cost(seconds=12.5, steps=300, samples_seen=38_400, description="student training"))


def rerun_of(result: Result, speedup: float | None = None, sci: float | None = None, **speed: Any) -> Result:
    """What `bench reproduce` would have measured for `result`: the same record under another run id, with a
    reliable speed (its own `speedup` +- `sci` when given; `speed` sets other fields of the speed block)."""
    s = result.speed
    if speedup is not None:
        rel = (s.interval.high - s.interval.low) / (2 * s.speedup) if sci is None else sci
        s = s.model_copy(update=dict(speedup=speedup, interval=Interval(low=speedup * (1 - rel),
                                                                        high=speedup * (1 + rel))))
    s = s.model_copy(update={"status": "ok", "reasons": [], **speed})
    return result.model_copy(update=dict(run_id=result.run_id[:-4] + "ffff", speed=s))


def verification_of(result: Result, rerun: Result | None = None, forced: bool = False, **change: Any) -> str:
    """The `.verified.json` text `bench reproduce` writes for `result` re-run as `rerun` (default: a faithful
    re-run); `change` overrides fields of the verification afterwards, as a hand-editor would."""
    from bench.reproduce import make_verification

    diffs = ["package numpy: record 2.3.0, here 2.4.0"] if forced else []
    v = make_verification(result, rerun or rerun_of(result), result.relpath().name, "a maintainer", diffs)
    return v.model_copy(update=change).to_json() if change else v.to_json()


def write(result: Result, root: Path, verified: bool = False, fsync: bool = True) -> Path:
    """Write like `bench run` does (atomically, fsync'd); `fsync=False` just writes, for bulk trees.
    `verified`: beside it, the verification `bench reproduce` would write after a faithful re-run (a failed
    run is never verified: it gets none)."""
    if fsync:
        path = write_result(result, root)
    else:
        path = root / result.relpath()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.to_json(), encoding="utf-8")
    if verified and result.status == "ok":
        path.with_name(path.name[: -len(".json")] + ".verified.json").write_text(verification_of(result))
    return path


CONTENDED = "contended: other processes used 50% of the 2 CPUs while the pairs ran (limit 10%)"


def unreliable_tree(root: Path) -> Path:
    """digits: on cpu a noise floor, a reliable kd, a faster magnitude whose timing was contended (one reason
    tries markup) and a deepcache record made before the speed verdict existed; on h100-bf16 a kd with no noise
    floor beside it."""
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1), root)
    write(make_result(method="kd", delta=-0.004, speedup=2.0, n=2), root)
    write(make_result(method="magnitude", hp={"sparsity": 0.5}, delta=-0.002, speedup=4.0, n=3,
                      speed_status="unreliable", reasons=[CONTENDED, f"imprecise: {XSS}"]), root)
    write(make_result(method="deepcache", hp={"interval": 3}, delta=0.0, speedup=6.0, n=4, speed_status=None), root)
    write(make_result(method="kd", profile="h100-bf16", delta=-0.001, speedup=5.0, n=5), root)
    return root


def synthetic_tree(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` valid results over three tasks, two profiles and every family, with a few failed runs and a few
    whose speed is unreliable."""
    rng = random.Random(seed)
    methods = sorted(FAMILY)
    paths = []
    for i in range(n):
        method = methods[i % len(methods)]
        hp = {} if method == "none" else {"amount": round(rng.uniform(0.1, 0.9), 3), "steps": rng.choice([100, 300])}
        speedup = 1.0 if method == "none" else rng.lognormvariate(0.5, 0.6)
        r = make_result(task=("digits", "digits-gen", "arith")[i % 3], method=method,
                        profile=("cpu", "h100-bf16")[(i // 3) % 2], seed=i, hp=hp, n=i,
                        delta=0.0 if method == "none" else -abs(rng.gauss(0, 0.03)), dci=rng.uniform(0.002, 0.02),
                        speedup=speedup, sci=rng.uniform(0.01, 0.2), status="failed" if i % 97 == 5 else "ok",
                        speed_status="unreliable" if i % 11 == 3 else "ok",
                        created_at=f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T00:00:00+00:00")
        paths.append(write(r, root, verified=i % 5 == 0, fsync=False))
    return paths
