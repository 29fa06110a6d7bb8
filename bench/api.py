"""The contract between tasks and methods: what a run hands them, what they hand back, what a task offers.

- `RunContext`: the run a task or method is part of (profile, seed, device, dtype, batch, `Budget`, progress).
- `Subject`: a loaded model with its inference procedure; `extra` holds the procedure's parts, typed per
  modality (`LMExtra`, `DiffusionExtra`, `ClassifierExtra`).
- `Evaluation`: a subject's quality: the value, per-example scores (for paired intervals) and raw outputs.
- `ReferenceWeights`: the reference's state dict with its sha256 and whether it is the published artifact.
- `Cost`, `ControlResult`, `TrainingComparison`, `Applied`: what a method's `apply(subject, task, ctx)` returns
  (a quantization method adds `runtime_low_precision` and `quantization`, the record's `size.quantization`).
- `Budget`: `full`, or `smoke` (CI's capped run: every training stops after `SMOKE_STEPS` steps).
- Capabilities: small protocols a task declares by subclassing them (`class Arith(Task, TrainingRows,
  Draft, ...)`), each one method or property. A method names the ones it needs at registration
  (`register_method(..., requires=(Draft,))`); the registry refuses a pair that does not fit before any work
  starts, naming the missing capability and the tasks that offer it. A method reads a task only through them.

Module scope stays torch-free: `bench list` imports every task and method module through this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bench.profiles import Profile
    from bench.progress import Reporter

SMOKE_STEPS = 20  # optimiser steps of any training under `--budget smoke`


class Budget(str, Enum):
    """How much a run may train: `full` (the leaderboard's), or `smoke` (a CI check: capped, never published).
    A `str` enum, so it compares equal to "full" and "smoke" and serialises as them."""

    FULL = "full"
    SMOKE = "smoke"

    def steps(self, n: int) -> int:
        """`n` training steps under this budget (at most `SMOKE_STEPS` under smoke)."""
        return n if self is Budget.FULL else min(n, SMOKE_STEPS)

    def pick(self, full, smoke):
        """`full` under the full budget, `smoke` under smoke (an evaluation size, a workload, a token cap)."""
        return full if self is Budget.FULL else smoke

    @property
    def smoke(self) -> bool:
        return self is Budget.SMOKE

    def __str__(self) -> str:
        return self.value


@dataclass
class RunContext:
    """Everything a task or method needs to know about the run it is part of."""

    profile: "Profile"
    seed: int
    progress: "Reporter"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64  # the timed workload's batch (the profile's [batch_size] for the task's modality)
    budget: Budget = Budget.FULL  # a plain "full"/"smoke" is converted
    # the batch a task's evaluate() generates or classifies at (the profile's [eval_batch_size]); None = batch_size.
    # Evaluation results must not depend on it (noise is drawn per example), only the wall time does
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        self.budget = Budget(self.budget)
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size

    @classmethod
    def for_profile(cls, profile: "Profile", modality: str, seed: int, progress: "Reporter",
                    budget: "Budget | str" = Budget.FULL) -> "RunContext":
        """The context a run of a `modality` task has under `profile`: its device, dtype and both batches. One
        constructor for `bench run`, the timing workers and `bench reference`, so they cannot drift apart."""
        return cls(profile=profile, seed=seed, progress=progress, device=profile.device, dtype=profile.dtype,
                   batch_size=profile.batch_for(modality), budget=budget,
                   eval_batch_size=profile.eval_batch_for(modality))

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype)


class LMExtra(TypedDict, total=False):
    """A causal LM's procedure: its tokenizer, and a generation hook a decoding method may set."""
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    generate: Callable[..., "torch.Tensor"]  # (subject, input_ids, attention_mask, max_new_tokens, ...) -> ids
    # the task's stopping rule (tasks._kit.lm.StopRule: lm-eval's stop strings, every end-of-sequence id), the same
    # for both arms: generate_ids cuts a hook's output with it, and a method's own loop reads it to stop there
    stop: Any


class DiffusionExtra(TypedDict, total=False):
    """A denoiser's sampling procedure (see tasks._kit.diffusion)."""
    scheduler: Any  # a diffusers scheduler
    num_inference_steps: int
    denoise: Callable[..., "torch.Tensor"]  # (model, x, t, conditioning, step_index) -> prediction
    sample: Callable[..., "torch.Tensor"]  # a method's own sampling loop, replacing the scheduler's
    decode: Callable[["torch.Tensor"], "torch.Tensor"]  # latents -> images (latent diffusion)


class VisionLanguageExtra(TypedDict, total=False):
    """A vision-language model's procedure (LLaVA-style: `<image>` positions in `input_ids` replaced by projected
    patch features), what a visual-token method reads without naming the task (see tasks/digits_vlm.py)."""
    tokenizer: Any
    stop: Any  # tasks._kit.lm.StopRule
    image_token_id: int  # input_ids == image_token_id marks the visual positions, image after image
    tokens_per_image: int
    num_layers: int  # decoder layers: "after layer K" for K in 0..num_layers (num_layers keeps every token)
    # (subject, input_ids 1 x L, pixel_values, max_new_tokens) -> ids, prompt included: replaces model.generate
    generate: Callable[..., "torch.Tensor"]
    calibration: Callable[[int, int], list]  # (n, seed) -> n training questions as (input_ids, pixel_values)


class ClassifierExtra(TypedDict, total=False):
    """A classifier's procedure: an encoder task's tokenizer, when it has one."""
    tokenizer: Any


@dataclass
class Subject:
    """A loaded model with its inference procedure; methods take one and return another."""

    model: "torch.nn.Module"
    kind: str  # the task's modality
    extra: LMExtra | DiffusionExtra | ClassifierExtra | VisionLanguageExtra = field(  # type: ignore[assignment]
        default_factory=dict)


@dataclass
class Evaluation:
    """Quality of one subject: the metric's value, per-example scores (for intervals) and raw outputs."""

    value: float
    per_example: "np.ndarray"  # one score per evaluation example; value == per_example.mean()
    outputs: "np.ndarray"  # what fidelity compares (predicted labels, generated tokens, images)
    # the task's secondary quality metrics, by name (e.g. digits-gen's class accuracy, coco's CLIP score):
    # recorded beside the main metric for reference and method, without intervals
    metrics: dict[str, float] = field(default_factory=dict)
    # where `outputs` are generated token ids (rows padded with -1): each example's context ids, as the model was
    # given them, so a lossless decoding method's differing answers can be re-run (`bench.divergence`)
    contexts: list[list[int]] | None = None

    def to_json(self) -> dict:
        return {"value": self.value, "per_example": self.per_example.tolist(), "outputs": self.outputs.tolist(),
                "metrics": dict(self.metrics), "contexts": self.contexts}

    @classmethod
    def from_json(cls, d: dict) -> "Evaluation":
        import numpy as np

        return cls(float(d["value"]), np.asarray(d["per_example"], dtype=np.float64), np.asarray(d["outputs"]),
                   {k: float(v) for k, v in d.get("metrics", {}).items()}, d.get("contexts"))


@dataclass
class ReferenceWeights:
    state: dict
    sha256: str
    canonical: bool  # the task's published artifact, bit for bit
    source: str  # where it came from: artifact path, cache path


@dataclass
class Cost:
    """What a method's own training or calibration cost (the record's `cost` block is made from it)."""
    seconds: float = 0.0  # wall time of the method's own training or calibration
    steps: int = 0  # optimiser steps or calibration batches
    samples_seen: int = 0
    description: str = "none"
    tokens_seen: int | None = None  # tokens trained on, for language models (None: not counted)


@dataclass
class TrainingComparison:
    """For a method whose product is a smaller training set (dataset distillation): the task's architecture
    trained on that set against the same architecture trained on the task's full training split. The runner
    records it as the result's `training` block, with the ratios."""
    rows: int  # rows of the method's training set
    seconds: float  # wall time of training on it
    steps: int
    samples_seen: int
    full_rows: int  # rows of the task's full training split
    full_seconds: float  # wall time of training the same architecture on it
    full_steps: int
    full_samples_seen: int
    full_source: str  # where the full-split figures come from (this run, or a cached earlier measurement)
    preparation_seconds: float = 0.0  # one-off cost of making the set (synthesis), beside the training
    description: str = ""


@dataclass
class ControlResult:
    name: str  # e.g. "student_without_teacher"
    description: str
    value: float  # in the task's metric
    per_example: Any = None  # numpy scores, for an interval
    cost_seconds: float | None = None


@dataclass
class Applied:
    subject: "Subject"
    cost: Cost = field(default_factory=Cost)
    controls: list[ControlResult] = field(default_factory=list)
    runtime_exploits_sparsity: bool = False  # True only if the timed runtime skips zero weights
    # statistics of the method's own procedure (acceptance rate, mean accepted length, KV-cache tokens kept),
    # called once, right after the runner has evaluated the returned subject: they describe the evaluation set
    stats: Callable[[], dict[str, float]] | None = None
    training: TrainingComparison | None = None  # a method that accelerates training, not inference
    # None: not a quantization method; True only if the timed runtime really executes low-precision kernels
    # (int8 matmuls), False if it runs dequantized float weights (fake quantization)
    runtime_low_precision: bool | None = None
    # a quantization method's settings and storage: {"weight_bits": int, "activation_bits": int | None,
    # "group_size": int | None, "serialized_bytes": int (the packed size of what would be stored)}
    quantization: dict | None = None


# --- capabilities ------------------------------------------------------------------------------------------
# Each is declared by a task class that subclasses it, and checked by the registry with issubclass. An
# embedded task and the full task of the same kind (arith and gsm8k; arith-nli and glue-*) offer the same ones.

@runtime_checkable
class TrainingRows(Protocol):
    """A language-model task's training problems."""

    def training_rows(self) -> list[dict[str, str]]:
        """The training split as {"question", "answer"} rows, in the order the task keeps them: the text a
        causal LM of this task is trained to read as `Question: <question>\\nAnswer: <answer>`."""


@runtime_checkable
class TrainingSplit(Protocol):
    """A classification or generation task's encoded training split."""

    def training_split(self) -> Any:
        """The training split as `tasks._kit.classification.Split` (x: the model's inputs as the task encodes them,
        y: int64 labels), on the CPU."""


@runtime_checkable
class Student(Protocol):
    """A smaller architecture of the task's kind, and how the task trains one."""

    student_recipe: ClassVar[Any]  # how a student is trained here (a TrainRecipe or an LMRecipe)

    def build_student(self) -> "torch.nn.Module":
        """A fresh, untrained student (the same interface as the reference's model)."""


@runtime_checkable
class Draft(Protocol):
    """A trained small model of the reference's vocabulary (speculative decoding's draft, LM students' start)."""

    def draft_subject(self, ctx: RunContext) -> Subject:
        """The draft, loaded as a subject on the run's device and dtype."""


@runtime_checkable
class Augmentation(Protocol):
    """Training-time augmentation of the task's inputs."""

    def augment(self, x: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        """A randomly augmented copy of the batch `x`, drawn from `gen`."""


@runtime_checkable
class Tokenizer(Protocol):
    """A text task's tokenizer (the one its reference reads with)."""

    tokenizer: Any


@runtime_checkable
class EncoderData(Protocol):
    """A text classifier's labelled training data as its forward reads it: keyword batches, and the keys a
    packed training split stacks."""

    def model_keys(self) -> tuple[str, ...]:
        """The keyword inputs the reference's forward reads, in the order the rows of the training split's
        x stack them (x[:, k] is the k-th)."""

    def encoder_batches(self, subject: Subject, n: int, seed: int, batch: int) -> list[dict[str, Any]]:
        """`n` training examples drawn without replacement (seeded), as batches of model keyword arguments on
        the subject's device, each with an `attention_mask` and `labels`."""


@runtime_checkable
class Pipeline(Protocol):
    """A full latent-diffusion pipeline (diffusers) whose denoiser is the subject, with its per-image noise
    and conditioning."""

    reference_id: ClassVar[str]  # the pipeline's hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)

    def pipeline(self, ctx: RunContext) -> Any:
        """The loaded diffusers pipeline (VAE, text encoder, scheduler; the denoiser is the subject)."""

    def sampling_extra(self, pipe: Any, model: Any, ctx: RunContext, guidance_scale: float | None = None) -> dict:
        """The subject's `extra` for `model` as this pipeline samples it (denoise with the task's guidance
        scale, or `guidance_scale`)."""

    def noise(self, subject: Subject, indices: list[int], seed: int, ctx: RunContext) -> "torch.Tensor":
        """The initial latents of images `indices`, each seeded by (seed, index)."""

    def conditioning(self, subject: Subject, indices: list[int], ctx: RunContext) -> Callable[[], "torch.Tensor"]:
        """The conditioning (prompt embeddings, class labels) of images `indices`."""

    def training_conditions(self, subject: Subject, n: int, ctx: RunContext) -> "torch.Tensor":
        """Conditioning of `n` training samples for a method that distils data-free, disjoint from the
        evaluation's."""


@runtime_checkable
class ShiftedPrompts(Protocol):
    """Prompts from a distribution shifted away from the one the task's models were trained on (a method that
    adapts while it serves is measured on a stream of them)."""

    shift: ClassVar[str]  # what differs from the training and test problems, in a sentence

    def shifted_prompts(self, n: int, seed: int) -> list[str]:
        """`n` prompts in stream order, formatted as the task's evaluation prompts its subject (tokenised without
        special tokens, as the workload does), drawn from the shifted distribution; fixed by `seed`."""


@runtime_checkable
class Sections(Protocol):
    """The reference architecture cut into consecutive sections, and how the reference is trained (for a method
    that trains the architecture again with classifiers inside it: early exits, self-distillation)."""

    reference_recipe: Any  # how the task trains its reference (a TrainRecipe): the same architecture, same budget

    def sections(self, model: "torch.nn.Module") -> list["torch.nn.Module"]:
        """`model` (as `build_reference()` builds it) as consecutive sections made of its own modules (views, no
        copies): applied in order they compute `model(x)`, to the same values. Every section but the last is a
        stage of the backbone whose output is a whole feature map (N x C x H x W) a classifier can read; the last
        is the classifier head, from the backbone's output to the logits."""


@runtime_checkable
class CalibrationSampling(Protocol):
    """A generative task's sampling loop on calibration inputs of its own (for a training-free method that fits
    something to its subject's sampling trajectories, e.g. TeaCache's rescaling polynomial)."""

    def sample_calibration(self, subject: Subject, n: int, ctx: RunContext) -> "torch.Tensor":
        """Run `subject`'s sampler (its `extra`, as the evaluation runs it) on `n` calibration inputs: noise from a
        seed the evaluation and the timed workload never use, and conditioning as for training. Returns the
        samples; a caller records what it needs through the subject it passes."""


@runtime_checkable
class FeatureNetwork(Protocol):
    """A frozen pretrained feature network for the task's inputs, apart from the evaluation's metric (an adversarial
    method's discriminator backbone, as DINOv2 is ADD's). It must not be the network the metric reads (FID's
    extractor): a discriminator on it would optimise the metric itself."""

    def feature_network(self, ctx: RunContext) -> "torch.nn.Module":
        """A frozen module (eval mode, no parameter requires grad) on the run's device, mapping a batch of the task's
        images (as its sampler returns them, in [-1, 1]) to a list of feature tensors (N x C x ...), shallow to
        deep. Deterministic: the same weights on every call and run of one machine."""


CAPABILITIES: tuple[type, ...] = (TrainingRows, TrainingSplit, Student, Draft, Augmentation, Tokenizer,
                                  EncoderData, Pipeline, ShiftedPrompts, Sections, CalibrationSampling,
                                  FeatureNetwork)


def pick(n_rows: int, n: int, seed: int) -> list[int]:
    """`min(n, n_rows)` row indices drawn without replacement, seeded, sorted: a calibration or training
    subset that is the same on every machine."""
    import random

    if n_rows == 0:
        raise ValueError("the task's training split is empty: nothing to calibrate on")
    return sorted(random.Random(seed).sample(range(n_rows), min(n, n_rows)))


def offers(task: Any, capability: type) -> bool:
    """Whether a task (class or instance) declares `capability` (by subclassing it)."""
    cls = task if isinstance(task, type) else type(task)
    return capability in cls.__mro__


def offered_by(*capabilities: type) -> list[str]:
    """The registered tasks that declare every one of `capabilities`."""
    from bench.registry import TASKS

    return [t.name for t in TASKS if all(offers(t.cls, c) for c in capabilities)]


def require(task: Any, capability: type, why: str = "") -> Any:
    """`task`, after checking it declares `capability`; the error says why the method needs it, names the
    capability and the tasks that offer it. (The registry refuses such a pair before any work starts; this
    guards callers that reach a method without the registry, and requirements that depend on settings.)"""
    if not offers(task, capability):
        name = getattr(getattr(task, "spec", None), "name", type(task).__name__)
        doc = (capability.__doc__ or "").strip().splitlines()[0] if capability.__doc__ else ""
        raise CapabilityMissing(f"{why + ': ' if why else ''}task {name!r} does not offer {capability.__name__} "
                                f"({doc.rstrip('.')}); tasks that do: {', '.join(offered_by(capability)) or 'none'}")
    return task


class CapabilityMissing(ValueError):
    """A method asked a task for a capability the task does not declare."""
