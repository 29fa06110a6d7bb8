"""The result record, `bench.result/1`: one JSON file per run, validated by these pydantic models.

`bench/schema/result-1.schema.json` is exported from `Result` (`bench schema --write`) and a test keeps the
two in sync, so tools outside Python can validate results too. Invariants that a JSON Schema cannot state
(the delta equals value minus reference, a point estimate lies inside its interval, the file lives at the
path its fields name) are checked by `invariant_errors`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA = "bench.result/1"
SCHEMA_FILE = Path(__file__).parent / "schema" / "result-1.schema.json"
_NAME = r"^[a-z0-9][a-z0-9._-]*$"  # task, method and profile names: also path components, so no '/' or '..'
MAX_RECORD_BYTES = 1 << 20  # a record file's size limit (bench.store reads no more); real ones are under 10 KB
MAX_DEPTH = 32  # objects and arrays within each other; a record nests 5 or 6 deep


class _M(BaseModel):
    # Every number of a record is finite: JSON has no NaN or Infinity (Python writes them as bare tokens that
    # browsers' JSON.parse refuses, and a page would read "speedup inf x"), and no comparison means anything
    # with them. A run that produces one fails, naming the field, instead of writing it.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Machine(_M):
    cpu_model: str
    cpu_count: int
    arch: str
    os: str
    cuda_available: bool
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None
    gpu_count: int = 0
    driver: str | None = None
    cuda_version: str | None = None
    torch: str
    torch_threads: int
    load_average_1m: float | None = Field(None, description="the machine's 1-minute load average when the run "
                                          "started: other work on the cores disturbs the timing")


class TaskInfo(_M):
    name: str = Field(pattern=_NAME)
    version: str
    tier: Literal["embedded", "full"]
    modality: str
    data_fingerprint: str = Field(description="sha256 of the task's evaluation data as loaded")
    reference_sha256: str = Field(description="sha256 of the reference weights the run was measured against")
    reference_canonical: bool = Field(description="True when those weights are the task's published artifact")


def _non_finite(value: Any, at: str = "") -> str | None:
    """Where a free-form value (hyper-parameters) holds NaN or an infinity, or None; iterative."""
    stack = [(value, at)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or "(value)"
        if isinstance(v, dict):
            stack += [(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return None


class MethodInfo(_M):
    name: str = Field(pattern=_NAME)
    family: Literal["distillation", "caching", "pruning", "decoding", "quantization", "none"]
    version: str
    hyperparameters: dict[str, Any]
    paper: str
    year: int | None = None
    url: str = ""

    @field_validator("hyperparameters")
    @classmethod
    def _finite_hyperparameters(cls, v: dict[str, Any]) -> dict[str, Any]:
        where = _non_finite(v)
        if where is not None:
            raise ValueError(f"{where} is not a finite number (a record holds finite numbers only)")
        return v


class ProfileInfo(_M):
    name: str = Field(pattern=_NAME)
    device: str
    dtype: str
    threads: int
    batch_size: int
    detected: Machine
    matched: bool
    mismatches: list[str] = []
    compiled: bool = False  # both arms timed under torch.compile (bench run --compile; bench.compiled)


class Interval(_M):
    low: float
    high: float
    level: float = 0.95
    method: str = "percentile bootstrap"


class Secondary(_M):
    """A task's secondary quality metric (no interval): e.g. the class accuracy of generated digits."""
    value: float
    reference_value: float


class Quality(_M):
    metric: str
    higher_is_better: bool
    value: float
    reference_value: float
    delta: float = Field(description="value - reference_value, in the metric's units")
    interval: Interval | None = Field(None, description="interval of `value` over the evaluation examples")
    delta_interval: Interval | None = Field(None, description="paired interval of the delta")
    n: int = Field(ge=1, description="evaluation examples")
    secondary: dict[str, Secondary] = Field(default_factory=dict,
                                            description="the task's other quality metrics, by name")


