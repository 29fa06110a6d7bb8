"""Shared machinery of the encoder distillation methods (`distilbert`, `tinybert`, `minilm`) on `arith-nli` and
`glue-*`.

Data and loop. The task's training split (`bench.api.TrainingSplit`) is one `tasks._kit.classification.Split` of
packed integer batches `x = [N, k, L]` (one row per model input), trained by the shared
`tasks._kit.classification.fit` (Adam, cosine, the smoke budget's cap): arith-nli's own encoded pairs (token ids,
segment ids, read by its `PairClassifier.inputs`), glue's train split tokenized as its evaluation split and
read by `Packed`, a module with the same interface around a Hugging Face classifier. The recipe is the task's
`student_recipe` (`bench.api.Student`; glue's is BERT's GLUE fine-tuning).

Internals. `Recorder` hooks a BERT (`model.base_model.embeddings`, `.encoder.layer`) and keeps, for the last
forward pass, the embedding output, each layer's output and each layer's query, key and value projections
(`[B, L, H d_head]`, heads concatenated), from which `scores` gives the unnormalised attention scores
Q K^T / sqrt(d_head) (transformers returns only the softmax probabilities; TinyBERT fits the scores) and
`relation_scores` any self-relation of two projections split into a chosen number of heads (MiniLM's Q-K and
V-V relations). Losses are averaged over real tokens (and real token pairs for attention), never padding.

The control. The distilled student's architecture, from a fresh seeded init, trained by the same loop and
recipe on the labels alone, cached (weights, its seconds, its evaluation) per task, data, architecture, recipe,
seed and device.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

from baselines.base import ControlResult
from bench.api import Student, TrainingSplit, require
from tasks._kit.classification import TrainRecipe

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Task
    from tasks._kit.classification import Split



@functools.cache
def packed_class():
    """`Packed(hf, keys)`: forward(x [B, k, L]) -> logits, x's rows being `keys` (an attention mask among them)."""
    from torch import nn

    class Packed(nn.Module):
        def __init__(self, hf, keys: tuple[str, ...]):
            super().__init__()
            self.hf, self.keys = hf, tuple(keys)

        def inputs(self, x: "torch.Tensor") -> dict:
            n = int(x[:, self.keys.index("attention_mask")].sum(dim=1).max())
            return {k: x[:, i, :n] for i, k in enumerate(self.keys)}

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.hf(**self.inputs(x)).logits

    return Packed


def packed(model, task: "Task"):
    """The model with `.hf` and `.inputs(x)`: the task's own wrapper (arith-nli's), or a Hugging Face model
    wrapped to read the task's packed training split (glue's: `model_keys()` stacked)."""
    return model if hasattr(model, "inputs") else packed_class()(model, task.model_keys())


def unpacked(model, task: "Task"):
    """What the task's subject holds: arith-nli's wrapper itself, a glue model without `Packed`."""
    return model if not isinstance(model, packed_class()) else model.hf


def training_data(task: "Task") -> "Split":
    return require(task, TrainingSplit).training_split()


def recipe_of(task: "Task") -> TrainRecipe:
    return require(task, Student).student_recipe


def frozen(model, ctx: "RunContext"):
    model = copy.deepcopy(model).to(ctx.device).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_and_student(subject, task: "Task", ctx: "RunContext") -> tuple:
    """(teacher, student, data, recipe): the subject frozen, the task's own student (fresh, packed, on the
    device), the training split and the student recipe."""
    student = packed(require(task, Student).build_student(), task).to(ctx.device)
    return frozen(packed(subject.model, task), ctx), student, training_data(task), recipe_of(task)


