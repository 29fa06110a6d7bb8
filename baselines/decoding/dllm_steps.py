"""`dllm-steps`: the diffusion LM's own sampler with fewer steps, the trivial baseline every dLLM cache is compared
with (the dLLM-Cache and Fast-dLLM papers both report it beside their caches: a cache must beat simply doing less).

LLaDA's low-confidence remasking (`tasks._kit.dllm`) splits each block's masked count evenly over its steps: with
S steps for a response of length L in blocks of length b (L / b blocks, S / (L / b) steps each), step i of a block
unmasks

    k_i = floor(b / s_b) + 1[i < b mod s_b]        (s_b = S b / L steps per block; LLaDA's get_num_transfer_tokens)

of the block's masked positions, those with the highest confidence c_j = max_v p_theta(v | x). The reference samples
with S = L (one token per step); this method keeps everything and lowers S, so every network call fixes L / S
tokens: S network calls instead of L, the speedup's ideal L / S.

`steps` sets S directly; otherwise S = `fraction` L, rounded to a multiple of the block count. The statistics count
the network calls the sampler really made (a block whose positions are all fixed stops early) and the tokens each
unmasked.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError
from bench.registry import register_method

METHOD = "dllm-steps"


@dataclass(frozen=True)
class DLLMStepsConfig:
    # S, the sampler's network calls per response; None: `fraction` of the reference's response length
    steps: int | None = None
    # S / L when `steps` is None: 0.5 (two tokens per step) is the setting both papers' fewer-step rows start from
    fraction: float = 0.5

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1 (or None to use fraction)")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction={self.fraction} must be in (0, 1] (the share of the response length "
                              f"taken as steps)")


def resolve_steps(sampling, cfg: DLLMStepsConfig) -> int:
    """S for the subject's `Sampling`: `steps` checked against it, or `fraction` of gen_length rounded to a
    multiple of the blocks (at least one step per block)."""
    blocks = sampling.gen_length // sampling.block_length
    if cfg.steps is not None:
        if cfg.steps % blocks or not blocks <= cfg.steps <= sampling.gen_length:
            raise ConfigError(f"steps={cfg.steps} must be a multiple of the sampler's {blocks} blocks between "
                              f"{blocks} and gen_length={sampling.gen_length} (valid: "
                              f"{', '.join(str(blocks * i) for i in range(1, sampling.gen_length // blocks + 1))})")
        return cfg.steps
    return max(1, round(cfg.fraction * sampling.gen_length / blocks)) * blocks


class StepCounter:
    """The sampler's `observe`: network calls and tokens unmasked, summed over every sequence sampled."""

    def __init__(self, inner=None):
        self.inner = inner
        self.calls = self.unmasked = self.sequences = self.positions = 0

    def __call__(self, step: dict) -> None:
        if step["block"] == 0 and step["index"] == 0:
            self.sequences += 1
        self.calls += 1
        self.unmasked += step["unmasked"]
        self.positions += step["masked"].shape[1]  # every position goes through the network at every step
        if self.inner is not None:
            self.inner(step)

    def as_dict(self) -> dict[str, float]:
        return {"network_calls": float(self.calls), "sequences": float(self.sequences),
                "steps_per_sequence": self.calls / max(self.sequences, 1),
                "tokens_unmasked_per_step": self.unmasked / max(self.calls, 1),
                "tokens_recomputed_per_step": self.positions / max(self.calls, 1), "cache_hit_share": 0.0}


def with_steps(subject, steps: int):
    """(subject sampled in `steps` steps, its StepCounter); the model and everything else are the reference's."""
    import dataclasses

    sampling = dataclasses.replace(subject.extra["sampling"], steps=steps)
    sampling.validate()
    counter = StepCounter(subject.extra.get("observe"))
    extra = {**subject.extra, "sampling": sampling, "observe": counter}
    return dataclasses.replace(subject, extra=extra), counter


@register_method(METHOD, family="decoding", paper="Nie et al., Large Language Diffusion Models (the sampler's step "
                 "count)", year=2025, url="https://arxiv.org/abs/2502.09992", modalities=("diffusion-lm",),
                 summary="the diffusion LM's low-confidence-remasking sampler with fewer steps (several tokens "
                         "unmasked per network call): the baseline a dLLM cache must beat")
class DLLMSteps(Method):
    Config = DLLMStepsConfig

    def apply(self, subject, task, ctx) -> Applied:
        cfg = self.config
        cfg.validate()
        sampling = subject.extra["sampling"]
        steps = resolve_steps(sampling, cfg)
        new, counter = with_steps(subject, steps)

        def stats() -> dict[str, float]:
            return {**counter.as_dict(), "steps": float(steps), "reference_steps": float(sampling.steps)}

        return Applied(new, Cost(description=f"training-free; {steps} sampler steps instead of {sampling.steps}"),
                       stats=stats)