class Divergence(_M):
    """Why a lossless decoding method's answers differ from the reference's (`bench.divergence`): each differing
    answer's first differing token classified as a rounding flip at a near tie, or beyond rounding."""
    differing: int = Field(ge=0, description="answers whose tokens differ from the reference's")
    analysed: int = Field(ge=0, description="of those, how many were re-run (the first ones, up to a limit)")
    numeric: int = Field(ge=0, description="flips within the change a different batch shape makes to the margin")
    beyond_rounding: int = Field(ge=0, description="flips whose margin exceeds it: the method's choice")
    unexplained: int = Field(ge=0, description="one answer ended where the other continued")
    criterion: str

    @model_validator(mode="after")
    def _counts_add_up(self):
        if self.numeric + self.beyond_rounding + self.unexplained != self.analysed or self.analysed > self.differing:
            raise ValueError(f"divergence counts do not add up: numeric {self.numeric} + beyond_rounding "
                             f"{self.beyond_rounding} + unexplained {self.unexplained} must equal analysed "
                             f"{self.analysed} <= differing {self.differing}")
        return self


class Fidelity(_M):
    metric: str = Field(description="e.g. top1_agreement: share of inputs where method and reference agree")
    value: float
    divergence: Divergence | None = Field(None, description="for a method decoding the reference's own weights: "
                                                            "where its token answers differ, and why")


class Control(_M):
    """A comparison the method's paper implies, e.g. the same student trained without the teacher."""
    name: str
    description: str
    value: float
    interval: Interval | None = None
    cost_seconds: float | None = None
    gain_interval: Interval | None = Field(None, description="paired 95% bootstrap interval of the method's value "
                                           "minus the control's, on the same evaluation examples")


class ArmTiming(_M):
    median_s: float = Field(gt=0)
    iqr_s: float = Field(ge=0)
    n: int = Field(ge=1)


class Contention(_M):
    """What else used the machine during the timed window (bench/contention.py says how each is measured)."""
    other_cpu_share: float | None = Field(None, ge=0, le=1, description="share of the machine's cores used by "
                                          "other processes while the pairs ran (/proc/stat minus our own CPU time)")
    steal_share: float | None = Field(None, ge=0, le=1, description="share of CPU time the hypervisor stole")
    load_average_1m: float | None = Field(None, ge=0, description="1-minute load average at the window's end")
    cpus: int = Field(ge=1)
    wall_s: float = Field(ge=0, description="length of the timed window(s)")
    limit: float = Field(ge=0, le=1, description="the profile's max_other_share: above it a timing is contended")
    gpu_other_processes: int | None = Field(None, ge=0)
    gpu_sm_clock_mhz_min: int | None = None
    gpu_sm_clock_mhz_max: int | None = None
    gpu_sm_clock_max_mhz: int | None = Field(None, description="the GPU's top SM clock, for comparison")


class Attempt(_M):
    """One timing attempt; an unreliable one is retried (timing only)."""
    speedup: float = Field(gt=0)
    interval: Interval
    pairs: int = Field(ge=1)
    other_cpu_share: float | None = Field(None, ge=0, le=1)
    status: Literal["ok", "unreliable"]
    reasons: list[str] = []


class Remeasured(_M):
    """Who re-timed the record (`bench remeasure`), when, with which code. Only `speed` and the machine it was
    timed on (`profile.detected`, `matched`, `mismatches`) changed; the original run's machine is kept here."""
    at: str
    bench_version: str
    git_sha: str | None
    git_dirty: bool | None
    command: str
    packages: dict[str, str] = Field(default_factory=dict, description="package versions it was re-timed with")
    original_machine: Machine | None = Field(None, description="the machine of the run that made the record "
                                             "(its quality figures); profile.detected is the machine it was "
                                             "re-timed on, whose speed the record holds")


LEGACY_REASON = "timed before bench measured contention and precision (run `bench remeasure` on it)"


