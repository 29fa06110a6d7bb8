"""`digits-vlm`: questions about one or two scikit-learn digit images, answered by a tiny LLaVA.

The subject of visual-token reduction (visual token withdrawal, FastV): a vision-language model whose sequence is
mostly image tokens. Everything runs offline on a CPU.

Data. `digits`' own split of scikit-learn's 8x8 digits (stratified, seed 0: 1,348 train / 449 test images, the
same images in the same order as `tasks.digits`). Questions (`questions`) come in three kinds, in turn:
"What digit is this?" (one image, answer its label), "What is the sum of the two digits?" (two images, answer
the sum) and "Which digit is larger?" (two images of different labels, answer the larger label). The
`TRAIN_QUESTIONS` training questions are drawn (seed 0) from training images only, the `EVAL_SIZE` test
questions (seed 1) from test images only. A prompt is the images' tokens, then `Question: <question>\\nAnswer:`;
the answer is " <number>" and end-of-text, the loss on the answer only (as `arith`).

Model. transformers' `LlavaForConditionalGeneration`, unchanged: a CLIP vision tower (`CLIPVisionConfig`, one
channel, 8x8 images, patch 1: 64 patches and a CLS token, `VISION`), LLaVA's two-layer GELU projector, and a
Llama decoder (`TEXT_ARCH`, half `arith`'s width). Each image enters the decoder as LLaVA puts it there: its
`<image>` placeholder is expanded to `TOKENS_PER_IMAGE` (= 64) copies of the image token id in `input_ids`, and
the model scatters the projected patch features (last layer, CLS dropped: LLaVA's "default" strategy) into the
embeddings at those positions. Patch 1 on the original pixels is the same as upsampling 4x and patches of 4 (each
patch one source pixel) at a sixteenth of the vision tower's cost. A two-image question is 128 visual tokens
against about 15 text tokens (`visual_share` in the tests: about 0.9).

Tokenizer: `tasks._kit.lm.train_tokenizer` (byte-level BPE, digits single) on the training prompts and answers,
with `<image>` added as a special token; published as tasks/artifacts/digits-vlm/tokenizer.json, its sha256 below.

The reference is trained end to end from a seeded initialisation (LLaVA's stage 2 alone: there is no pretrained
CLIP to align to), `RECIPE`, by `bench reference build digits-vlm [--publish]`: AdamW with warm-up and cosine,
deterministic for its seed, on one thread whatever the profile says (so the weights do not depend on how a
matrix product's reduction is split between threads).

What it reaches (published, tasks/artifacts/digits-vlm/; 0.41M parameters: vision tower 0.10M, projector
0.01M, decoder and head 0.30M): 68.2% exact match on the 500 test questions, by kind 93.4% "which digit", 83.7%
"larger", 27.5% "sum" (chance: about 10%, 20% and 10%). Training took 814 s (3,000 steps at batch 32 on one
thread of a 2-core machine shared with other jobs, load average about 3); the same recipe at 1,500 steps scored
60.2% (91.0 / 71.7 / 18.0). Reading a digit is learnt; adding two is the weak part (reading both at 93% and
adding exactly would give about 87%), and it was still rising with more steps, which 2 cores do not afford.

Quality: exact match of the greedy answer (model.generate with `lm.StopRule`: end-of-text or a newline) on the
first `EVAL_SIZE` test questions, one at a time. Fidelity: share of questions whose answer tokens equal the
reference's. Workload: prefill and answer the first `WORKLOAD_SIZE` test questions one at a time; items are
questions.

The contract a token-dropping method is written against (`VisionLanguageExtra` in bench/api.py; it never names
this task): `subject.model` is a `LlavaForConditionalGeneration`; `subject.extra` carries
- `image_token_id`: the id of the visual positions in `input_ids` (`input_ids == image_token_id` marks them, in
  order, image after image; `tokens_per_image` of them per image);
- `num_layers`: the decoder's layers (`model.model.language_model.layers`), the K of "after layer K" ranges over
  0..num_layers (K = num_layers keeps every visual token everywhere: the reference);
- `generate`: the hook a method sets, `(subject, input_ids, pixel_values, max_new_tokens) -> ids` (prompt
  included, batch 1), called instead of `model.generate` by `answer_ids`, whose output the stop rule cuts;
- `stop`, `tokenizer`: the task's stop rule and tokenizer;
- `calibration(n, seed)`: `n` training questions as `(input_ids, pixel_values)` pairs, never test questions, for
  a method that chooses its layer on a few examples (VTW's KL criterion).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.registry import register_task
from tasks.base import ARTIFACTS, Evaluation, RunContext, Subject, Task
from tasks._kit import answers
from tasks._kit.lm import LMArch, LMRecipe
from tasks._kit.vlm import answer_ids  # noqa: F401  (tasks.digits_vlm.answer_ids: shared with textvqa)

if TYPE_CHECKING:
    import torch

ART = ARTIFACTS / "digits-vlm"
TOKENIZER_SHA256: str | None = "0f33a8bc1ebf708d399c03be4841acc085b4efc6faf98d0163b341007b8c6e9e"
REFERENCE_SHA256: str | None = "74d7f8592ed70a55eaeea0ae8ab33659cbf390bf15174c62d023260a408efdcf"

IMAGE_TOKEN = "<image>"
TOKENS_PER_IMAGE = 64  # 8 x 8 patches of one pixel; the CLS token is dropped (LLaVA's "default" strategy)


@dataclass(frozen=True)
class VisionArch:
    """The CLIP vision tower: one-channel 8x8 images, patch 1."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 256
    image_size: int = 8
    patch_size: int = 1


