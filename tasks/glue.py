"""`glue-sst2`, `glue-mnli`: GLUE (Wang et al., 2019) SST-2 and MNLI-matched with fine-tuned BERT-base references.

*Full* tasks: they run for real where the machine can download the data and the checkpoints; the loading code
is tested offline on fixture files in the real format with tiny random BERTs (tests/tasks/test_glue.py).

Data: GLUE through `datasets`, from the hub's `nyu-mll/glue`: config `sst2`, split `validation` (872
sentences; columns `sentence, label, idx`; labels 0 negative, 1 positive) and config `mnli`, split
`validation_matched` (9,815 pairs; columns `premise, hypothesis, label, idx`; labels 0 entailment, 1 neutral,
2 contradiction). Offline, `BENCH_GLUE_DATA=<folder>` reads the same files from a local copy of that hub
dataset, in its own parquet layout: `<folder>/<config>/<split>-*.parquet` (the hub README's data_files
pattern), e.g. `<folder>/sst2/validation-00000-of-00001.parquet`; get it once with
`hf download nyu-mll/glue --repo-type dataset --include "sst2/*" "mnli/*" --local-dir <folder>`.

Metric: accuracy, with one 0/1 score per example (the runner's bootstrap interval comes from them). GLUE
reports F1 beside accuracy only for MRPC and QQP; SST-2 and MNLI (matched / mismatched) are scored by accuracy
alone, so no F1 is recorded here. Fidelity: the share of examples on which a method predicts the reference's
label. Workload: one forward pass over the first `batch_size` validation examples (the profile's
text-classification batch), tokenized beforehand and padded to the longest; items are examples.

References: `textattack/bert-base-uncased-SST-2` and `textattack/bert-base-uncased-MNLI` (BERT-base uncased
fine-tuned by TextAttack, Morris et al., 2020; their model zoo reports 92.43% on SST-2 validation and 84.0%
on the first 1,000 MNLI-matched validation pairs), overridable by `BENCH_GLUE_SST2_REFERENCE` /
`BENCH_GLUE_MNLI_REFERENCE` (a local Hugging Face folder, or a hub id, `@revision` to pin; `tasks._kit.pretrained`).
Inputs are the checkpoint's own tokenizer on the sentence (the premise-hypothesis pair for MNLI), truncated to
`MAX_LENGTH` tokens, TextAttack's fine-tuning length.

Label order, checked: the SST-2 checkpoint's outputs are in GLUE's order (TextAttack evaluates it on glue/sst2
without a label map). The MNLI checkpoint's are NOT: output 0 is contradiction, 1 entailment, 2 neutral
(TextAttack evaluates it with the label map {0: 1, 1: 2, 2: 0} from GLUE labels to outputs, and
QData/TextAttack issue #684 measured 7% accuracy without that mapping, 84% with it); its config says only
LABEL_0..2. `KNOWN_LABEL_ORDERS` records both. The model's output order is taken from, first,
`BENCH_GLUE_<CONFIG>_LABELS` (GLUE label names in output order, e.g. `contradiction,entailment,neutral`); else
`KNOWN_LABEL_ORDERS` for the default hub ids; else the checkpoint's `id2label` when its names are GLUE's; and
otherwise it is an error that names the variable. `reorder_head` then permutes the classifier's output rows
into GLUE's order at load time, so output i means GLUE label i for the reference and for every method and
student derived from it. `reference_sha256` is the hash of the weights so loaded (`tasks._kit.pretrained`);
`reference_canonical` is False (no published hash to check against).

Student: `build_student()` is the reference's architecture with half its layers (6 for BERT-base, DistilBERT's
depth), untrained, for the distillation methods.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from bench.api import Augmentation, EncoderData, Student, Tokenizer, TrainingSplit
from bench.registry import register_task
from tasks._kit import pretrained
from tasks.base import Evaluation, ReferenceWeights, RunContext, Subject, Task
from tasks._kit.classification import TrainRecipe
from tasks._kit.pretrained import Pretrained

if TYPE_CHECKING:
    import torch

HUB_DATASET = "nyu-mll/glue"
DATA_ENV = "BENCH_GLUE_DATA"
MAX_LENGTH = 128  # tokens per input (TextAttack fine-tuned both references at this length)
SMOKE_EVAL_SIZE = 16  # validation examples scored under --budget smoke
KNOWN_LABEL_ORDERS = {  # the checkpoint's outputs, as GLUE label names (see the module docstring)
    "textattack/bert-base-uncased-SST-2": ("negative", "positive"),
    "textattack/bert-base-uncased-MNLI": ("contradiction", "entailment", "neutral"),
}


class GlueDataNotFound(FileNotFoundError):
    """`BENCH_GLUE_DATA` names a folder without the expected parquet files."""


class GlueDataError(ValueError):
    """The data has the wrong columns, or labels outside GLUE's."""


