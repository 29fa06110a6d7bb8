"""Machinery of `ei-bert` (see `baselines.distillation.ei_bert` for the method and its equations).

- Vocabulary pruning: `token_importance` (attention each token receives), `kept_tokens`, `VocabPruned` (the
  student behind the rebuilt id mapping) and `prune_embeddings`.
- LSQ fake quantization for training: `lsq_quantize`, `QLinear`, `QEmbedding`.
- The int8 runtime: `Int8Linear` (torch.ao's dynamic quantized linear kernel, `quantized::linear_dynamic`, on
  the learned int8 weights and step), `Int8Embedding` (int8 rows, dequantized on lookup), `to_int8`.
- `train_pair`: the student and the teacher trained together, each at its own learning rate.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tasks._kit.classification import Split, TrainRecipe

Q_N, Q_P = 128, 127  # signed 8-bit levels: -Q_N .. Q_P


# torch 2.14 marks quantized tensors deprecated (pytorch#184982); its quantized kernels still take them
DEPRECATED = r".*quantized tensor creation functions.*deprecated"


# ---- stage 1: vocabulary pruning ----------------------------------------------------------------------------

@torch.no_grad()
def token_importance(teacher: nn.Module, x: torch.Tensor, vocab: int, batch: int = 256) -> torch.Tensor:
    """I(t) = sum over sentences, layers, heads and real query positions of the attention paid to each position
    holding token t: float64 [vocab]. `teacher` is packed (forward(x), `.inputs(x)`, `.hf`); the attention
    probabilities are recomputed from its hooked Q and K (softmax of Q K^T / sqrt(d) over the real keys), so
    they do not depend on the attention implementation returning them."""
    from baselines.distillation._encoder import Recorder

    rec = Recorder(teacher.hf)
    score = torch.zeros(vocab, dtype=torch.float64)
    try:
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            kw = teacher.inputs(xb)
            teacher(xb)
            real = kw["attention_mask"].bool()
            received = 0
            for layer in range(1, len(rec.hidden)):
                att = torch.softmax(rec.scores(layer).masked_fill(~real[:, None, None, :], float("-inf")), dim=-1)
                received = received + (att * real[:, None, :, None]).sum(dim=(1, 2))  # [B, L_k]
            score.index_add_(0, kw["input_ids"][real].cpu(), received[real].double().cpu())
    finally:
        rec.remove()
    return score


def kept_tokens(importance: torch.Tensor, counts: torch.Tensor, special: list[int], max_vocab: int) -> torch.Tensor:
    """The token ids kept, ascending: the special tokens, then the used tokens (count > 0) by importance, then by
    count, up to `max_vocab` in all. Tokens the training data never uses are dropped (they map to unknown)."""
    special = sorted(set(special))
    if max_vocab < len(special):
        raise ValueError(f"max_vocab={max_vocab} is below the tokenizer's {len(special)} special tokens")
    used = torch.nonzero(counts > 0).flatten().tolist()
    used = [t for t in used if t not in set(special)]
    used.sort(key=lambda t: (-float(importance[t]), -int(counts[t]), t))
    return torch.tensor(sorted(special + used[:max_vocab - len(special)]), dtype=torch.int64)


def remap_table(kept: torch.Tensor, vocab: int, unk_id: int) -> torch.Tensor:
    """old id -> new id: kept tokens by rank, every other id to the new id of the unknown token."""
    if unk_id not in set(kept.tolist()):
        raise ValueError("the unknown token must be kept")
    table = torch.full((vocab,), -1, dtype=torch.int64)
    table[kept] = torch.arange(kept.numel())
    table[table < 0] = int(table[unk_id])
    dtype = torch.int16 if kept.numel() <= torch.iinfo(torch.int16).max else torch.int32
    return table.to(dtype)


class VocabPruned(nn.Module):
    """The student behind the pruned vocabulary: it reads the task's original token ids and maps them through
    `remap` (stored as a persistent buffer: it is the rebuilt tokenizer mapping) before the embedding.

    With `packer` (a module whose `inputs(x)` unpacks the task's packed batches, e.g. arith-nli's own wrapper)
    it is a packed model: `forward(x) -> logits` and `inputs(x)`. Without one it is a Hugging Face model:
    `forward(input_ids=..., ...) -> output with .logits`. The packer is kept outside the module tree (it only
    supplies `inputs`), so its own copy of a model is never counted or serialized."""

    def __init__(self, hf: nn.Module, remap: torch.Tensor, packer: nn.Module | None = None):
        super().__init__()
        self.hf = hf
        self.register_buffer("remap", remap)
        self.__dict__["packer"] = packer

    @property
    def packed(self) -> bool:
        return self.packer is not None

    def inputs(self, x: torch.Tensor) -> dict:
        kw = dict(self.packer.inputs(x))
        kw["input_ids"] = self.remap[kw["input_ids"]].long()
        return kw

    def forward(self, x: torch.Tensor | None = None, **kw):
        if x is not None:
            return self.hf(**self.inputs(x)).logits
        kw["input_ids"] = self.remap[kw["input_ids"]].long()
        return self.hf(**kw)


def prune_embeddings(hf: nn.Module, kept: torch.Tensor) -> None:
    """Keep the rows `kept` of the word-embedding matrix (in place), and the config's vocabulary size with it."""
    emb = hf.get_input_embeddings()
    new = nn.Embedding(kept.numel(), emb.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(emb.weight[kept])
    hf.set_input_embeddings(new)
    hf.config.vocab_size = kept.numel()


# ---- stage 3: LSQ fake quantization --------------------------------------------------------------------------

def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """s forward, g * ds backward (LSQ's step-size gradient scale)."""
    return (s - s * g).detach() + s * g


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """round(v) forward, the identity backward (straight-through estimator)."""
    return (v.round() - v).detach() + v


def lsq_quantize(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """v_hat = round(clamp(v / s, -Q_N, Q_P)) * s, with the STE through round and the step-size gradient scaled
    by g = 1 / sqrt(N Q_P) (LSQ, Esser et al. 2020, eqs. 1-2 and section 2.2)."""
    s = _grad_scale(s, 1.0 / math.sqrt(v.numel() * Q_P))
    return _round_ste(torch.clamp(v / s, -Q_N, Q_P)) * s


def lsq_init(v: torch.Tensor) -> torch.Tensor:
    """LSQ's initial step: 2 mean|v| / sqrt(Q_P)."""
    return (2 * v.detach().abs().mean() / math.sqrt(Q_P)).clamp(min=1e-8).reshape(())


def reduce_range() -> bool:
    """Whether the CPU's quantized engine quantizes activations to 7 bits (x86/fbgemm do, against overflow in
    their 16-bit intermediate sums; qnnpack/onednn use 8)."""
    return torch.backends.quantized.engine in ("x86", "fbgemm")


def fake_dynamic_act(x: torch.Tensor, reduce: bool) -> torch.Tensor:
    """x as `quantized::linear_dynamic` sees it: quantized per tensor to quint8 with the batch's min/max range
    (torch's own `quantize_per_tensor_dynamic`, the kernel's rule), dequantized; the STE backward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED)
        q = torch.quantize_per_tensor_dynamic(x.detach().float().contiguous(), torch.quint8, reduce).dequantize()
    return (q - x).detach() + x


class QLinear(nn.Module):
    """A Linear trained with LSQ-quantized int8 weights and the runtime's dynamic activation quantization."""

    def __init__(self, lin: nn.Linear, reduce: bool):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.step = nn.Parameter(lsq_init(lin.weight))
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_dynamic_act(x, self.reduce), lsq_quantize(self.weight, self.step), self.bias)


class QEmbedding(nn.Module):
    """An Embedding trained with LSQ-quantized int8 rows (one step for the matrix)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.weight = emb.weight
        self.step = nn.Parameter(lsq_init(emb.weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, lsq_quantize(self.weight, self.step))


def int8_codes(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w.detach() / s.detach()), -Q_N, Q_P).to(torch.int8)


class Int8Linear(nn.Module):
    """y = linear_dynamic(x, prepack(W_q, b)): torch.ao's int8 kernel (`torch.ops.quantized.linear_dynamic`):
    x quantized per batch to (u)int8, the int8 product accumulated in int32, rescaled to float. The state dict
    holds the int8 codes, the float step and the bias; the engine's packed form is rebuilt from them on use."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None, reduce: bool):
        super().__init__()
        self.weight_int8 = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("step", step.detach().float().reshape(()).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.reduce = reduce
        self._packed = None
        self.calls = 0  # forward passes run by the int8 kernel (method_stats reads it)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _pack(self):
        if self._packed is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=DEPRECATED)
                w = torch._make_per_tensor_quantized_tensor(self.weight_int8.detach().cpu(), float(self.step), 0)
            bias = None if self.bias is None else self.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(w, bias)
        return self._packed

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._pack(), self.reduce).to(x.dtype)


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 codes with one float step; a lookup gathers int8 rows and scales them."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor):
        super().__init__()
        self.weight_int8 = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("step", step.detach().float().reshape(()).clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].to(self.step.dtype) * self.step