VISION = VisionArch()
TEXT_ARCH = LMArch(hidden=64, layers=4, heads=2, intermediate=256)  # arith's depth, a third of its width
RECIPE = LMRecipe(epochs=4.0, lr=2e-3, batch_size=32)  # 3,000 steps over the training questions (2 epochs: 60.2%)
TRAIN_QUESTIONS = 24_000  # 8,000 of each kind
EVAL_SIZE = 500  # test questions scored
SMOKE_EVAL_SIZE = 6
WORKLOAD_SIZE = 16  # test questions answered per timed call
SMOKE_WORKLOAD_SIZE = 2
MAX_NEW_TOKENS = 4  # the longest answer is " 18" and end-of-text: 3 tokens
UNTIL = ("\n",)  # the stop strings (with end-of-text)
DATA_VERSION = "1"  # bump when `questions` changes

KINDS = (("digit", 1, "What digit is this?"),
         ("sum", 2, "What is the sum of the two digits?"),
         ("larger", 2, "Which digit is larger?"))


def questions(labels, n: int, seed: int) -> list[dict]:
    """`n` questions over images with these `labels` (indices into the split), the kinds in turn: each a dict of
    `kind`, `images` (split indices), `question`, `answer`. Deterministic for `seed` (numpy's PCG64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = [int(v) for v in labels]
    out = []
    for i in range(n):
        kind, count, text = KINDS[i % len(KINDS)]
        while True:
            idx = [int(v) for v in rng.integers(0, len(labels), size=count)]
            ys = [labels[j] for j in idx]
            if kind != "larger" or ys[0] != ys[1]:
                break
        answer = {"digit": ys[0], "sum": sum(ys), "larger": max(ys)}[kind]
        out.append({"kind": kind, "images": tuple(idx), "question": text, "answer": str(answer)})
    return out


def split_indices():
    """scikit-learn digits' (train, test) row indices in `tasks.digits`' split (the same call on the indices)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.25, random_state=0, stratify=d.target)
    return d, tr, te


@register_task("digits-vlm", modality="vision-language", tier="embedded", metric="exact_match",
               higher_is_better=True, version="1",
               summary="questions about one or two 8x8 digit images (which digit, sum, larger); tiny LLaVA (CLIP "
                       "tower, projector, Llama decoder) with 64 visual tokens per image; exact match")