class Speed(_M):
    unit: str = Field(description="what one timed call does, e.g. 'seconds per pass over 449 images'")
    items_per_call: int
    reference: ArmTiming
    method: ArmTiming
    speedup: float = Field(gt=0, description="median over pairs of t_reference / t_method; > 1 is faster")
    interval: Interval
    order: str = "interleaved, alternating ABBA"
    synchronized: bool = Field(description="CUDA synchronised around every timed region")
    status: Literal["ok", "unreliable"] = Field("unreliable", description="the verdict on this speed figure: "
                                                "'unreliable' ones are left out of ranks and recommendations")
    reasons: list[str] = Field(default_factory=lambda: [LEGACY_REASON],
                               description="why the figure is unreliable (contended, imprecise, unstable)")
    precision: float | None = Field(None, ge=0, description="relative half-width of the interval reached: "
                                    "(high - low) / (2 * speedup)")
    precision_target: float | None = Field(None, gt=0, description="the profile's target for `precision`")
    contention: Contention | None = None
    attempts: list[Attempt] = Field(default_factory=list, description="every timing attempt, the published one "
                                    "included")
    processes: int = Field(1, ge=1, description="worker processes whose pairs were pooled (two-stage bootstrap)")
    remeasured: Remeasured | None = Field(None, description="set when `bench remeasure` re-timed the record")

    @model_validator(mode="after")
    def _verdict(self) -> "Speed":
        if self.status == "unreliable" and not self.reasons:
            raise ValueError("an unreliable speed needs its reasons")
        if self.status == "ok" and self.reasons:
            raise ValueError("an ok speed carries no reasons")
        return self


class Memory(_M):
    measure: str = Field(description="how peak memory was measured")
    reference_peak_bytes: int = Field(ge=0)
    method_peak_bytes: int = Field(ge=0)


class SizeOf(_M):
    parameters: int = Field(ge=0)
    nonzero_parameters: int = Field(ge=0)
    bytes: int = Field(ge=0, description="size of the safetensors serialization of the state dict (a "
                       "quantization method's model: its packed size, size.quantization.serialized_bytes)")


class Quantization(_M):
    """A quantization method's precision and storage (family `quantization`)."""
    weight_bits: int = Field(ge=1, le=32, description="bits of each quantized weight")
    activation_bits: int | None = Field(None, ge=1, le=32, description="bits activations are quantized to in the "
                                        "timed runtime (None: they stay in the profile's float dtype)")
    group_size: int | None = Field(None, ge=1, description="consecutive input columns sharing one scale and zero "
                                   "(None: one group per output row, or per tensor as the method says)")
    serialized_bytes: int = Field(ge=0, description="bytes the quantized model would be stored in: codes packed at "
                                  "weight_bits, a float16 scale and a zero per group, unquantized tensors as they are")


class Size(_M):
    reference: SizeOf
    method: SizeOf
    sparsity: float = Field(ge=0, le=1, description="share of zero weights in the method's model")
    runtime_exploits_sparsity: bool = Field(description="whether the timed runtime skips the zeros")
    runtime_low_precision: bool | None = Field(None, description="for a quantization method: whether the timed "
                                               "runtime really executes low-precision kernels (false: it runs "
                                               "dequantized float weights); absent for other methods")
    quantization: Quantization | None = Field(None, description="for a quantization method: its bits, group size "
                                              "and packed size (absent for other methods)")

    @model_validator(mode="after")
    def _quantization_both(self) -> "Size":
        if (self.quantization is None) != (self.runtime_low_precision is None):
            raise ValueError("a quantization method's size carries both runtime_low_precision and quantization; "
                             "any other method neither")
        return self


class Compute(_M):
    unit: Literal["MACs", "NFE"]
    reference: float = Field(ge=0)
    method: float = Field(ge=0)


class Cost(_M):
    seconds: float = Field(ge=0, description="wall time of the method's own training or calibration")
    steps: int = Field(ge=0)
    samples_seen: int = Field(ge=0)
    tokens_seen: int | None = Field(None, ge=0, description="tokens the method trained on (language models)")
    description: str = ""