def fresh_like(model, config, seed: int = 0):
    """A fresh, seeded init of `model`'s packed architecture with `config`."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, packed_class()):
            return packed_class()(type(model.hf)(config), model.keys)
        return type(model)(config)  # arith-nli's PairClassifier(config)


# ---- internals ---------------------------------------------------------------------------------------------

def bert_parts(model):
    """(embeddings, layers) of a BERT-style encoder inside `model` (packed or not)."""
    hf = getattr(model, "hf", model)
    base = getattr(hf, "base_model", hf)
    emb, enc = getattr(base, "embeddings", None), getattr(base, "encoder", None)
    if emb is None or not hasattr(enc, "layer"):
        raise ValueError(f"{type(hf).__name__} is not a BERT-style encoder (embeddings + encoder.layer): "
                         f"distilbert, tinybert and minilm support BERT models (arith-nli, glue-sst2, glue-mnli)")
    return emb, enc.layer


def split_heads(t: "torch.Tensor", heads: int) -> "torch.Tensor":
    """[B, L, D] -> [B, heads, L, D / heads]: consecutive slices of the last dimension, as BERT splits its heads."""
    return t.view(*t.shape[:2], heads, -1).transpose(1, 2)


def relation_scores(a: "torch.Tensor", b: "torch.Tensor", heads: int) -> "torch.Tensor":
    """[B, heads, L, L]: a_r b_r^T / sqrt(d_r) for each of `heads` equal slices (width d_r) of a and b [B, L, D]."""
    a, b = split_heads(a, heads), split_heads(b, heads)
    return a @ b.transpose(-1, -2) * a.shape[-1] ** -0.5


class Recorder:
    """Forward hooks on a BERT that keep the last pass's embedding output, layer outputs and Q/K/V projections."""

    PROJECTIONS = ("query", "key", "value")

    def __init__(self, model):
        emb, layers = bert_parts(model)
        self.hidden: list = [None] * (len(layers) + 1)  # [embeddings, layer 1, ..., layer N]
        self.qkv: list = [[None] * len(self.PROJECTIONS) for _ in layers]
        self.heads = [layer.attention.self.num_attention_heads for layer in layers]
        self.handles = [emb.register_forward_hook(self._keep(self.hidden, 0))]
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._keep(self.hidden, i + 1)))
            for j, name in enumerate(self.PROJECTIONS):
                projection = getattr(layer.attention.self, name)
                self.handles.append(projection.register_forward_hook(self._keep(self.qkv[i], j)))

    @staticmethod
    def _keep(store, i):
        def hook(module, args, output):
            store[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def projections(self, layer: int) -> tuple:
        """(Q, K, V) [B, L, H d_head] of layer `layer` (1-based) in the last pass, heads concatenated."""
        return tuple(self.qkv[layer - 1])

    def scores(self, layer: int) -> "torch.Tensor":
        """Unnormalised attention scores [B, H, L, L] of layer `layer` (1-based) in the last pass."""
        q, k, _ = self.projections(layer)
        return relation_scores(q, k, self.heads[layer - 1])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def token_mask(model, x: "torch.Tensor") -> "torch.Tensor":
    """[B, L] bool of the real tokens as the packed model reads batch x (padding columns cut)."""
    return model.inputs(x)["attention_mask"].bool()


def masked_mse(a: "torch.Tensor", b: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """Mean squared error over the positions where `mask` (broadcast to a's leading dims) is set."""
    m = mask.to(a.dtype)
    while m.dim() < a.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(a)
    return ((a - b) ** 2 * m).sum() / m.sum().clamp(min=1)


# ---- training and the control -------------------------------------------------------------------------------

def control(task: "Task", ctx: "RunContext", student, data: "Split", recipe: TrainRecipe, what: str) -> ControlResult:
    """`student`'s architecture from a fresh init trained on the labels alone (see the module docstring)."""
    from bench import cache
    from tasks.base import Evaluation
    from tasks._kit.classification import fit, seed_everything

    config = getattr(student, "hf", student).config
    k = cache.key(task.spec.version, task.data_fingerprint(), config.to_json_string(use_diff=False), recipe,
                  ctx.seed, ctx.budget, ctx.device)
    folder = cache.task_dir(task) / "controls"
    path = folder / f"encoder-student-{k}.safetensors"
    def build() -> tuple[dict, dict]:
        seed_everything(ctx.seed)
        model = fresh_like(student, config).to(ctx.device)
        stats = fit(model, data, recipe, ctx, seed=ctx.seed,
                    description="Training the same student without the teacher (control, cached)")
        return {n: t.detach().clone() for n, t in model.state_dict().items()}, {"seconds": stats.seconds}

    # weights and their cost are one cache entry: a damaged half rebuilds both, never a cached null
    state, cost, digest, _ = cache.cached_bundle(path, build)
    model = fresh_like(student, config)
    model.load_state_dict(state)
    subject = task.prepare(unpacked(model, task), ctx)
    ev_path = folder / f"encoder-student-eval-{cache.key(digest, ctx.profile.name, ctx.seed, ctx.budget)}.json"
    payload, _ = cache.cached_json(ev_path, lambda: task.evaluate(subject, ctx).to_json())
    ev = Evaluation.from_json(payload)
    return ControlResult("student_without_teacher", f"{what}, from a fresh init, trained by the same recipe and "
                         f"seed on the labels alone", ev.value, ev.per_example, cost["seconds"])