class LabelOrderUnknown(ValueError):
    """The reference's output order cannot be told; the message names the variable that sets it."""


@dataclass(frozen=True)
class GlueSpec:
    config: str  # nyu-mll/glue's config name
    split: str  # the evaluation split
    text: tuple[str, ...]  # the text column(s) the model reads
    labels: tuple[str, ...]  # GLUE's label names, in label order
    reference: str  # the default reference (hub id)

    @property
    def reference_env(self) -> str:
        return f"BENCH_GLUE_{self.config.upper()}_REFERENCE"

    @property
    def labels_env(self) -> str:
        return f"BENCH_GLUE_{self.config.upper()}_LABELS"

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text, "label", "idx")


SST2 = GlueSpec("sst2", "validation", ("sentence",), ("negative", "positive"), "textattack/bert-base-uncased-SST-2")
MNLI = GlueSpec("mnli", "validation_matched", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                "textattack/bert-base-uncased-MNLI")


def local_files(spec: GlueSpec) -> list[Path] | None:
    """The parquet files of the evaluation split under `BENCH_GLUE_DATA` (checked), or None when it is unset (the
    hub's nyu-mll/glue is read)."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser().resolve() / spec.config
    files = sorted(folder.glob(f"{spec.split}-*.parquet"))
    if not files:
        raise GlueDataNotFound(
            f"GLUE {spec.config} data not found: no {folder}/{spec.split}-*.parquet ({DATA_ENV}={value}). "
            f"{DATA_ENV} must hold the hub dataset {HUB_DATASET} in its own layout, e.g. "
            f"{folder}/{spec.split}-00000-of-00001.parquet with columns {', '.join(spec.columns)}; get it with"
            f"\n  hf download {HUB_DATASET} --repo-type dataset --include \"{spec.config}/*\" --local-dir "
            f"{folder.parent}\nor unset {DATA_ENV} to read it from the hub.")
    return files


def load_split(spec: GlueSpec):
    """The evaluation split as a `datasets.Dataset`: from the hub, or from `BENCH_GLUE_DATA`'s parquet files."""
    import datasets

    from bench import cache

    files = local_files(spec)
    if files is None:
        ds = datasets.load_dataset(HUB_DATASET, spec.config, split=spec.split)
        where = f"{HUB_DATASET} ({spec.config}, {spec.split})"
    else:
        ds = datasets.load_dataset("parquet", data_files={spec.split: [str(f) for f in files]}, split=spec.split,
                                   cache_dir=str(cache.cache_dir() / "tasks" / "glue" / "hf-datasets"))
        where = ", ".join(str(f) for f in files)
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise GlueDataError(f"GLUE {spec.config} data from {where} lacks the column(s) {', '.join(missing)}: "
                            f"expected {', '.join(spec.columns)}")
    bad = sorted({int(v) for v in ds["label"]} - set(range(len(spec.labels))))
    if bad:
        raise GlueDataError(f"GLUE {spec.config} data from {where} has labels {bad} outside 0..{len(spec.labels) - 1}"
                            f" (GLUE's test splits hide their labels as -1: evaluate on {spec.split})")
    return ds


def output_order(spec: GlueSpec, source: pretrained.ModelSource, config) -> tuple[str, ...]:
    """The checkpoint's outputs as GLUE label names (see the module docstring for the order of precedence)."""
    value = os.environ.get(spec.labels_env, "").strip()
    if value:
        names = tuple(n.strip().lower() for n in value.split(","))
        if sorted(names) != sorted(spec.labels):
            raise LabelOrderUnknown(f"{spec.labels_env}={value} must name each of {', '.join(spec.labels)} once, "
                                    f"in the order of the model's outputs")
        return names
    if not source.local and source.path in KNOWN_LABEL_ORDERS:
        return KNOWN_LABEL_ORDERS[source.path]
    names = tuple(str(config.id2label[i]).strip().lower() for i in range(config.num_labels))
    if sorted(names) == sorted(spec.labels):
        return names
    known = "; ".join(f"{k}: {','.join(v)}" for k, v in KNOWN_LABEL_ORDERS.items())
    raise LabelOrderUnknown(
        f"cannot tell which GLUE {spec.config} label each output of {source.describe()} means: its id2label is "
        f"{list(names)}. Set {spec.labels_env} to GLUE's label names in the order of the model's outputs, a "
        f"permutation of {','.join(spec.labels)} (known checkpoints: {known})")