class Training(_M):
    """What a method that makes a smaller training set (dataset distillation) saves in training, rather than in
    inference: the task's architecture trained on the method's set against the same architecture trained on the
    task's full training split. Added to `bench.result/1` as an optional block that carries its own `version`
    (a record without it stays valid, and a reader that knows the block checks the version it reads)."""
    version: Literal[1] = Field(1, description="this block's version")
    rows: int = Field(ge=1, description="rows of the training set the method's model was trained on")
    seconds: float = Field(gt=0, description="wall time of training the method's model on those rows")
    steps: int = Field(ge=1)
    samples_seen: int = Field(ge=1)
    full_rows: int = Field(ge=1, description="rows of the task's full training split")
    full_seconds: float = Field(gt=0, description="wall time of training the same architecture on the full split")
    full_steps: int = Field(ge=1)
    full_samples_seen: int = Field(ge=1)
    full_source: str = Field(description="where the full-split figures come from (measured in this run, or "
                             "cached from an earlier run's measurement on this machine)")
    preparation_seconds: float = Field(0.0, ge=0, description="one-off cost of making the method's set (e.g. "
                                       "synthesising it), paid once for every model trained on it")
    time_ratio: float = Field(gt=0, description="seconds / full_seconds: < 1 trains faster")
    samples_ratio: float = Field(gt=0, description="samples_seen / full_samples_seen")
    time_ratio_with_preparation: float = Field(gt=0, description="(preparation_seconds + seconds) / full_seconds")
    description: str = ""


class LockInfo(_M):
    """The pinned environment a run was made in (`bench.lock`, locks/<name>.txt)."""
    name: str = Field(pattern=_NAME)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the lock's pins (its `# pins sha256:` "
                        "header line)")
    matched: bool = Field(description="the installed versions were exactly the lock's when the run started")
    differences: list[str] = Field(default_factory=list, description="where they were not (`bench lock check`)")


class Provenance(_M):
    bench_version: str
    git_sha: str | None
    git_dirty: bool | None
    command: str
    config_hash: str
    packages: dict[str, str]
    platform: str
    python: str
    lock: LockInfo | None = Field(None, description="the profile's lock and whether the install matched it "
                                  "(absent in records made before bench pinned its environment)")
    imported_packages: dict[str, str] | None = Field(
        None, description="the locked distributions the task's and the method's code imports, with their "
        "versions (bench.imported): `bench reproduce` refuses where one of these differs; absent where it could "
        "not be told")


class ErrorInfo(_M):
    type: str
    message: str
    traceback: str


class Result(_M):
    """One run's record. Beyond this schema, a reader accepts a file only when it is a regular UTF-8 file of at
    most 1 MiB, nested at most 32 levels, every number finite (JSON has no NaN or Infinity), each key once per
    object, and its commands name no absolute path."""
    schema_: Literal["bench.result/1"] = Field(SCHEMA, alias="schema")
    run_id: str = Field(pattern=r"^[0-9A-Za-z_-]+$")
    created_at: str
    status: Literal["ok", "failed"]
    seed: int
    budget: Literal["full", "smoke"] = Field("full", description="'smoke' caps every training at a few steps "
                                             "and shortens timing: a CI check, never a leaderboard result")
    task: TaskInfo
    method: MethodInfo
    profile: ProfileInfo
    quality: Quality | None = None
    fidelity: Fidelity | None = None
    controls: list[Control] = []
    method_stats: dict[str, float] = Field(default_factory=dict, description="statistics of the method's own "
                                           "procedure over the evaluation set, e.g. acceptance_rate, "
                                           "mean_accepted_length (decoding), kv_tokens_kept (KV-cache policies)")
    speed: Speed | None = None
    memory: Memory | None = None
    size: Size | None = None
    compute: Compute | None = None
    cost: Cost | None = None
    training: Training | None = Field(None, description="for a method that makes a smaller training set: "
                                      "training on it against training on the full split (absent otherwise)")
    provenance: Provenance
    error: ErrorInfo | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _status_fields(self) -> "Result":
        if self.status == "ok":
            missing = [f for f in ("quality", "speed", "memory", "size", "cost") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"status 'ok' needs {', '.join(missing)}")
            if self.error is not None:
                raise ValueError("status 'ok' must not carry an error")
        elif self.error is None:
            raise ValueError("status 'failed' needs an error")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"

    def relpath(self) -> Path:
        return Path(self.profile.name) / self.task.name / self.method.name / f"{self.run_id}.json"


def json_schema() -> dict[str, Any]:
    schema = Result.model_json_schema(by_alias=True)
    schema["$id"] = "https://bench.dev/schema/result-1.schema.json"
    schema["title"] = "bench.result/1"
    return schema


# The invariants a record must satisfy beyond its schema live in bench.invariants; importable from here too.
from bench.invariants import absolute_paths, invariant_errors  # noqa: E402,F401
