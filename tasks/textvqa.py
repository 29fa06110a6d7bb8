"""`textvqa`: TextVQA (Singh et al. 2019) validation questions answered by LLaVA-1.5-7B (Liu et al. 2024), scored by
VQA accuracy: the full-task path of the visual-token methods (`vtw`, `fastv`), as `digits-vlm` is the embedded one.

A *full* task: it runs for real where the machine can download the model and the data (`bench run --method fastv
--task textvqa --profile h100-bf16`); its loading code is tested offline on parquet fixture files in the real
layout and a tiny random LLaVA with its own processor (tests/tasks/test_textvqa.py).

Why TextVQA: it is one of the VQA sets LLaVA-1.5 reports (its TextVQA is this validation split, 5,000 questions
on 3,166 images, with public answers, so the score is computed here rather than by an evaluation server, unlike
VQAv2's test-dev), and its questions are about text in the image, so they need the visual tokens: a method that
drops them cannot answer from the question alone. VQAv2's validation split (214k questions) would take a day per
arm on one GPU.

Data: the hub's `lmms-lab/textvqa` (the copy lmms-eval evaluates), read by `datasets` from its parquet files
only: `data/validation-*.parquet` (the evaluated split) and the first training shard
`data/train-00000-of-00020.parquet` (about 1,700 questions: calibration, never evaluated), so the 6 GB training
split and the answer-less test split are not downloaded. Columns read: `question_id`, `question`, `image`,
`answers` (ten human answers) and, with OCR, `ocr_tokens`. Offline, `BENCH_TEXTVQA_DATA=<folder>` reads the
same files from a local copy in the hub's layout (`<folder>/data/validation-*.parquet`, `<folder>/data/train-*
.parquet`, the first training file in name order used); get it once with `hf download lmms-lab/textvqa --repo-type
dataset --include "data/validation-*" "data/train-00000-*" --local-dir <folder>`.

Prompt: LLaVA-1.5's short-answer prompt in its conversation format (vicuna_v1, as llava-hf's model card writes
it): `USER: <image>\\n{question}\\nAnswer the question using a single word or phrase. ASSISTANT:`, the question as
in the data (lmms-eval capitalises it; LLaVA's evaluation does not). The processor (`AutoProcessor` of the
reference folder: `LlavaProcessor`, CLIP's resize to 336 on the short side and centre crop; LLaVA's own
evaluation pads to a square instead) expands `<image>` to the image's visual tokens: 576 for LLaVA-1.5 (24 x 24
patches of 14 pixels, CLS dropped), checked against the model config's `image_seq_length`. LLaVA-1.5's
published TextVQA number (58.2 for 7B) gives the model the image's OCR tokens in the prompt (`\\nReference OCR
token: a, b, ...` after the question); `BENCH_TEXTVQA_OCR=1` does the same. The default is without them: with
the OCR tokens in the prompt, a model can answer from the text alone, which would hide what dropping visual
tokens costs (and the score is lower than 58.2 without them).

Reference: `BENCH_TEXTVQA_REFERENCE` (default `llava-hf/llava-1.5-7b-hf`, transformers' conversion of
liuhaotian/llava-v1.5-7b; a local Hugging Face folder or a hub id, `org/name@revision` pins one;
`tasks._kit.pretrained`) loaded as `LlavaForConditionalGeneration` with its processor, hashed as loaded
(`reference_canonical` False). Greedy decoding (the checkpoint's generation_config replaced by plain greedy, as
`gsm8k`), at most `MAX_NEW_TOKENS` new tokens (LLaVA's evaluation allows 128; a short answer ends with `</s>`
within a few), stopping at the checkpoint's end-of-sequence ids.

Quality: VQA accuracy (`tasks._kit.vlm.vqa_accuracy`: min(#annotators who gave the answer / 3, 1) averaged over
the ten leave-one-out subsets, after the EvalAI answer normalisation, the metric of TextVQA's evaluation server and
of LLaVA's `eval_textvqa`), over all 5,000 validation questions on a GPU profile, the first `CPU_EVAL_SIZE` on a
CPU profile, `SMOKE_EVAL_SIZE` under `--budget smoke`; one question at a time (batch 1, as `digits-vlm`: a
token-dropping method prunes each sequence by its own attention). Fidelity: the share of questions whose answer
tokens equal the reference's. Workload: prefill and answer the first `WORKLOAD_SIZE` validation questions one at
a time; items are questions.

The subject's extra is `VisionLanguageExtra` (bench/api.py), filled as `digits-vlm` fills it: `image_token_id`
and `tokens_per_image` from the processor (checked against the model config), `num_layers` the decoder's layers
(32), the stop rule, the tokenizer, and `calibration(n, seed)`: n questions of the first training shard as
(input_ids, pixel_values). A method's `generate` hook replaces LLaVA's `generate` (`tasks._kit.vlm.answer_ids`).

Estimated cost on one H100 in bf16 (NOT measured: no GPU or download where this was written): a prompt is about
620 tokens (576 visual), one prefill of 7 B parameters is about 2 x 7e9 x 620 = 8.7e12 FLOPs (20-30 ms), and an
answer is a few tokens, so about 0.1 s a question and 10 minutes per arm for the 5,000 questions; the weights take
14 GB in bf16.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.registry import register_task
from tasks._kit import answers, pretrained
from tasks._kit.pretrained import Pretrained
from tasks._kit.vlm import answer_ids, vqa_accuracy
from tasks.base import Evaluation, ReferenceWeights, RunContext, Subject, Task

if TYPE_CHECKING:
    import torch

HUB_DATASET = "lmms-lab/textvqa"
EVAL_FILES = "data/validation-*.parquet"  # the hub repository's layout (and BENCH_TEXTVQA_DATA's)
CALIBRATION_FILES = "data/train-*.parquet"  # the first of them in name order: data/train-00000-of-00020.parquet
REFERENCE_ID = "llava-hf/llava-1.5-7b-hf"
DATA_ENV, REFERENCE_ENV, OCR_ENV = "BENCH_TEXTVQA_DATA", "BENCH_TEXTVQA_REFERENCE", "BENCH_TEXTVQA_OCR"
PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
OCR_LINE = "\nReference OCR token: {tokens}"  # LLaVA-1.5's TextVQA question file (llava_textvqa_val_v051_ocr)
COLUMNS = ("question_id", "question", "image", "answers")
MAX_NEW_TOKENS = 32  # a word or a phrase and </s>
CPU_EVAL_SIZE = 50  # validation questions scored on a CPU profile (a 7 B prefill of 620 tokens is seconds there)
SMOKE_EVAL_SIZE = 4
WORKLOAD_SIZE = 8  # validation questions answered per timed call
SMOKE_WORKLOAD_SIZE = 2
SMOKE_NEW_TOKENS = 8
DATA_VERSION = "1"  # bump when the prompt or the data reading changes


class TextVQADataNotFound(FileNotFoundError):
    """`BENCH_TEXTVQA_DATA` names a folder without the parquet files."""


class TextVQADataError(ValueError):
    """The data lacks a column the task reads, or a question has no answers."""


class NotALlava(ValueError):
    """The reference is not a LLaVA checkpoint, or its processor and config disagree about the image tokens."""


def data_folder() -> Path | None:
    """The local copy when `BENCH_TEXTVQA_DATA` is set (checked); None means the hub's lmms-lab/textvqa."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser().resolve()
    missing = [p for p in (EVAL_FILES, CALIBRATION_FILES) if not sorted(folder.glob(p))]
    if missing:
        where = f"no folder {folder}" if not folder.is_dir() else f"{folder} has no {' and no '.join(missing)}"
        raise TextVQADataNotFound(
            f"TextVQA data not found: {where} ({DATA_ENV}={value}). {DATA_ENV} must hold the hub dataset "
            f"{HUB_DATASET} in its own layout ({EVAL_FILES}, {CALIBRATION_FILES}); get it with\n  hf download "
            f"{HUB_DATASET} --repo-type dataset --include \"data/validation-*\" \"data/train-00000-*\" --local-dir "
            f"{folder}\nor unset {DATA_ENV} to read it from the hub.")
    return folder