def reorder_head(model, order: tuple[str, ...], labels: tuple[str, ...]) -> None:
    """Permute the classifier's output rows in place so that output i is GLUE label `labels[i]`."""
    import torch

    head = getattr(model, "classifier", None)
    head = getattr(head, "out_proj", head)  # RoBERTa-style heads end in out_proj
    if not isinstance(head, torch.nn.Linear) or head.out_features != len(labels):
        raise ValueError(f"{type(model).__name__} has no final linear classifier with {len(labels)} outputs to put "
                         f"in GLUE's label order")
    perm = torch.tensor([order.index(name) for name in labels])
    with torch.no_grad():
        head.weight.copy_(head.weight[perm])
        if head.bias is not None:
            head.bias.copy_(head.bias[perm])
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


class GlueTask(Pretrained, Task, TrainingSplit, Student, Augmentation, Tokenizer, EncoderData):
    glue: ClassVar[GlueSpec]
    reference_sha256 = None  # no pinned artifact: the hash of the weights as loaded is recorded

    def __init__(self) -> None:
        self._loaded = False
        self._config = None

    # ---- what the task needs -----------------------------------------------------------------------------
    def preflight(self, ctx: RunContext, uses: frozenset[type] = frozenset()) -> list[str]:
        """The validation split (`BENCH_GLUE_DATA`, else the hub's nyu-mll/glue) and the reference: local, cached
        or downloadable."""
        spec, problems = self.glue, []
        try:
            files = local_files(spec)
        except GlueDataNotFound as e:
            problems.append(str(e))
        else:
            if files is None:
                problems.append(pretrained.dataset_problem(
                    HUB_DATASET, f"GLUE {spec.config}",
                    f"Set {DATA_ENV} to a local copy in the hub's own layout (<folder>/{spec.config}/{spec.split}-*"
                    f".parquet), made where there is a network with\n  hf download {HUB_DATASET} --repo-type "
                    f"dataset --include \"{spec.config}/*\" --local-dir <folder>"))
        problems.append(pretrained.source_problem(spec.reference_env, spec.reference,
                                                  f"glue-{spec.config} reference"))
        return [p for p in problems if p]

    # ---- data ---------------------------------------------------------------------------------------------
    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        import numpy as np

        ds = load_split(self.glue)
        self.texts = {c: list(ds[c]) for c in self.glue.text}
        self.labels = np.asarray(ds["label"], dtype=np.int64)
        h = hashlib.sha256(f"{HUB_DATASET}|{self.glue.config}|{self.glue.split}\n".encode())
        for row in zip(*(self.texts[c] for c in self.glue.text), self.labels.tolist(), ds["idx"]):
            h.update(json.dumps(row).encode() + b"\n")
        self.tokenizer = pretrained.load_tokenizer(self.reference_source(), f"glue-{self.glue.config} reference")
        h.update(hashlib.sha256(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()).digest())
        self._fingerprint = h.hexdigest()
        self._loaded = True

    def data_fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, tok, start: int, stop: int) -> dict:
        """Examples [start, stop) tokenized as the model reads them (pairs for MNLI), padded to the longest."""
        cols = [self.texts[c][start:stop] for c in self.glue.text]
        return dict(tok(*cols, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"))

    # ---- models -------------------------------------------------------------------------------------------
    def reference_source(self) -> pretrained.ModelSource:
        return pretrained.model_source(self.glue.reference_env, self.glue.reference)

    def reference_config(self):
        if self._config is None:
            from transformers import AutoConfig

            src = self.reference_source()
            self._config = AutoConfig.from_pretrained(src.path, revision=src.revision)
        return self._config

    def build_reference(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_config(self.reference_config())

    # how a student is trained here: BERT's GLUE fine-tuning (Devlin et al. 2019)
    student_recipe = TrainRecipe(epochs=3, lr=5e-5, batch_size=32)

    def augment(self, x: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        return x  # no augmentation, as for arith-nli

    def model_keys(self) -> tuple[str, ...]:
        """The tokenizer outputs the reference's forward reads, in the order a packed split stacks them."""
        names = self.tokenizer.model_input_names
        return tuple(k for k in ("input_ids", "token_type_ids", "attention_mask") if k in names)

    def training_split(self) -> "Split":
        """The train split (the hub's, or `<BENCH_GLUE_DATA>/<config>/train-*.parquet`), tokenized as the
        evaluation split is and packed as x[:, k] = the k-th of `model_keys()` (TrainingSplit)."""
        import dataclasses

        import torch

        from tasks._kit.classification import Split

        ds = load_split(dataclasses.replace(self.glue, split="train"))
        enc = self.tokenizer(*[list(ds[c]) for c in self.glue.text], truncation=True, max_length=MAX_LENGTH,
                             padding=True, return_tensors="pt")
        x = torch.stack([enc[k] for k in self.model_keys()], dim=1)
        return Split(x, torch.tensor(list(ds["label"]), dtype=torch.int64))

    def encoder_batches(self, subject: Subject, n: int, seed: int, batch: int) -> list[dict]:
        """`n` training examples (EncoderData), tokenized as the evaluation split is."""
        import dataclasses

        import torch

        from bench.api import pick

        device = next(subject.model.parameters()).device
        ds = load_split(dataclasses.replace(self.glue, split="train"))
        idx = pick(len(ds), n, seed)
        rows = ds.select(idx)
        tok = subject.extra["tokenizer"]
        out = []
        for i in range(0, len(idx), batch):
            cols = [list(rows[c][i:i + batch]) for c in self.glue.text]
            enc = tok(*cols, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
            kw = {k: v.to(device) for k, v in enc.items()}
            out.append({**kw, "labels": torch.tensor(rows["label"][i:i + batch]).to(device)})
        return out

    def build_student(self):
        """The reference's architecture with half its layers (6 for BERT-base), untrained, seeded."""
        import copy

        import torch
        from transformers import AutoModelForSequenceClassification

        cfg = copy.deepcopy(self.reference_config())
        cfg.num_hidden_layers = max(1, cfg.num_hidden_layers // 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModelForSequenceClassification.from_config(cfg)

    def train_reference(self, ctx: RunContext) -> dict:
        """A published checkpoint is not trained here: the reference's weights are the loaded ones."""
        return self.reference_weights(ctx).state

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        from transformers import AutoModelForSequenceClassification

        src, spec = self.reference_source(), self.glue
        with ctx.progress.step(f"Loading the glue-{spec.config} reference from {src.describe()}"):
            model = pretrained.load_model(AutoModelForSequenceClassification, src, f"glue-{spec.config} reference")
        if model.config.num_labels != len(spec.labels):
            raise LabelOrderUnknown(f"{src.describe()} ({spec.reference_env}) has {model.config.num_labels} outputs;"
                                    f" GLUE {spec.config} has {len(spec.labels)} labels ({', '.join(spec.labels)})")
        order = output_order(spec, src, model.config)
        reorder_head(model, order, spec.labels)
        ctx.progress.log(f"glue-{spec.config} reference outputs {', '.join(order)} -> GLUE order "
                         f"{', '.join(spec.labels)}")
        self._config = model.config
        return self.keep(model, src)

    def prepare(self, model, ctx: RunContext) -> Subject:
        model = model.to(device=ctx.device, dtype=ctx.torch_dtype).eval()
        return Subject(model, self.spec.modality, {"tokenizer": self.tokenizer})

    # ---- measurement --------------------------------------------------------------------------------------
    def predict(self, subject: Subject, ctx: RunContext, n: int) -> "torch.Tensor":
        """Predicted GLUE labels of the first `n` examples, in order, at the profile's evaluation batch size."""
        import torch

        tok, bs, preds = subject.extra["tokenizer"], ctx.eval_batch_size, []
        with torch.inference_mode():
            for i in range(0, n, bs):
                enc = {k: v.to(ctx.device) for k, v in self.encode(tok, i, min(i + bs, n)).items()}
                preds.append(subject.model(**enc).logits.argmax(-1).cpu())
        return torch.cat(preds)

    def evaluate(self, subject: Subject, ctx: RunContext) -> Evaluation:
        import numpy as np

        n = ctx.budget.pick(len(self.labels), min(SMOKE_EVAL_SIZE, len(self.labels)))
        pred = self.predict(subject, ctx, n).numpy().astype(np.int64)
        correct = (pred == self.labels[:n]).astype(np.float64)
        return Evaluation(float(correct.mean()), correct, pred)

    def fidelity(self, reference: Evaluation, method: Evaluation) -> tuple[str, float]:
        import numpy as np

        return "prediction_agreement", float((np.asarray(reference.outputs) == np.asarray(method.outputs)).mean())

    def workload(self, subject: Subject, ctx: RunContext) -> tuple[Callable[[], object], int, str]:
        import torch

        m = min(ctx.batch_size, len(self.labels))
        enc = {k: v.to(ctx.device) for k, v in self.encode(subject.extra["tokenizer"], 0, m).items()}

        def run() -> "torch.Tensor":
            with torch.inference_mode():
                return subject.model(**enc).logits

        return run, m, (f"seconds to classify the first {m} {self.glue.split} examples in one batch (padded to "
                        f"{enc['input_ids'].shape[1]} tokens; items are examples)")


@register_task("glue-sst2", modality="text-classification", tier="full", metric="accuracy", higher_is_better=True,
               version="1", summary="GLUE SST-2 validation (sentiment); fine-tuned BERT-base reference, accuracy")
class GlueSST2(GlueTask):
    glue = SST2


@register_task("glue-mnli", modality="text-classification", tier="full", metric="accuracy", higher_is_better=True,
               version="1", summary="GLUE MNLI validation-matched (entailment); fine-tuned BERT-base reference, "
                                    "accuracy")
class GlueMNLI(GlueTask):
    glue = MNLI
