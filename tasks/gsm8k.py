"""`gsm8k`: GSM8K (Cobbe et al., 2021) through lm-eval's own `gsm8k` task; Qwen2.5-1.5B-Instruct reference and
Qwen2.5-0.5B-Instruct draft.

A *full* task: it runs for real where the machine can download the models and the data (use a GPU profile,
e.g. `bench run --method speculative --task gsm8k --profile a100-bf16`); its loading code is tested offline on
fixture files in the real formats with tiny random models (tests/tasks/test_gsm8k.py).

Task definition: lm-eval's `gsm8k.yaml`, taken unchanged from lm-eval's default task registry
(`TaskManager().task_index["gsm8k"]`, read with lm-eval's own YAML loader): 5-shot, few-shot examples drawn
from the train split with lm-eval's few-shot seed (1234), `Question: ...\\nAnswer:` prompts, greedy generation
until `Question:`, `</s>` or `<|im_end|>` (at most 256 tokens, HFLM's default), exact match after its
normalisation. Quality is the `strict-match` filter (the number after `#### `); the `flexible-extract` value
(last number in the response) is logged beside it. No chat template is applied (lm-eval's default).

Data: the hub's `openai/gsm8k`, config `main` (train 7,473 / test 1,319), as lm-eval defines it, downloaded by
`datasets` on first use. Offline, `BENCH_GSM8K_DATA=<folder>` replaces the *dataset source only*: the folder
holds `train.jsonl` and `test.jsonl` as in the original release (github.com/openai/grade-school-math,
`grade_school_math/data/`: one JSON object a line with `question` and `answer`, the answer ending
`#### <n>`), and lm-eval's config gets `dataset_path: json`, `dataset_name: null` and
`dataset_kwargs: {data_files: {train: .../train.jsonl, test: .../test.jsonl}}`; every other key is lm-eval's.

Models (`tasks._kit.pretrained`): `BENCH_GSM8K_REFERENCE` (default `Qwen/Qwen2.5-1.5B-Instruct`) and
`BENCH_GSM8K_DRAFT` (default `Qwen/Qwen2.5-0.5B-Instruct`), each a local Hugging Face folder or a hub id
(`org/name@revision` pins one). The tokenizer is the reference's; the draft must have the same vocabulary
(the two Qwen2.5 models share one tokenizer; checked when the draft loads). `reference_canonical` is False and
`reference_sha256` is the hash of the weights as loaded: no hub revision is pinned by default, because none
could be checked where this was written; the result's reference source names the commit the hub resolved.

Decoding: greedy, as lm-eval's `do_sample: false` asks. The checkpoint's generation_config (Qwen2.5-Instruct's
samples at temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05, which `generate` would apply even to
greedy search) is replaced by a plain greedy one, so every decoding method can reproduce the reference's
procedure exactly. Generation goes through `tasks._kit.lm.generate_ids` (the hook decoding methods set), both in
lm-eval (`tasks._kit.lm_harness`, HFLM over the subject) and in the timed workload. One stopping rule holds for
both arms (`tasks._kit.lm.StopRule`, the subject's `extra["stop"]`): lm-eval's `until` (`Question:`, `</s>`,
`<|im_end|>`, and the tokenizer's decoded EOS that HFLM appends) tested as lm-eval's own criteria test them, and
every end-of-sequence id of the checkpoint (Qwen2.5-Instruct's generation_config lists `<|im_end|>` and
`<|endoftext|>`; the plain greedy config keeps both). A method's procedure is cut there (and a method that reads
the rule, as speculative decoding does, stops there), so its responses end exactly where the reference's do.

Evaluation size: all 1,319 test problems on a GPU profile; the first `CPU_EVAL_SIZE` on the CPU profile; the
first `SMOKE_EVAL_SIZE` under `--budget smoke`. Fidelity: the share of problems whose response (lm-eval's,
after the stop-string cut) is identical to the reference's. Workload: greedy generation (until the stopping rule,
or 256 tokens; 16 under `--budget smoke`) for lm-eval's own 5-shot contexts of the first `WORKLOAD_SIZE` test problems, at the
profile's causal-LM batch size (1 on every profile); items are generated tokens. The reference's lm-eval
evaluation batches at the profile's evaluation batch (`ctx.eval_batch_size`); a method's procedure runs at 1.

Estimated cost on one H100 in bf16 (not measured: no GPU or download here): HF `generate` at batch 1 runs a
1.5 B model at roughly 30-50 tokens/s, so a full evaluation (~1,319 x 150 tokens) takes about 1-2 hours per
arm (the reference's is cached; batched evaluation makes it shorter).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.api import Draft, ShiftedPrompts, Student, Tokenizer, TrainingRows
from bench.registry import register_task
from tasks._kit import pretrained
from tasks.base import Evaluation, ReferenceWeights, RunContext, Subject, Task
from tasks._kit.pretrained import Pretrained

if TYPE_CHECKING:
    import torch

LM_EVAL_TASK = "gsm8k"  # the name in lm-eval's default task registry
HUB_DATASET = "openai/gsm8k"  # lm-eval's gsm8k.yaml dataset_path (the data source unless BENCH_GSM8K_DATA is set)
REFERENCE_ID = "Qwen/Qwen2.5-1.5B-Instruct"
DRAFT_ID = "Qwen/Qwen2.5-0.5B-Instruct"
DATA_ENV, REFERENCE_ENV, DRAFT_ENV = "BENCH_GSM8K_DATA", "BENCH_GSM8K_REFERENCE", "BENCH_GSM8K_DRAFT"
DATA_SOURCE_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs")  # all that BENCH_GSM8K_DATA replaces
DATA_FILES = ("train.jsonl", "test.jsonl")  # the original release's names (openai/grade-school-math)
FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed (lm_eval.defaults), used by evaluate()
MAX_GEN_TOKS = 256  # HFLM's default max_gen_toks (lm-eval's gsm8k.yaml sets none)
CPU_EVAL_SIZE = 100  # test problems scored on a CPU profile (a full pass of a 1.5 B model is days there)
SMOKE_EVAL_SIZE = 3  # under --budget smoke
WORKLOAD_SIZE = 4  # test problems generated per timed call
SMOKE_WORKLOAD_SIZE = 1
SMOKE_GEN_TOKS = 16  # the workload's generation length under --budget smoke (it checks that timing runs)


class GSM8KDataNotFound(FileNotFoundError):
    """`BENCH_GSM8K_DATA` names a folder without the GSM8K files."""


def data_folder() -> Path | None:
    """The local GSM8K folder when `BENCH_GSM8K_DATA` is set (checked); None means the hub's openai/gsm8k."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser().resolve()
    missing = [f for f in DATA_FILES if not (folder / f).is_file()]
    if missing:
        where = f"no folder {folder}" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
        raise GSM8KDataNotFound(
            f"GSM8K data not found: {where} ({DATA_ENV}={value}). The folder must hold {' and '.join(DATA_FILES)} "
            f"as in the original release (github.com/openai/grade-school-math, grade_school_math/data/): one JSON "
            f"object a line with \"question\" and \"answer\". Unset {DATA_ENV} to read the hub's openai/gsm8k.")
    return folder