def load_split(split: str):
    """The validation split, or ("train") the first training file, as a `datasets.Dataset`."""
    import datasets

    from bench import cache

    folder = data_folder()
    pattern = EVAL_FILES if split == "validation" else CALIBRATION_FILES
    if folder is None:
        files = pattern if split == "validation" else "data/train-00000-of-00020.parquet"
        ds = datasets.load_dataset(HUB_DATASET, data_files={split: files}, split=split)
        where = f"{HUB_DATASET} ({files})"
    else:
        found = sorted(folder.glob(pattern))
        files = [str(f) for f in (found if split == "validation" else found[:1])]
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split,
                                   cache_dir=str(cache.cache_dir() / "tasks" / "textvqa" / "hf-datasets"))
        where = ", ".join(files)
    need = COLUMNS + (("ocr_tokens",) if ocr() else ())
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise TextVQADataError(f"TextVQA data from {where} lacks the column(s) {', '.join(missing)}: expected "
                               f"{', '.join(need)} (the columns of {HUB_DATASET})")
    return ds


def ocr() -> bool:
    value = os.environ.get(OCR_ENV, "").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{OCR_ENV}={value} must be 0 (the default: no OCR tokens in the prompt) or 1 (LLaVA-1.5's "
                         f"TextVQA setting: the image's OCR tokens after the question)")
    return value == "1"