def _swap(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every submodule m for which make(m) is not None by make(m); returns how many were replaced."""
    n = 0
    for name, child in list(model.named_children()):
        new = make(child)
        if new is not None:
            setattr(model, name, new)
            n += 1
        else:
            n += _swap(child, make)
    return n


def to_fake_quant(model: nn.Module, reduce: bool) -> int:
    """Every Linear and Embedding of `model` becomes its LSQ twin (same weights, a learned step each)."""
    return _swap(model, lambda m: QLinear(m, reduce) if type(m) is nn.Linear
                 else QEmbedding(m) if type(m) is nn.Embedding else None)


def to_int8(model: nn.Module) -> int:
    """Every LSQ module of `model` becomes its int8 runtime module, with the codes round(clamp(w / s))."""
    def make(m):
        if isinstance(m, QLinear):
            return Int8Linear(int8_codes(m.weight, m.step), m.step, m.bias, m.reduce)
        if isinstance(m, QEmbedding):
            return Int8Embedding(int8_codes(m.weight, m.step), m.step)
        return None
    return _swap(model, make)


def int8_calls(model: nn.Module) -> int:
    return sum(m.calls for m in model.modules() if isinstance(m, Int8Linear))


# ---- stage 2: the student and the teacher trained together ----------------------------------------------------

def train_pair(student: nn.Module, teacher: nn.Module | None, data: "Split", recipe: "TrainRecipe", ctx,
               steps: int, seed: int, teacher_lr: float, loss_fn, description: str):
    """`steps` Adam steps over shuffled batches of `data` (the recipe's batch size, warm-up and cosine, clipping).
    loss_fn(x, y) -> (student loss, teacher loss or None). The student's parameters train at the recipe's rate;
    the teacher's (when given) at `teacher_lr` on its own loss, each under its own clipping."""
    from tasks._kit.classification import TrainStats, _warmup_cosine, seed_everything

    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": recipe.lr}]
    if teacher is not None:
        groups.append({"params": [p for p in teacher.parameters() if p.requires_grad], "lr": teacher_lr})
    opt = torch.optim.Adam(groups, weight_decay=recipe.weight_decay)
    warm = min(recipe.warmup_steps, max(1, steps // 10)) if recipe.warmup_steps else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup_cosine, warm=warm, total=steps))
    x_all, y_all = data.x.to(ctx.device), data.y.to(ctx.device)
    n, b = x_all.shape[0], recipe.batch_size
    stats, perm, pos = TrainStats(), torch.randperm(n, generator=gen), 0
    student.train()
    if teacher is not None:
        teacher.train()
    t0 = time.perf_counter()
    with ctx.progress.step(description, total=steps) as advance:
        for _ in range(steps):
            if pos + b > n and pos > 0:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + b].to(ctx.device)
            pos += b
            loss_s, loss_t = loss_fn(x_all[idx], y_all[idx])
            opt.zero_grad(set_to_none=True)
            (loss_s if loss_t is None else loss_s + loss_t).backward()
            if recipe.clip:
                for g in groups:
                    torch.nn.utils.clip_grad_norm_(g["params"], recipe.clip)
            opt.step()
            sched.step()
            stats.steps += 1
            stats.samples_seen += int(idx.shape[0])
            advance(1)
    stats.seconds = time.perf_counter() - t0
    student.eval()
    if teacher is not None:
        teacher.eval()
    return stats