def lm_eval_config(folder: Path | None) -> dict:
    """lm-eval's own gsm8k task config, from its default registry; with `folder`, only the dataset source
    (dataset_path, dataset_name, dataset_kwargs) is replaced by the local JSON lines."""
    from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval's own TaskFactory reads a task YAML with

    cfg = load_yaml(lm_eval_yaml(), resolve_func=True)
    if folder is not None:
        cfg.update(dataset_path="json", dataset_name=None,
                   dataset_kwargs={"data_files": {"train": str(folder / "train.jsonl"),
                                                  "test": str(folder / "test.jsonl")},
                                   "cache_dir": str(_datasets_cache())})
    return cfg


@functools.lru_cache(maxsize=1)
def lm_eval_yaml() -> Path:
    """The YAML file of `gsm8k` in lm-eval's default task registry (indexing the registry takes seconds, so
    once a process)."""
    from lm_eval.tasks import TaskManager

    return Path(TaskManager().task_index[LM_EVAL_TASK].yaml_path)


def _datasets_cache() -> Path:
    from bench import cache

    return cache.cache_dir() / "tasks" / "gsm8k" / "hf-datasets"


def build_lm_eval_task(cfg: dict):
    """The lm-eval Task object for `cfg` (downloads the data on first use)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load([cfg])["tasks"][LM_EVAL_TASK]


def greedy(model, tok, eos_ids=None) -> None:
    """Replace the checkpoint's generation settings by plain greedy decoding (see the module docstring), keeping
    every end-of-sequence id it declares (`eos_ids`, default `lm.checkpoint_eos_ids`)."""
    from transformers import GenerationConfig

    from tasks._kit import lm

    eos = list(lm.checkpoint_eos_ids(model, tok) if eos_ids is None else eos_ids)
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=eos if len(eos) > 1 else eos[0],
                                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)


@register_task("gsm8k", modality="causal-lm", tier="full", metric="exact_match", higher_is_better=True,
               version="2", summary="GSM8K via lm-eval's own gsm8k task (5-shot, strict match); "
                                    "Qwen2.5-1.5B-Instruct reference, Qwen2.5-0.5B-Instruct draft")
class GSM8K(Pretrained, Task, TrainingRows, Draft, Student, Tokenizer, ShiftedPrompts):
    reference_sha256 = None  # no pinned artifact: the hash of the weights as loaded is recorded

    def __init__(self) -> None:
        self._loaded = False

    # ---- what the task needs -----------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """The data (`BENCH_GSM8K_DATA`, else the hub's openai/gsm8k), the reference, and the draft when the
        method reads it (as a draft, or as the architecture of a student): local, cached or downloadable."""
        problems = []
        try:
            local = data_folder()
        except GSM8KDataNotFound as e:
            problems.append(str(e))
        else:
            if local is None:
                problems.append(pretrained.dataset_problem(
                    HUB_DATASET, "GSM8K",
                    f"Set {DATA_ENV} to a folder holding {' and '.join(DATA_FILES)} as in the original release "
                    f"(github.com/openai/grade-school-math, grade_school_math/data/)"))
        problems.append(pretrained.source_problem(REFERENCE_ENV, REFERENCE_ID, "gsm8k reference"))
        if uses & {Draft, Student}:
            problems.append(pretrained.source_problem(DRAFT_ENV, DRAFT_ID, "gsm8k draft"))
        return [p for p in problems if p]

    # ---- data ---------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        self.config = lm_eval_config(data_folder())
        task = build_lm_eval_task(self.config)
        for split in ("train", "test"):
            missing = {"question", "answer"} - set(task.dataset[split].column_names)
            if missing:
                raise GSM8KDataNotFound(f"GSM8K {split} split lacks the column(s) {', '.join(sorted(missing))} "
                                        f"(source: {self.config['dataset_path']})")
        self.test = [{"question": r["question"], "answer": r["answer"]} for r in task.dataset["test"]]
        # lm-eval's task definition (all but the data source, whose local paths say nothing of the content)
        h = hashlib.sha256(json.dumps({k: v for k, v in self.config.items() if k not in DATA_SOURCE_KEYS},
                                      sort_keys=True, default=str).encode() + b"\n")
        for split in ("test", "train"):  # the few-shot examples come from train
            for r in task.dataset[split]:
                h.update(json.dumps([split, r["question"], r["answer"]]).encode() + b"\n")
        self.tokenizer = pretrained.load_tokenizer(self.reference_source(), "reference")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()
        h.update(hashlib.sha256(vocab).hexdigest().encode())  # the tokenizer changes the prompts' tokens
        self._fingerprint = h.hexdigest()
        self._loaded = True

    def data_fingerprint(self) -> str:
        return self._fingerprint

    # ---- models -------------------------------------------------------------------------------------------
    def reference_source(self) -> pretrained.ModelSource:
        return pretrained.model_source(REFERENCE_ENV, REFERENCE_ID)

    def draft_source(self) -> pretrained.ModelSource:
        return pretrained.model_source(DRAFT_ENV, DRAFT_ID)

    student_recipe = None  # an LM student trains under the distillation method's own schedule (LMDistillConfig)

    def training_rows(self) -> list[dict]:
        """lm-eval's own train split of its gsm8k task, as {"question", "answer"} rows (TrainingRows)."""
        return [{"question": r["question"], "answer": r["answer"]}
                for r in build_lm_eval_task(self.config).dataset["train"]]

    def build_student(self):
        """The draft's architecture, untrained (Student): what an LM student trained from scratch starts as."""
        from transformers import AutoConfig, AutoModelForCausalLM

        import torch

        src = self.draft_source()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src.path, revision=src.revision))

    def build_reference(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        src = self.reference_source()
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src.path, revision=src.revision))

    def train_reference(self, ctx: RunContext) -> dict:
        """A published checkpoint is not trained here: the reference's weights are the loaded ones."""
        return self.reference_weights(ctx).state

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        from transformers import AutoModelForCausalLM

        src = self.reference_source()
        with ctx.progress.step(f"Loading the gsm8k reference from {src.describe()}"):
            model = pretrained.load_model(AutoModelForCausalLM, src, "gsm8k reference")
        return self.keep(model, src)

    def draft_subject(self, ctx: RunContext) -> Subject:
        """The draft model as a subject (speculative decoding), checked to share the reference's vocabulary."""
        from transformers import AutoModelForCausalLM

        src = self.draft_source()
        tok = pretrained.load_tokenizer(src, "draft")
        if tok.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"the gsm8k draft ({src.describe()}, {DRAFT_ENV}) has a different vocabulary from "
                             f"the reference ({self.reference_source().describe()}, {REFERENCE_ENV}): a draft "
                             f"must share the reference's tokenizer")
        model = pretrained.load_model(AutoModelForCausalLM, src, "gsm8k draft")
        if model.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(f"the gsm8k draft ({src.describe()}) embeds {model.get_input_embeddings().num_embeddings}"
                             f" tokens, fewer than the tokenizer's {len(self.tokenizer)}")
        return self.prepare(model, ctx)

    def stop_rule(self, model):
        """Both arms' stopping rule: lm-eval's `until` of this task and every end-of-sequence id of `model`."""
        from tasks._kit import lm

        until = (self.config.get("generation_kwargs") or {}).get("until") or []
        return lm.StopRule.build(self.tokenizer, [until] if isinstance(until, str) else until,
                                 lm.checkpoint_eos_ids(model, self.tokenizer))

    def prepare(self, model, ctx: RunContext) -> Subject:
        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        rule = self.stop_rule(model)  # before greedy() replaces the checkpoint's generation_config
        greedy(model, self.tokenizer, rule.eos_ids)
        return Subject(model, self.spec.modality, {"tokenizer": self.tokenizer, "stop": rule})

    # ---- measurement --------------------------------------------------------------------------------------
    def eval_limit(self, ctx: RunContext) -> int | None:
        if ctx.budget.smoke:
            return SMOKE_EVAL_SIZE
        return None if ctx.device == "cuda" else CPU_EVAL_SIZE

    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        import numpy as np

        from tasks._kit import lm_harness

        r = lm_harness.evaluate(subject, None, LM_EVAL_TASK, limit=self.eval_limit(ctx), config=self.config,
                                batch_size=ctx.eval_batch_size)
        self.last_harness = r
        flexible = r.raw.get("exact_match,flexible-extract", float("nan"))
        ctx.progress.log(f"lm-eval gsm8k exact match ({lm_harness.FILTER}) {r.value:.4f} ± {r.stderr:.4f} "
                         f"(lm-eval's stderr), flexible-extract {flexible:.4f}, n = {len(r.per_example)}")
        assert abs(r.per_example.mean() - r.value) < 1e-9, (r.per_example.mean(), r.value)
        return Evaluation(r.value, r.per_example, np.asarray(r.texts, dtype=str))

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        import numpy as np

        same = np.asarray(reference.outputs) == np.asarray(method.outputs)
        return "identical_responses", float(same.mean())

    def workload_contexts(self, ctx: RunContext) -> list[str]:
        """lm-eval's own prompts (5-shot contexts) of the first test problems, as `evaluate` builds them."""
        n = ctx.budget.pick(WORKLOAD_SIZE, SMOKE_WORKLOAD_SIZE)
        task = build_lm_eval_task(self.config)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        task.build_all_requests(limit=n, rank=0, world_size=1)
        return [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]

    shift = ("templated synthetic problems (arith's long chains of 4-6 operations, `tasks.arith_data.shifted`) "
             "in lm-eval's 5-shot gsm8k prompt, where the test problems are GSM8K's own")

    def shifted_prompts(self, n: int, seed: int) -> list[str]:
        """lm-eval's 5-shot gsm8k contexts (few-shot examples from the train split, lm-eval's few-shot seed) of
        `n` synthetic long-chain problems (ShiftedPrompts): a shift in style and step count from GSM8K's."""
        from tasks import arith_data

        task = build_lm_eval_task(self.config)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        shots = task.config.num_fewshot or 0
        return [task.fewshot_context({"question": p["question"], "answer": p["answer"]}, shots)
                for p in arith_data.shifted(n, seed)]

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        import torch

        from tasks._kit import lm

        tok = subject.extra["tokenizer"]
        prompts = self.workload_contexts(ctx)
        bs, most = ctx.batch_size, ctx.budget.pick(MAX_GEN_TOKS, SMOKE_GEN_TOKS)
        side, tok.padding_side = tok.padding_side, "left"
        batches = [tok(prompts[i:i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
                   for i in range(0, len(prompts), bs)]
        tok.padding_side = side
        batches = [(b["input_ids"].to(ctx.device), b["attention_mask"].to(ctx.device)) for b in batches]

        def run() -> list["torch.Tensor"]:
            with torch.inference_mode():
                return [lm.generate_ids(subject, ids, most, mask) for ids, mask in batches]

        outs = run()  # once, to count what it generates (and as a warm-up)
        rule = lm.stop_rule(subject)
        tokens = sum(len(lm.completion_tokens(out[r:r + 1], ids.shape[1], tok.eos_token_id, rule))
                     for out, (ids, _) in zip(outs, batches) for r in range(out.shape[0]))
        return run, tokens, (f"seconds to generate greedy continuations (until lm-eval's stop strings or an "
                             f"end-of-sequence id, at most {most} tokens) of "
                             f"lm-eval's 5-shot prompts for {len(prompts)} test problems at batch {bs} "
                             f"({tokens} generated tokens; items are tokens)")

