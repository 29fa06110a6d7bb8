"""`gsm8k-dllm`: GSM8K through lm-eval's own `gsm8k` task, answered by a real masked diffusion language model
(LLaDA-8B-Instruct, Nie et al. 2025) with the low-confidence-remasking sampler of `tasks._kit.dllm`.

The full counterpart of `arith-dllm`, as `gsm8k` is `arith`'s: the same loop (the sampler behind the subject's
`generate` hook, lm-eval's exact match through `tasks._kit.lm_harness`, the dLLM methods changing `sampling` or
`forward` in the subject's extra), on a published 8 B diffusion LM. It runs for real where the machine can
download the model and the data (`bench run --method dllm-steps --task gsm8k-dllm --profile h100-bf16`); its
loading code is tested offline on GSM8K-format fixture files and a tiny random Llama with a [MASK] id
(tests/tasks/test_gsm8k_dllm.py).

Task definition and data: `gsm8k`'s, reused from `tasks.gsm8k` (lm-eval's own gsm8k.yaml from its default
registry: 5-shot, few-shot seed 1234, `Question: ...\\nAnswer:` prompts, stop strings `Question:`, `</s>`,
`<|im_end|>`, strict-match exact match; the hub's openai/gsm8k or `BENCH_GSM8K_DATA=<folder>` of
train.jsonl/test.jsonl; the same evaluation sizes: all 1,319 problems on a GPU profile, the first
`gsm8k.CPU_EVAL_SIZE` on a CPU profile, `gsm8k.SMOKE_EVAL_SIZE` under `--budget smoke`). No chat template is
applied, as in `gsm8k` (lm-eval's default), so the Instruct model's score here is what this prompt gives it, not
a reproduction of a row of the LLaDA paper (whose evaluation settings differ per model).

The reference: `BENCH_GSM8K_DLLM_REFERENCE` (default `GSAI-ML/LLaDA-8B-Instruct`; a local Hugging Face folder or a
hub id, `org/name@revision` pins one; `tasks._kit.pretrained`), hashed as loaded (`reference_canonical` False).
LLaDA's checkpoint is *remote code*: its config.json has an `auto_map` naming `modeling_llada.LLaDAModelLM`, a
Python file shipped with the weights that `transformers` would import and run. That is never done silently: a
checkpoint whose config has an `auto_map` loads only with `BENCH_TRUST_REMOTE_CODE=1` (checked by `preflight`
before any work, and again when loading), after the user has read the file. A folder of a plain transformers
model (no `auto_map`: a Llama with a mask id, as the tests use) needs no opt-in. The tokenizer is the
reference's.

The mask id: the model config's `mask_token_id` (LLaDA-8B's config.json has 126336, the reserved [MASK] its
guidelines name), else the tokenizer's `mask_token_id`, else the task refuses with the reason. The logit shift:
0 (LLaDA: position i predicts token i); `BENCH_GSM8K_DLLM_SHIFT=1` for a Dream-style model (position i - 1
predicts token i).

The network call. The kit's `logits` runs a transformers Llama with a 4-D all-keys mask (it removes the causal
mask from a library model). LLaDA's own modeling code is bidirectional already and takes the usual 2-D padding
mask, so for a remote-code model the subject's `forward` is `remote_forward`: `model(input_ids, attention_mask)`
with the 2-D mask, its logits shifted by the model's shift. A plain transformers model keeps the kit's default.

The methods. `dllm-steps` (fewer sampler steps) changes only `sampling` and applies to either model. The caches
(`dllm-cache`, `fast-dllm`) replace `forward` with their own walk over Llama decoder layers
(`baselines/caching/_dllm.py: llama_parts`): on LLaDA-8B's remote-code model, whose blocks are not transformers
Llama layers, they refuse with that reason (they run on a plain transformers Llama given as the reference).

Sampler (`tasks._kit.dllm.Sampling`): LLaDA's GSM8K setting, a response of `GEN_LENGTH` = 256 positions in
semi-autoregressive blocks of `BLOCK_LENGTH` = 32 (Fast-dLLM's GSM8K setting), `STEPS` = 256 (one token per
step); under `--budget smoke` 16 positions in 2 blocks of 8, 16 steps. lm-eval asks for at most
`gsm8k.MAX_GEN_TOKS` = 256 new tokens (HFLM's default max_gen_toks; gsm8k.yaml sets none), which covers the
sampler's 256 positions (the kit's hook refuses a gen_length beyond what the caller allows). Decoding is one
question at a time (evaluation and workload at batch 1: the sampler writes a fixed-length answer per row).

Quality: lm-eval's strict-match exact match. Fidelity: the share of problems whose answer tokens (after the stop
rule's cut) equal the reference's (as `arith-dllm`). Workload: answers to lm-eval's 5-shot contexts of the first
`gsm8k.WORKLOAD_SIZE` test problems (`gsm8k.SMOKE_WORKLOAD_SIZE` under smoke), one at a time; items are network
calls (sampler steps), the unit a dLLM's cost is counted in.

Estimated cost on one H100 in bf16 (NOT measured: no GPU or download where this was written): a 5-shot prompt is
about 900 tokens, so each step is one bidirectional pass of 8 B parameters over ~1,150 positions, ~2 x 8e9 x 1,150
= 1.8e13 FLOPs, about 40-60 ms at 300-450 TFLOP/s; 256 steps make 10-15 s a problem, so a full evaluation
(1,319 problems) takes roughly 4-6 hours per arm (Fast-dLLM's GSM8K table puts LLaDA's baseline at this setting
in single-digit tokens per second on an A100, the same order). The weights take 16 GB in bf16.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from bench.api import TrainingRows, Tokenizer
from bench.registry import register_task
from tasks import gsm8k
from tasks._kit import answers, pretrained
from tasks._kit.pretrained import Pretrained
from tasks.base import Evaluation, ReferenceWeights, RunContext, Subject, Task
from tasks.gsm8k import GSM8K, GSM8KDataNotFound

if TYPE_CHECKING:
    import torch

REFERENCE_ID = "GSAI-ML/LLaDA-8B-Instruct"
REFERENCE_ENV = "BENCH_GSM8K_DLLM_REFERENCE"
TRUST_ENV = "BENCH_TRUST_REMOTE_CODE"  # "1": a checkpoint's own modeling code may be imported and run
SHIFT_ENV = "BENCH_GSM8K_DLLM_SHIFT"  # 0 (LLaDA, the default) or 1 (Dream)
GEN_LENGTH = 256  # LLaDA's GSM8K response length
BLOCK_LENGTH = 32  # Fast-dLLM's GSM8K block length (8 blocks)
STEPS = GEN_LENGTH  # one token unmasked per step
SMOKE_GEN_LENGTH = 16  # under --budget smoke: 16 positions in 2 blocks of 8, 16 steps


class RemoteCodeRefused(PermissionError):
    """The reference is remote code and `BENCH_TRUST_REMOTE_CODE=1` is not set."""


class MaskIdMissing(ValueError):
    """Neither the model config nor the tokenizer names a mask token."""


def config_dict(source: pretrained.ModelSource) -> dict:
    """The checkpoint's config.json as a plain dict: read without importing any code it names."""
    from transformers import PretrainedConfig

    d, _ = PretrainedConfig.get_config_dict(source.path, revision=source.revision)
    return d