class DigitsVLM(Task):
    reference_sha256 = REFERENCE_SHA256
    recipe = RECIPE

    def __init__(self) -> None:
        self._loaded = False

    # ---- data -----------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        import numpy as np
        import torch

        from tasks._kit import lm

        d, tr, te = split_indices()
        x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # [0, 16] -> [-1, 1], as `digits`
        self.train_rows, self.test_rows = tr, te  # scikit-learn row indices
        self.train_images = torch.from_numpy(x[tr]).unsqueeze(1)  # N x 1 x 8 x 8
        self.test_images = torch.from_numpy(x[te]).unsqueeze(1)
        self.train = questions(d.target[tr], TRAIN_QUESTIONS, seed=0)
        self.test = questions(d.target[te], EVAL_SIZE, seed=1)
        art = ART / "tokenizer.json"
        if TOKENIZER_SHA256 and art.is_file() and _sha256(art.read_bytes()) == TOKENIZER_SHA256:
            self.tokenizer, self.tokenizer_sha256 = lm.load_tokenizer(art), TOKENIZER_SHA256
        else:
            if TOKENIZER_SHA256:
                warnings.warn(f"{art} is missing or does not match its recorded sha256; training the tokenizer "
                              f"again from the questions", stacklevel=2)
            self.tokenizer = self.train_tokenizer()
            self.tokenizer_sha256 = _sha256(lm.tokenizer_json(self.tokenizer).encode())
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._loaded = True

    def train_tokenizer(self):
        from tasks._kit import lm

        tok = lm.train_tokenizer((lm.prompt_of(q["question"]) + " " + q["answer"] for q in self.train),
                                 vocab_size=320)
        tok.backend_tokenizer.add_special_tokens([IMAGE_TOKEN])
        return lm.wrap_tokenizer(tok.backend_tokenizer)

    def data_fingerprint(self) -> str:
        import json

        h = hashlib.sha256()
        h.update(f"{DATA_VERSION}\n{self.tokenizer_sha256}\n".encode())
        for rows, qs, images in ((self.train_rows, self.train, self.train_images),
                                 (self.test_rows, self.test, self.test_images)):
            h.update(rows.tobytes())
            h.update(images.numpy().tobytes())
            h.update(json.dumps(qs, sort_keys=True).encode())
        return h.hexdigest()

    def encode(self, q: dict, answer: bool = False) -> tuple[list[int], list[int]]:
        """(ids, labels) of a question: its images' tokens, the prompt, and with `answer` " <answer>" and
        end-of-text (the labels on those only; -100 elsewhere)."""
        from tasks._kit import lm

        tok = self.tokenizer
        ids = [self.image_token_id] * (TOKENS_PER_IMAGE * len(q["images"]))
        ids += tok(lm.prompt_of(q["question"]), add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        if answer:
            tail = tok(" " + q["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids, labels = ids + tail, labels + tail
        return ids, labels

    def pixels(self, q: dict, split: str) -> "torch.Tensor":
        images = self.train_images if split == "train" else self.test_images
        return images[list(q["images"])]

    def inputs(self, q: dict, split: str, device="cpu", dtype=None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(input_ids 1 x L, pixel_values n_images x 1 x 8 x 8) of a question's prompt, on `device`."""
        import torch

        ids, _ = self.encode(q)
        pix = self.pixels(q, split).to(device)
        return torch.tensor([ids], device=device), pix if dtype is None else pix.to(dtype)

    # ---- models ---------------------------------------------------------------------------------------------
    def build_reference(self):
        import torch
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

        v = CLIPVisionConfig(hidden_size=VISION.hidden, intermediate_size=VISION.intermediate,
                             num_hidden_layers=VISION.layers, num_attention_heads=VISION.heads,
                             image_size=VISION.image_size, patch_size=VISION.patch_size, num_channels=1,
                             projection_dim=VISION.hidden)
        t = TEXT_ARCH.config(self.tokenizer)
        config = LlavaConfig(vision_config=v, text_config=t, image_token_id=self.image_token_id,
                             projector_hidden_act="gelu", vision_feature_select_strategy="default",
                             vision_feature_layer=-1, image_seq_length=TOKENS_PER_IMAGE, tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the run's generator alone
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        return model

    def train_reference(self, ctx: RunContext) -> dict:
        import torch

        model = self.build_reference()
        stats = self.fit(model, ctx)
        ctx.progress.log(f"digits-vlm reference: {stats['steps']} steps in {stats['seconds']:.0f} s, loss "
                         f"{stats['loss']:.4f}")
        # published in float16 as arith's: the reference is these rounded weights
        return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}

    def fit(self, model, ctx: RunContext, seed: int = 0) -> dict:
        """Train `model` in place on the training questions (loss on the answers): `tasks._kit.lm.fit_lm`'s
        schedule (AdamW, linear warm-up, cosine to zero, clipping), with each batch's images beside its tokens
        (fit_lm's batches carry tokens only). Deterministic for `seed`; `SMOKE_STEPS` steps under smoke."""
        import torch

        from tasks._kit import lm

        examples = [self.encode(q, answer=True) for q in self.train]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the weights must not depend on the profile's thread count (reductions split)
        try:
            return self._fit(model, examples, ctx, seed)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, model, examples, ctx: RunContext, seed: int) -> dict:
        import torch

        from tasks._kit import lm

        gen = torch.Generator().manual_seed(seed)
        model.to(ctx.device).train()
        total = ctx.budget.steps(max(1, round(RECIPE.epochs * math.ceil(len(examples) / RECIPE.batch_size))))
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=RECIPE.lr, betas=(0.9, 0.98))
        warm = min(RECIPE.warmup_steps, max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
        lengths = [len(e[0]) for e in examples]
        queue: list[list[int]] = []
        running, steps, t0 = None, 0, time.perf_counter()
        with ctx.progress.step("Training the digits-vlm reference", total=total) as advance:
            while steps < total:
                if not queue:
                    queue = lm._batches(lengths, RECIPE.batch_size, gen)
                idx = queue.pop(0)
                ids, mask, labels = (t.to(ctx.device) for t in lm.collate(examples, idx, self.tokenizer.pad_token_id))
                pix = torch.cat([self.pixels(self.train[i], "train") for i in idx]).to(ctx.device)  # row order
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
                loss = lm.completion_loss(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE.clip)
                opt.step()
                sched.step()
                value = loss.detach().item()
                running = value if running is None else 0.98 * running + 0.02 * value
                steps += 1
                advance(1)
        model.eval()
        return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": float(running)}

    def reference_cache_path(self, ctx: RunContext) -> Path:
        from bench import cache

        k = cache.key(self.spec.version, ctx.budget, ctx.device, VISION, TEXT_ARCH, RECIPE, TOKENS_PER_IMAGE,
                      self.data_fingerprint())
        return cache.cache_dir() / "tasks" / self.spec.name / f"v{self.spec.version}" / f"reference-{k}.safetensors"

    def reference_weights(self, ctx: RunContext):
        if self.tokenizer_sha256 != TOKENIZER_SHA256:  # the published weights read the published tokenizer only
            from bench import cache
            from tasks.base import ReferenceWeights

            path = self.reference_cache_path(ctx)
            state, digest, _ = cache.cached_weights(path, lambda: self.train_reference(ctx))
            return ReferenceWeights(state, digest, digest == self.reference_sha256, str(path))
        return super().reference_weights(ctx)

    def prepare(self, model, ctx: RunContext) -> Subject:
        from tasks._kit import lm

        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        rule = lm.StopRule.build(self.tokenizer, UNTIL, lm.checkpoint_eos_ids(model, self.tokenizer))

        def calibration(n: int, seed: int) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
            import random

            rows = sorted(random.Random(seed).sample(range(len(self.train)), min(n, len(self.train))))
            return [self.inputs(self.train[i], "train", ctx.device, ctx.torch_dtype) for i in rows]

        return Subject(model, self.spec.modality, {
            "tokenizer": self.tokenizer, "stop": rule, "image_token_id": self.image_token_id,
            "tokens_per_image": TOKENS_PER_IMAGE, "num_layers": model.config.text_config.num_hidden_layers,
            "calibration": calibration})

    def build_artifacts(self, ctx: RunContext, publish: bool) -> tuple[str, Path]:
        """`bench reference build digits-vlm`: train the tokenizer and the reference again into the cache, and with
        `publish` write both to tasks/artifacts/digits-vlm/ (their sha256 then go into the module)."""
        from bench import cache
        from bench.store import atomic_write_text
        from tasks._kit import lm

        self.load(ctx)
        self.tokenizer = self.train_tokenizer()
        text = lm.tokenizer_json(self.tokenizer)
        self.tokenizer_sha256 = _sha256(text.encode())
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ctx.progress.log(f"digits-vlm tokenizer: sha256 {self.tokenizer_sha256}")
        state = self.train_reference(ctx)
        path = self.reference_cache_path(ctx)
        digest = cache.save_weights(path, state)
        ctx.progress.log(f"digits-vlm reference: sha256 {digest}")
        if publish:
            ART.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ART / "tokenizer.json", text)
            target = ART / "reference.safetensors"
            cache.save_weights(target, state)
            target.with_name(target.name + ".sha256").unlink()  # the module records the published hash
            return digest, target
        return digest, path

    # ---- measurement ----------------------------------------------------------------------------------------
    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        """Greedy answers to the first `EVAL_SIZE` test questions, one at a time (the profiles' evaluation batch
        for vision-language is 1: a token-dropping method prunes each sequence by its own attention)."""
        import numpy as np
        import torch

        tok = subject.extra["tokenizer"]
        n = ctx.budget.pick(EVAL_SIZE, SMOKE_EVAL_SIZE)
        rows: list[list[int]] = []  # answer tokens, padded into the evaluation's outputs
        scores = np.zeros(n)
        with torch.inference_mode():
            for i, q in enumerate(self.test[:n]):
                ids, pix = self.inputs(q, "test", ctx.device, ctx.torch_dtype)
                out = answer_ids(subject, ids, pix, MAX_NEW_TOKENS)[0, ids.shape[1]:].tolist()
                out = subject.extra["stop"].cut(out)
                rows.append(out)
                text = tok.decode([t for t in out if t not in subject.extra["stop"].eos_ids]).strip()
                scores[i] = float(text == q["answer"])
        ctx.progress.log(f"digits-vlm exact match {scores.mean():.4f}, n = {n}")
        # no `contexts`: bench.divergence re-runs a causal LM on token ids alone, and these answers need their images
        return Evaluation(float(scores.mean()), scores, answers.padded(rows, MAX_NEW_TOKENS), metrics={
            f"exact_match_{k}": float(np.mean([s for s, q in zip(scores, self.test) if q["kind"] == k]))
            for k, _, _ in KINDS if any(q["kind"] == k for q in self.test[:n])})

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return answers.identical_answer_tokens(reference, method)

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        import torch

        n = ctx.budget.pick(WORKLOAD_SIZE, SMOKE_WORKLOAD_SIZE)
        inputs = [self.inputs(q, "test", ctx.device, ctx.torch_dtype) for q in self.test[:n]]
        visual = sum(int((ids == self.image_token_id).sum()) for ids, _ in inputs)
        total = sum(ids.shape[1] for ids, _ in inputs)

        def run() -> list["torch.Tensor"]:
            with torch.inference_mode():
                return [answer_ids(subject, ids, pix, MAX_NEW_TOKENS) for ids, pix in inputs]

        run()  # warm-up
        return run, n, (f"seconds to prefill and answer {n} test questions one at a time ({visual} of their {total} "
                        f"prompt tokens visual; items are questions)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