def prompt_of(row: dict, with_ocr: bool) -> str:
    question = row["question"]
    if with_ocr:
        question += OCR_LINE.format(tokens=", ".join(row["ocr_tokens"] or []))
    return PROMPT.format(question=question)


@register_task("textvqa", modality="vision-language", tier="full", metric="vqa_accuracy", higher_is_better=True,
               version="1", summary="TextVQA validation (5,000 questions about text in images) answered by "
                                    "LLaVA-1.5-7B (576 visual tokens an image); VQA accuracy")
class TextVQA(Pretrained, Task):
    """Declares what `digits-vlm` declares (no capability beyond the subject's extra)."""

    reference_sha256 = None  # no pinned artifact: the hash of the weights as loaded is recorded

    def __init__(self) -> None:
        self._loaded = False

    # ---- what the task needs ------------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """The data (a local copy, or the hub reachable or cached), the reference (a folder with a LLaVA config
        and its processor, or a hub id the hub serves or the cache holds), and a valid OCR setting."""
        problems = []
        try:
            local = data_folder()
        except TextVQADataNotFound as e:
            problems.append(str(e))
        else:
            if local is None:
                problems.append(pretrained.dataset_problem(
                    HUB_DATASET, "TextVQA", f"Set {DATA_ENV} to a folder holding {EVAL_FILES} and {CALIBRATION_FILES}"
                                            f" as in the hub's {HUB_DATASET}"))
        missing = pretrained.source_problem(REFERENCE_ENV, REFERENCE_ID, "textvqa reference")
        problems.append(missing)
        if missing is None:
            source = self.reference_source()
            if source.local:
                problems.append(local_reference_problem(Path(source.path)))
        try:
            ocr()
        except ValueError as e:
            problems.append(str(e))
        return [p for p in problems if p]

    # ---- data ---------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        """The validation split and the calibration shard (images decoded on use), the reference's processor and
        config (no weights), and the image-token layout they agree on."""
        if self._loaded:
            return
        self.with_ocr = ocr()
        self.val = load_split("validation")
        self.calib = load_split("train")
        source = self.reference_source()
        self.processor = load_processor(source)
        self.tokenizer = self.processor.tokenizer
        self.model_config = load_config(source)
        self.image_token_id, self.tokens_per_image = image_layout(self.processor, self.model_config,
                                                                  source.describe())
        self._fingerprint = self._hash()
        self._loaded = True

    def _hash(self) -> str:
        """sha256 of what the reference's answers and their scores depend on, besides the weights: the evaluated
        questions, their answers and image bytes, the prompt, and the processor (tokenizer and image settings)."""
        import json

        from datasets import Image

        h = hashlib.sha256(f"{DATA_VERSION}\n{PROMPT}\nocr {self.with_ocr}\n".encode())
        h.update(self.processor.image_processor.to_json_string().encode())
        h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        raw = self.val.cast_column("image", Image(decode=False))
        for row in raw:
            h.update(json.dumps([row["question_id"], prompt_of(row, self.with_ocr), row["answers"]]).encode())
            h.update(hashlib.sha256(row["image"]["bytes"] or b"").digest())
        return h.hexdigest()

    def data_fingerprint(self) -> str:
        return self._fingerprint

    def inputs(self, row: dict, device="cpu", dtype=None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(input_ids 1 x L, pixel_values 1 x 3 x H x W) of one question: the processor on the prompt and the
        image (RGB; some TextVQA images are greyscale), `<image>` expanded to `tokens_per_image` image tokens."""
        enc = self.processor(images=row["image"].convert("RGB"), text=prompt_of(row, self.with_ocr),
                             return_tensors="pt")
        pix = enc["pixel_values"].to(device)
        return enc["input_ids"].to(device), pix if dtype is None else pix.to(dtype)

    def eval_size(self, ctx: RunContext) -> int:
        if ctx.budget.smoke:
            return min(SMOKE_EVAL_SIZE, len(self.val))
        return len(self.val) if ctx.device == "cuda" else min(CPU_EVAL_SIZE, len(self.val))

    # ---- models -------------------------------------------------------------------------------------------
    def reference_source(self) -> pretrained.ModelSource:
        return pretrained.model_source(REFERENCE_ENV, REFERENCE_ID)

    def build_reference(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration(load_config(self.reference_source()))

    def train_reference(self, ctx: RunContext) -> dict:
        """A published checkpoint is not trained here: the reference's weights are the loaded ones."""
        return self.reference_weights(ctx).state

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        from transformers import LlavaForConditionalGeneration

        src = self.reference_source()
        with ctx.progress.step(f"Loading the textvqa reference from {src.describe()}"):
            model = pretrained.load_model(LlavaForConditionalGeneration, src, "textvqa reference")
        return self.keep(model, src)

    def prepare(self, model, ctx: RunContext) -> Subject:
        from tasks._kit import lm
        from tasks.gsm8k import greedy

        if self.tokenizer.pad_token_id is None:  # the stop rule pads a row after its stop
            raise NotALlava(f"the textvqa reference's tokenizer ({self.reference_source().describe()}) has no pad "
                            f"token; llava-hf's checkpoints add <pad>")
        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        eos = lm.checkpoint_eos_ids(model, self.tokenizer)
        rule = lm.StopRule.build(self.tokenizer, (), eos)  # LLaVA's evaluation stops at </s> only
        greedy(model, self.tokenizer, eos)

        def calibration(n: int, seed: int) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
            import random

            rows = sorted(random.Random(seed).sample(range(len(self.calib)), min(n, len(self.calib))))
            return [self.inputs(self.calib[i], ctx.device, ctx.torch_dtype) for i in rows]

        return Subject(model, self.spec.modality, {
            "tokenizer": self.tokenizer, "stop": rule, "image_token_id": self.image_token_id,
            "tokens_per_image": self.tokens_per_image, "num_layers": model.config.text_config.num_hidden_layers,
            "calibration": calibration})

    # ---- measurement --------------------------------------------------------------------------------------
    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        """Greedy answers to the first `eval_size` validation questions, one at a time, scored by VQA accuracy."""
        import numpy as np
        import torch

        tok, rule = subject.extra["tokenizer"], subject.extra["stop"]
        n, new = self.eval_size(ctx), ctx.budget.pick(MAX_NEW_TOKENS, SMOKE_NEW_TOKENS)
        rows: list[list[int]] = []  # answer tokens, padded into the evaluation's outputs
        scores, exact = np.zeros(n), np.zeros(n)
        with torch.inference_mode(), ctx.progress.step("Answering TextVQA validation questions", total=n) as advance:
            for i in range(n):
                row = self.val[i]
                ids, pix = self.inputs(row, ctx.device, ctx.torch_dtype)
                out = rule.cut(answer_ids(subject, ids, pix, new)[0, ids.shape[1]:].tolist())
                rows.append(out)
                text = tok.decode([t for t in out if t not in rule.eos_ids], skip_special_tokens=True).strip()
                scores[i] = vqa_accuracy(text, list(row["answers"]))
                exact[i] = float(scores[i] == 1.0)
                advance(1)
        ctx.progress.log(f"textvqa VQA accuracy {scores.mean():.4f}, n = {n}")
        # no `contexts`: bench.divergence re-runs a causal LM on token ids alone, and these answers need their images
        return Evaluation(float(scores.mean()), scores, answers.padded(rows, new),
                          metrics={"full_credit": float(exact.mean())})

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return answers.identical_answer_tokens(reference, method)

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        import torch

        n = min(ctx.budget.pick(WORKLOAD_SIZE, SMOKE_WORKLOAD_SIZE), len(self.val))
        new = ctx.budget.pick(MAX_NEW_TOKENS, SMOKE_NEW_TOKENS)
        inputs = [self.inputs(self.val[i], ctx.device, ctx.torch_dtype) for i in range(n)]
        visual = sum(int((ids == self.image_token_id).sum()) for ids, _ in inputs)
        total = sum(ids.shape[1] for ids, _ in inputs)

        def run() -> list["torch.Tensor"]:
            with torch.inference_mode():
                return [answer_ids(subject, ids, pix, new) for ids, pix in inputs]

        run()  # warm-up
        return run, n, (f"seconds to prefill and answer {n} TextVQA validation questions one at a time ({visual} of "
                        f"their {total} prompt tokens visual; items are questions)")


# ---- the reference's parts, read without its weights --------------------------------------------------------

def load_processor(source: pretrained.ModelSource):
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(source.path, revision=source.revision)
    except (OSError, ValueError) as e:
        raise pretrained.PretrainedNotFound(f"could not load the textvqa reference's processor from "
                                            f"{source.describe()} ({source.env}): {e}\n{source.hint()}") from e
    if not hasattr(proc, "image_processor") or not hasattr(proc, "image_token"):
        raise NotALlava(f"the textvqa reference's processor ({source.describe()}, {source.env}) is a "
                        f"{type(proc).__name__}, not a LlavaProcessor (an image processor and an <image> token)")
    return proc


def load_config(source: pretrained.ModelSource):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source.path, revision=source.revision)
    if cfg.model_type != "llava":
        raise NotALlava(f"the textvqa reference ({source.describe()}, {source.env}) is model_type {cfg.model_type!r}; "
                        f"the task needs a LlavaForConditionalGeneration checkpoint (model_type 'llava', e.g. "
                        f"{REFERENCE_ID})")
    return cfg