def remote_code(cfg: dict) -> str | None:
    """What a config's `auto_map` would import (e.g. `modeling_llada.LLaDAModelLM`), None for a plain model."""
    auto = cfg.get("auto_map") or {}
    if not auto:
        return None
    return auto.get("AutoModel") or auto.get("AutoModelForCausalLM") or next(iter(auto.values()))


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip() == "1"


def remote_code_problem(source: pretrained.ModelSource, cfg: dict) -> str | None:
    """Why the reference may not be loaded (its own code, not opted in), or None."""
    code = remote_code(cfg)
    if code is None or trusted():
        return None
    return (f"the gsm8k-dllm reference ({source.describe()}, {REFERENCE_ENV}) is remote code: its config.json's "
            f"auto_map names {code}, a Python file shipped with the checkpoint that loading would import and run. "
            f"Read that file, then set {TRUST_ENV}=1 to allow it; or point {REFERENCE_ENV} at a folder of a plain "
            f"transformers model (no auto_map) with a mask_token_id")


def shift() -> int:
    value = os.environ.get(SHIFT_ENV, "").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{SHIFT_ENV}={value} must be 0 (LLaDA: position i predicts token i) or 1 (Dream: "
                         f"position i - 1 predicts token i)")
    return int(value)


def mask_id_of(cfg: dict, tokenizer, where: str) -> int:
    """The [MASK] id: the model config's `mask_token_id`, else the tokenizer's, else refused."""
    value = cfg.get("mask_token_id")
    if value is None:
        value = getattr(tokenizer, "mask_token_id", None)
    if value is None:
        raise MaskIdMissing(f"the gsm8k-dllm reference ({where}) names no mask token: neither its config.json has a "
                            f"mask_token_id nor its tokenizer a mask_token; a masked diffusion LM needs one (LLaDA-8B's"
                            f" config has mask_token_id 126336)")
    return int(value)


