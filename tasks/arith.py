"""`arith`: grade-school arithmetic word problems in GSM8K's format, a small Llama reference and a draft.

Data: `tasks.arith_data` generates fixed train (20,000) and test (500) splits from seed 0. Tokenizer: byte-level
BPE with single-digit tokens, trained on the training split. Models: Llama-style decoders trained by the
harness on the training split (loss on the answer only); the draft is the smaller model that speculative
decoding drafts with and distillation trains as the student (same tokenizer). All three are published under
`tasks/artifacts/arith/` (`tokenizer/tokenizer.json`, `reference/` and `draft/` as Hugging Face model folders
with `config.json` and `model.safetensors`), with their sha256 recorded below; `bench reference build arith
[--publish]` rebuilds all three, deterministically.

What they reach (published artifacts, `tasks/artifacts/arith/`): the reference (Llama, hidden 192, 4 layers,
2.70M parameters, 3,000 steps, 44 min on 2 shared cores) scores 61.0% exact match on the 500 test problems,
the draft (hidden 96, 2 layers, 0.47M, 3,000 steps) 44.4%. Per generated token at batch 1 on this CPU the
reference takes 2.07 ms and the draft 0.99 ms; a model of the reference's depth but hidden size 32 (whose
matrix multiplies cost almost nothing) takes 1.33 ms, so only about 36% of the reference's per-token time
is compute and the rest is framework overhead (54% at 10M parameters, 85% at 39M: a compute-bound
reference would need tens of millions of parameters, hours of training on this machine). Decoding methods
that trade more tokens per forward pass for extra work therefore gain less here than on a GPU.

Quality: lm-eval's exact match (strict `#### <n>` filter) on a local task in GSM8K's style
(`tasks._kit.lm_harness`), zero-shot, greedy (the reference at the profile's evaluation batch, a method's own
procedure at 1), on the `EVAL_SIZE` first test problems, both arms stopped by one rule (`tasks._kit.lm.StopRule`:
lm-eval's stop strings and the end-of-text id). Fidelity: the share
of those problems whose generated answer equals the reference's token for token. Workload: greedy answers to
the first `WORKLOAD_SIZE` test questions at the profile's causal-LM batch size; items are generated tokens.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.api import Draft, ShiftedPrompts, Student, Tokenizer, TrainingRows
from bench.registry import register_task
from tasks import arith_data
from tasks.base import ARTIFACTS, Evaluation, ReferenceWeights, RunContext, Subject, Task
from tasks._kit import answers
from tasks._kit.lm import LMArch, LMRecipe

if TYPE_CHECKING:
    import torch

    from tasks._kit import lm

ART = ARTIFACTS / "arith"
TOKENIZER_SHA256 = "f6c905fa2f9c78b02ff28c3ed7434ef99d50bc011b2d815bc83f8e3f17a869e5"
REFERENCE_SHA256 = "855fe6b7a80f85526b50e2e99912b5500695af37eab315f8cdedf51de909b15a"
DRAFT_SHA256 = "6cc83b92c69adbc1e38cf741aac62ff778dfcd0dba4eac4b1a0d43a0f3741ca1"

REFERENCE_ARCH = LMArch(hidden=192, layers=4, heads=3, intermediate=768)
DRAFT_ARCH = LMArch(hidden=96, layers=2, heads=2, intermediate=384)
RECIPE = LMRecipe(epochs=1.6, lr=2e-3, batch_size=32)  # 3,000 steps over problems + drills
DRAFT_RECIPE = LMRecipe(epochs=1.6, lr=3e-3, batch_size=32)  # same steps; a smaller model takes a larger rate

DRILL_LINES = 40_000  # ten calculator annotations each, beside the 20,000 word problems
EVAL_SIZE = 500  # test problems lm-eval scores (all of them)
SMOKE_EVAL_SIZE = 6  # under --budget smoke
WORKLOAD_SIZE = 8  # test questions answered per timed call
SMOKE_WORKLOAD_SIZE = 2


@register_task("arith", modality="causal-lm", tier="embedded", metric="exact_match", higher_is_better=True,
               version="1", summary="GSM8K-format arithmetic word problems; small Llama reference and draft, "
                                    "exact match through lm-eval")
class Arith(Task, TrainingRows, Draft, Student, Tokenizer, ShiftedPrompts):
    reference_sha256 = REFERENCE_SHA256
    draft_sha256 = DRAFT_SHA256
    recipe = RECIPE

    def __init__(self) -> None:
        self._loaded = False

    # ---- data -----------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        from tasks._kit import lm

        self.train, self.test = arith_data.generate()
        art = ART / "tokenizer" / "tokenizer.json"
        if TOKENIZER_SHA256 and art.is_file() and _sha256(art.read_bytes()) == TOKENIZER_SHA256:
            self.tokenizer, self.tokenizer_sha256 = lm.load_tokenizer(art), TOKENIZER_SHA256
        else:
            if TOKENIZER_SHA256:
                warnings.warn(f"{art} is missing or does not match its recorded sha256; training the tokenizer "
                              f"again from the data", stacklevel=2)
            self.tokenizer = self.train_tokenizer()
            self.tokenizer_sha256 = _sha256(lm.tokenizer_json(self.tokenizer).encode())
        self._loaded = True

    def train_tokenizer(self):
        from tasks._kit import lm

        return lm.train_tokenizer(lm.prompt_of(p["question"]) + " " + p["answer"] for p in self.train)

    def data_fingerprint(self) -> str:
        h = hashlib.sha256()
        for part in (arith_data.GENERATOR_VERSION, arith_data.fingerprint(self.test),
                     arith_data.fingerprint(self.train), self.tokenizer_sha256):
            h.update(part.encode() + b"\n")
        return h.hexdigest()

    def examples(self) -> "list[lm.Example]":
        """The training examples of every arith model: the word problems (loss on the answer) and
        `DRILL_LINES` arithmetic drill lines (loss on the results; see `arith_data.drills`)."""
        from tasks._kit import lm

        problems = lm.encode_examples(self.tokenizer, [lm.prompt_of(p["question"]) for p in self.train],
                                      [p["answer"] for p in self.train])
        lines = arith_data.drills(DRILL_LINES)
        spans = [[(m.start(2), m.end() + len(m.group(2))) for m in arith_data.ANNOTATION.finditer(line)]
                 for line in lines]
        return problems + lm.encode_spans(self.tokenizer, lines, spans)

    # ---- models ---------------------------------------------------------------------------------------------
    def build_reference(self):
        from tasks._kit import lm

        return lm.build_lm(REFERENCE_ARCH, self.tokenizer)

    student_recipe = None  # an LM student trains under the distillation method's own schedule (LMDistillConfig)

    def training_rows(self) -> list[dict]:
        """The generated training problems (TrainingRows)."""
        return self.train

    shift = arith_data.SHIFT

    def shifted_prompts(self, n: int, seed: int) -> list[str]:
        """Prompts of `arith_data.shifted` problems (ShiftedPrompts): long chains of 4-6 operations."""
        from tasks._kit import lm

        return [lm.prompt_of(p["question"]) for p in arith_data.shifted(n, seed)]

    def build_student(self):
        """The draft's architecture, untrained: the student every distillation method trains."""
        from tasks._kit import lm

        return lm.build_lm(DRAFT_ARCH, self.tokenizer)

    def _train(self, build: Callable, recipe: LMRecipe, ctx: RunContext, what: str) -> dict:
        import torch

        from tasks._kit import lm

        model = build()  # seeded inside: the weights never depend on the run's seed
        stats = lm.fit_lm(model, self.examples(), recipe, ctx, seed=0, description=f"Training the arith {what}",
                          pad_id=self.tokenizer.pad_token_id)
        ctx.progress.log(f"arith {what}: {stats.steps} steps in {stats.seconds:.0f} s, loss {stats.final_loss:.4f}")
        # published in float16, half the bytes: the reference *is* these rounded weights (the profile's dtype
        # is applied when they are loaded), so every run still sees the same weights bit for bit
        return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}

    def train_reference(self, ctx: RunContext) -> dict:
        return self._train(self.build_reference, RECIPE, ctx, "reference")

    def train_draft(self, ctx: RunContext) -> dict:
        return self._train(self.build_student, DRAFT_RECIPE, ctx, "draft")

    def _cache_path(self, which: str, arch: LMArch, recipe: LMRecipe, ctx: RunContext) -> Path:
        from bench import cache

        k = cache.key(self.spec.version, ctx.budget, ctx.device, arch, recipe, self.data_fingerprint())
        return cache.cache_dir() / "tasks" / "arith" / f"v{self.spec.version}" / f"{which}-{k}.safetensors"

    def reference_cache_path(self, ctx: RunContext) -> Path:
        return self._cache_path("reference", REFERENCE_ARCH, RECIPE, ctx)

    def draft_cache_path(self, ctx: RunContext) -> Path:
        return self._cache_path("draft", DRAFT_ARCH, DRAFT_RECIPE, ctx)

    def _weights(self, which: str, expected: str | None, path: Path, train: Callable) -> ReferenceWeights:
        from bench import cache

        art = ART / which / "model.safetensors"
        if expected and art.is_file() and self.tokenizer_sha256 == TOKENIZER_SHA256:
            hit = cache.load_weights(art, expected)
            if hit is not None:
                return ReferenceWeights(hit[0], hit[1], True, str(art))
            warnings.warn(f"{art} does not match the task's recorded sha256; using a locally built {which} "
                          f"(results will say so)", stacklevel=3)
        state, digest, _ = cache.cached_weights(path, train)
        return ReferenceWeights(state, digest, digest == expected, str(path))

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        return self._weights("reference", self.reference_sha256, self.reference_cache_path(ctx),
                             lambda: self.train_reference(ctx))

    def draft_weights(self, ctx: RunContext) -> ReferenceWeights:
        return self._weights("draft", self.draft_sha256, self.draft_cache_path(ctx), lambda: self.train_draft(ctx))

    def draft_subject(self, ctx: RunContext) -> Subject:
        """The published draft as a subject (for speculative decoding; distillation starts from scratch)."""
        model = self.build_student()
        model.load_state_dict(self.draft_weights(ctx).state)
        return self.prepare(model, ctx)

    def prepare(self, model, ctx: RunContext) -> Subject:
        from tasks._kit import lm, lm_harness

        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        rule = lm.StopRule.build(self.tokenizer, lm_harness.UNTIL, lm.checkpoint_eos_ids(model, self.tokenizer))
        return Subject(model, self.spec.modality, {"tokenizer": self.tokenizer, "stop": rule})

    def build_artifacts(self, ctx: RunContext, publish: bool) -> tuple[str, Path]:
        """`bench reference build arith`: train the tokenizer, the reference and the draft again into the cache,
        and with `publish` write all three to tasks/artifacts/arith/. Returns the reference's sha256 and path."""
        from bench import cache
        from tasks._kit import lm

        self.tokenizer = self.train_tokenizer()
        text = lm.tokenizer_json(self.tokenizer)
        self.tokenizer_sha256 = _sha256(text.encode())
        ctx.progress.log(f"arith tokenizer: sha256 {self.tokenizer_sha256} "
                         + ("(matches the published one)" if self.tokenizer_sha256 == TOKENIZER_SHA256
                            else "(differs from the published one)"))
        out = {}
        for which, train, path in (("reference", self.train_reference, self.reference_cache_path(ctx)),
                                   ("draft", self.train_draft, self.draft_cache_path(ctx))):
            state = train(ctx)
            digest = cache.save_weights(path, state)
            out[which] = (digest, path)
            ctx.progress.log(f"arith {which}: sha256 {digest}")
            if publish:
                folder = ART / which
                model = self.build_reference() if which == "reference" else self.build_student()
                model.config.save_pretrained(folder)
                model.generation_config.save_pretrained(folder)
                target = folder / "model.safetensors"
                cache.save_weights(target, state)
                target.with_name(target.name + ".sha256").unlink()  # the module records the published hash
                out[which] = (digest, target)
        if publish:
            from bench.store import atomic_write_text

            (ART / "tokenizer").mkdir(parents=True, exist_ok=True)
            atomic_write_text(ART / "tokenizer" / "tokenizer.json", text)
        return out["reference"]

    # ---- measurement ----------------------------------------------------------------------------------------
    def harness_folder(self) -> Path:
        """The lm-eval task folder (YAML + test.jsonl), written once per data fingerprint."""
        from bench import cache
        from tasks._kit import lm_harness

        folder = cache.cache_dir() / "tasks" / "arith" / "lm-eval" / self.data_fingerprint()[:16]
        if not (folder / "arith.yaml").is_file():
            with cache.entry_lock(folder / "arith.yaml"):
                lm_harness.write_task(folder, "arith", self.test)
        return folder

    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        from tasks._kit import lm_harness

        limit = ctx.budget.pick(EVAL_SIZE, SMOKE_EVAL_SIZE)
        r = lm_harness.evaluate(subject, self.harness_folder(), "arith", limit=limit, batch_size=ctx.eval_batch_size)
        self.last_harness = r
        ctx.progress.log(f"lm-eval exact match ({lm_harness.FILTER}) {r.value:.4f} ± {r.stderr:.4f} "
                         f"(lm-eval's stderr), n = {len(r.per_example)}")
        outputs = answers.padded(r.generated, lm_harness.MAX_GEN_TOKS)
        assert abs(r.per_example.mean() - r.value) < 1e-9, (r.per_example.mean(), r.value)
        return Evaluation(r.value, r.per_example, outputs, contexts=r.context_ids)

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        return answers.identical_answer_tokens(reference, method)

    def workload_prompts(self, ctx: RunContext) -> list[str]:
        from tasks._kit import lm

        n = ctx.budget.pick(WORKLOAD_SIZE, SMOKE_WORKLOAD_SIZE)
        return [lm.prompt_of(p["question"]) for p in self.test[:n]]

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        import torch

        from tasks._kit import lm, lm_harness

        tok = subject.extra["tokenizer"]
        prompts = self.workload_prompts(ctx)
        bs = ctx.batch_size
        side, tok.padding_side = tok.padding_side, "left"
        batches = [tok(prompts[i:i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
                   for i in range(0, len(prompts), bs)]
        tok.padding_side = side
        batches = [(b["input_ids"].to(ctx.device), b["attention_mask"].to(ctx.device)) for b in batches]

        def run() -> list["torch.Tensor"]:
            with torch.inference_mode():
                return [lm.generate_ids(subject, ids, lm_harness.MAX_GEN_TOKS, mask) for ids, mask in batches]

        outs = run()  # once, to count what it generates (and as a warm-up)
        rule = lm.stop_rule(subject)
        tokens = sum(len(lm.completion_tokens(out[r:r + 1], ids.shape[1], tok.eos_token_id, rule))
                     for out, (ids, _) in zip(outs, batches) for r in range(out.shape[0]))
        return run, tokens, (f"seconds to generate greedy answers to {len(prompts)} test questions at batch {bs} "
                             f"({tokens} generated tokens; items are tokens)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