def image_layout(processor, config, where: str) -> tuple[int, int]:
    """(image token id, visual tokens per image) as the processor writes them, checked against the config: the
    processor's expansion of one `<image>` for an image of its own size (LLaVA-1.5: 576)."""
    from PIL import Image

    enc = processor(images=Image.new("RGB", (32, 32)), text=processor.image_token, return_tensors="pt")
    token = int(processor.image_token_id)
    per_image = int((enc["input_ids"] == token).sum())
    expected = getattr(config, "image_seq_length", None)
    if token != config.image_token_id or (expected is not None and per_image != expected):
        raise NotALlava(f"the textvqa reference ({where}) disagrees with itself: its processor writes {per_image} "
                        f"copies of token {token} per image, its config expects {expected} of token "
                        f"{config.image_token_id}")
    return token, per_image


def local_reference_problem(folder: Path) -> str | None:
    """Why a local reference folder is not a LLaVA checkpoint with its processor (read as JSON, nothing loaded)."""
    import json

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        return (f"{REFERENCE_ENV}={folder}: config.json says model_type {model_type!r}; the textvqa reference must be "
                f"a LlavaForConditionalGeneration checkpoint (model_type 'llava', e.g. {REFERENCE_ID})")
    # the image processor's settings: preprocessor_config.json (llava-hf's hub folders), or inside
    # processor_config.json (what transformers 5's LlavaProcessor.save_pretrained writes)
    joint = folder / "processor_config.json"
    if not (folder / "preprocessor_config.json").is_file() and not (
            joint.is_file() and "image_processor" in json.loads(joint.read_text())):
        return (f"{REFERENCE_ENV}={folder}: the folder has no image processor (neither a preprocessor_config.json nor "
                f"a processor_config.json with one): save the checkpoint's LlavaProcessor beside it "
                f"(processor.save_pretrained)")
    return None