def remote_forward(model, x: "torch.Tensor", attention_mask: "torch.Tensor", step: dict) -> "torch.Tensor":
    """One sampler step of a remote-code mask predictor (LLaDA's `LLaDAModelLM`, bidirectional by construction):
    its own forward with the 2-D padding mask, the logits shifted by the model's shift (`tasks._kit.dllm`)."""
    from tasks._kit import dllm

    return dllm.shifted(model(input_ids=x, attention_mask=attention_mask).logits, step.get("shift", 0))


@register_task("gsm8k-dllm", modality="diffusion-lm", tier="full", metric="exact_match", higher_is_better=True,
               version="1", summary="GSM8K via lm-eval's own gsm8k task (5-shot, strict match) answered by "
                                    "LLaDA-8B-Instruct with low-confidence remasking (256 tokens, blocks of 32)")
class GSM8KDLLM(Pretrained, Task, TrainingRows, Tokenizer):
    """Reuses `GSM8K`'s data, lm-eval config and prompts by its functions, without subclassing it: `GSM8K`
    declares Draft, Student and ShiftedPrompts (capabilities are read from the class's MRO, `bench.api.offers`),
    which a diffusion LM with no draft or student does not offer. It declares what `arith-dllm` declares."""

    reference_sha256 = None  # no pinned artifact: the hash of the weights as loaded is recorded

    def __init__(self) -> None:
        self._loaded = False

    # ---- what the task needs ------------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """GSM8K's data (as `gsm8k`), the reference (local, cached or downloadable), the opt-in when the reference
        is remote code, and a valid shift setting."""
        problems = []
        try:
            local = gsm8k.data_folder()
        except GSM8KDataNotFound as e:
            problems.append(str(e))
        else:
            if local is None:
                problems.append(pretrained.dataset_problem(
                    gsm8k.HUB_DATASET, "GSM8K",
                    f"Set {gsm8k.DATA_ENV} to a folder holding {' and '.join(gsm8k.DATA_FILES)} as in the original "
                    f"release (github.com/openai/grade-school-math, grade_school_math/data/)"))
        missing = pretrained.source_problem(REFERENCE_ENV, REFERENCE_ID, "gsm8k-dllm reference")
        problems.append(missing)
        if missing is None:
            source = self.reference_source()
            try:
                problems.append(remote_code_problem(source, config_dict(source)))
            except (OSError, ValueError) as e:
                problems.append(f"could not read the config.json of the gsm8k-dllm reference ({source.describe()}, "
                                f"{REFERENCE_ENV}): {e}")
        try:
            shift()
        except ValueError as e:
            problems.append(str(e))
        return [p for p in problems if p]

    # ---- data (gsm8k's) -----------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        """`GSM8K.load` (lm-eval's config, the test split, the fingerprint, the reference's tokenizer), then the
        reference's config (without its code) for the mask id and whether it is remote code."""
        if self._loaded:
            return
        GSM8K.load(self, ctx)
        try:
            source = self.reference_source()
            self.model_config = config_dict(source)
            self.remote = remote_code(self.model_config) is not None
            self.mask_id = mask_id_of(self.model_config, self.tokenizer, source.describe())
            self.logit_shift = shift()
        except Exception:
            self._loaded = False
            raise

    def data_fingerprint(self) -> str:
        """`gsm8k`'s (lm-eval's config, the data, the tokenizer), with the mask id and the logit shift: besides the
        weights (hashed apart), what the reference's answers depend on, so a cached evaluation follows them."""
        import hashlib

        what = f"{self._fingerprint}\nmask {self.mask_id}\nshift {self.logit_shift}\n"
        return hashlib.sha256(what.encode()).hexdigest()

    training_rows = GSM8K.training_rows
    stop_rule = GSM8K.stop_rule
    eval_limit = GSM8K.eval_limit
    workload_contexts = GSM8K.workload_contexts

    # ---- models -------------------------------------------------------------------------------------------
    def reference_source(self) -> pretrained.ModelSource:
        return pretrained.model_source(REFERENCE_ENV, REFERENCE_ID)

    def _auto(self):
        """(the transformers Auto class, keyword arguments) that load this reference; refused for remote code
        without the opt-in."""
        from transformers import AutoModel, AutoModelForCausalLM

        source = self.reference_source()
        why = remote_code_problem(source, self.model_config)
        if why:
            raise RemoteCodeRefused(why)
        if not self.remote:
            return AutoModelForCausalLM, {}
        auto = self.model_config.get("auto_map") or {}
        return (AutoModel if "AutoModel" in auto else AutoModelForCausalLM), {"trust_remote_code": True}

    def build_reference(self):
        from transformers import AutoConfig

        cls, kwargs = self._auto()
        src = self.reference_source()
        return cls.from_config(AutoConfig.from_pretrained(src.path, revision=src.revision, **kwargs), **kwargs)

    def train_reference(self, ctx: RunContext) -> dict:
        """A published checkpoint is not trained here: the reference's weights are the loaded ones."""
        return self.reference_weights(ctx).state

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        src = self.reference_source()
        cls, kwargs = self._auto()
        with ctx.progress.step(f"Loading the gsm8k-dllm reference from {src.describe()}"):
            model = pretrained.load_model(cls, src, "gsm8k-dllm reference", **kwargs)
        return self.keep(model, src)

    def sampling(self, ctx: RunContext):
        """The reference's sampler settings (smaller under --budget smoke)."""
        from tasks._kit.dllm import Sampling

        n = ctx.budget.pick(GEN_LENGTH, SMOKE_GEN_LENGTH)
        return Sampling(gen_length=n, steps=ctx.budget.pick(STEPS, SMOKE_GEN_LENGTH),
                        block_length=ctx.budget.pick(BLOCK_LENGTH, SMOKE_GEN_LENGTH // 2))

    def prepare(self, model, ctx: RunContext) -> Subject:
        from tasks._kit import dllm

        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        try:
            rows = model.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):
            rows = None
        if rows is not None and not 0 <= self.mask_id < rows:
            raise MaskIdMissing(f"the gsm8k-dllm reference's mask id {self.mask_id} is outside its {rows} embedding "
                                f"rows ({self.reference_source().describe()})")
        if getattr(model.config, "max_position_embeddings", None) is None:
            # lm-eval's HFLM sizes the context by max_position_embeddings; LLaDA's config calls it max_sequence_length
            model.config.max_position_embeddings = getattr(model.config, "max_sequence_length", None) or 4096
        extra = {"tokenizer": self.tokenizer, "stop": self.stop_rule(model), "mask_id": self.mask_id,
                 "shift": self.logit_shift, "sampling": self.sampling(ctx), "generate": dllm.generate_hook()}
        if self.remote:
            extra["forward"] = remote_forward
        return Subject(model, self.spec.modality, extra)

    # ---- measurement --------------------------------------------------------------------------------------
    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        from tasks._kit import lm_harness

        r = lm_harness.evaluate(subject, None, gsm8k.LM_EVAL_TASK, limit=self.eval_limit(ctx), config=self.config,
                                batch_size=1)
        self.last_harness = r
        flexible = r.raw.get("exact_match,flexible-extract", float("nan"))
        ctx.progress.log(f"lm-eval gsm8k exact match ({lm_harness.FILTER}) {r.value:.4f} ± {r.stderr:.4f}, "
                         f"flexible-extract {flexible:.4f}, n = {len(r.per_example)}")
        outputs = answers.padded(r.generated, gsm8k.MAX_GEN_TOKS)
        return Evaluation(r.value, r.per_example, outputs, contexts=r.context_ids)

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return answers.identical_answer_tokens(reference, method)

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        from tasks._kit import dllm

        prompts = self.workload_contexts(ctx)
        run, calls = dllm.step_workload(subject, prompts, ctx.device, gsm8k.MAX_GEN_TOKS)
        return run, calls, (f"seconds to answer lm-eval's 5-shot prompts of {len(prompts)} test problems one at "
                            f"a time ({calls} sampler steps, each one network call; items are steps)")
