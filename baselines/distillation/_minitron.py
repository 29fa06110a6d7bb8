"""Minitron's pruning half: activation importance, the target shape, and the physical slicing of a Llama-style
decoder (Llama, Qwen2: RMSNorm, SwiGLU MLP, q/k/v/o attention with optional grouped KV heads). The equations are
in `baselines.distillation.minitron`'s docstring; this module implements them.

Hand-written: transformers v5 has no structured pruning of a decoder (it removed `prune_heads`), and the
authors' implementation lives in NVIDIA's Megatron/NeMo Model Optimizer, which needs Megatron models. Here the
pruned network is a real, smaller config of the same class, built fresh and loaded with the sliced weights.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bench.config import ConfigError

if TYPE_CHECKING:
    import torch

AGGREGATIONS = ("mean-l2", "l2-mean", "mean-mean", "l2-l2")  # (over the batch)-(over the sequence)
LAYER_METRICS = ("loss", "bi")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MULTIPLE = 8  # the auto shape rounds hidden and intermediate sizes to multiples of this (fewer ragged kernels)


@dataclass(frozen=True)
class Shape:
    """The geometry of a Llama-style decoder; `param_count` gives its parameters by formula."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = False  # the LM head shares the input embedding
    biases: frozenset = frozenset()  # which of PROJ carry a bias (Qwen2: q, k, v)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def param_count(s: Shape) -> int:
    """Parameters of a decoder of shape `s`:
    V h (1 + untied) + h (final norm) + L [h q + 2 h kv + q h + 3 h f + 2 h + biases],
    q = heads * head_dim, kv = kv_heads * head_dim, f the intermediate size."""
    h, q, kv, f = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    bias_sizes = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": f, "up_proj": f,
                  "down_proj": h}
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h + sum(bias_sizes[b] for b in s.biases)
    return s.vocab * h * (1 if s.tied else 2) + h + s.layers * per_layer


def _parts(block):
    att, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    names = [getattr(att, p, None) for p in PROJ[:4]] + [getattr(mlp, p, None) for p in PROJ[4:]]
    if any(m is None for m in names) or not hasattr(block, "input_layernorm") \
            or not hasattr(block, "post_attention_layernorm"):
        raise ConfigError(f"minitron prunes Llama-style decoders (blocks with self_attn.q/k/v/o_proj, "
                          f"mlp.gate/up/down_proj, input_layernorm and post_attention_layernorm); "
                          f"{type(block).__name__} is not one")
    return att, mlp


def blocks_of(model):
    from baselines.pruning import _calib

    _, _, blocks = _calib.find_blocks(model)
    for b in blocks:
        _parts(b)
    return blocks


def shape_of(model) -> Shape:
    c = model.config
    blocks = blocks_of(model)
    att, mlp = _parts(blocks[0])
    heads = c.num_attention_heads
    head_dim = att.q_proj.out_features // heads
    biases = frozenset(p for p, m in zip(PROJ, [getattr(att, n) for n in PROJ[:4]] +
                                          [getattr(mlp, n) for n in PROJ[4:]]) if m.bias is not None)
    return Shape(vocab=model.get_input_embeddings().num_embeddings, hidden=c.hidden_size, layers=len(blocks),
                 heads=heads, kv_heads=att.k_proj.out_features // head_dim, head_dim=head_dim,
                 intermediate=mlp.gate_proj.out_features,
                 tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight, biases=biases)


# ---- importance -------------------------------------------------------------------------------------------------

class Aggregate:
    """Activations [B, S, C] over the real tokens -> one score per channel C: |a| reduced over the sequence
    (L2: sqrt(sum_t a_t^2); mean: sum_t |a_t| / tokens), then over the batch (mean, or L2 over the examples),
    accumulated over calibration batches."""

    def __init__(self, how: str):
        if how not in AGGREGATIONS:
            raise ConfigError(f"aggregation={how!r} is not one of {', '.join(AGGREGATIONS)}")
        self.batch, self.seq = how.split("-")
        self.total: "torch.Tensor | None" = None
        self.n = 0

    def add(self, x: "torch.Tensor", mask: "torch.Tensor") -> None:
        import torch

        m = mask[..., None].to(torch.float64)
        a = x.detach().to(torch.float64).abs() * m
        if self.seq == "l2":
            per = a.pow(2).sum(dim=1).sqrt()
        else:
            per = a.sum(dim=1) / m.sum(dim=1).clamp(min=1)
        per = per.pow(2) if self.batch == "l2" else per
        s = per.sum(dim=0).cpu()
        self.total = s if self.total is None else self.total + s
        self.n += x.shape[0]

    def result(self) -> "torch.Tensor":
        assert self.total is not None, "no activations were aggregated"
        return self.total.sqrt() if self.batch == "l2" else self.total / max(1, self.n)


@dataclass
class Importance:
    heads: list  # per block: a tensor [heads], the L2 norm of each head's attention output, aggregated
    neurons: list  # per block: a tensor [intermediate], |act(x W_gate^T) * (x W_up^T)| aggregated
    channels: "torch.Tensor"  # [hidden]: the RMSNorm outputs, aggregated per norm, summed over all norms


def width_importance(model, batches, how: str) -> Importance:
    """All three width scores from forward passes over the calibration batches (no gradients)."""
    import torch

    from baselines.pruning import _calib

    blocks = blocks_of(model)
    shape = shape_of(model)
    heads = [Aggregate(how) for _ in blocks]
    neurons = [Aggregate(how) for _ in blocks]
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")
             and getattr(m, "weight", None) is not None and m.weight.shape == (shape.hidden,)]
    channels = [Aggregate(how) for _ in norms]
    mask_now: list = [None]
    handles = []

    def on(agg, reshape=None):
        def hook(module, args, output=None):
            x = args[0] if output is None else output
            x = x if reshape is None else reshape(x)
            agg.add(x, mask_now[0][:, :x.shape[1]])
        return hook

    per_head = lambda x: x.unflatten(-1, (-1, shape.head_dim)).norm(dim=-1)  # noqa: E731 [B, S, heads]
    for b, hd, nr in zip(blocks, heads, neurons):
        att, mlp = _parts(b)
        handles.append(att.o_proj.register_forward_pre_hook(on(hd, per_head)))
        handles.append(mlp.down_proj.register_forward_pre_hook(on(nr)))
    for n, agg in zip(norms, channels):
        handles.append(n.register_forward_hook(on(agg)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask_now[0] = batch["attention_mask"].bool()
                model(**_calib.model_kwargs(batch))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return Importance([a.result() for a in heads], [a.result() for a in neurons],
                      sum((a.result() for a in channels), torch.zeros(shape.hidden, dtype=torch.float64)))


def calibration_loss(model, batches) -> float:
    """Next-token cross-entropy per real token over the calibration batches (the LM loss the paper's depth
    importance compares)."""
    import torch
    import torch.nn.functional as F

    from baselines.pruning import _calib

    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**_calib.model_kwargs(b)).logits[:, :-1].float()
            target = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((target != -100).sum())
    return total / max(1, count)


def layer_importance(model, batches, metric: str) -> list[float]:
    """Per block: the calibration loss increase when that block alone is removed ("loss", the paper's LM-loss
    / perplexity criterion), or ShortGPT's block influence 1 - cos(input, output) ("bi",
    `layer_drop.block_influence`). Higher is more important either way."""
    from baselines.pruning import layer_drop

    if metric == "bi":
        return layer_drop.block_influence(model, batches)
    if metric != "loss":
        raise ConfigError(f"layer_metric={metric!r} is not one of {', '.join(LAYER_METRICS)}")
    base = calibration_loss(model, batches)
    out = []
    for i in range(len(blocks_of(model))):
        m = copy.deepcopy(model)
        layer_drop.drop_blocks(m, [i])
        out.append(calibration_loss(m, batches) - base)
    return out


def top(scores, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (ties: the lower index)."""
    vals = [float(v) for v in scores]
    return sorted(sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:k])


# ---- the target shape -------------------------------------------------------------------------------------------

def fit_shape(ref: Shape, target: int, layers: int = 0, hidden: int = 0, heads: int = 0,
              intermediate: int = 0) -> Shape:
    """The pruned shape: `layers` blocks (0: all), explicit `hidden` / `heads` / `intermediate` where given,
    and the other width axes shrunk by one common factor s (rounded: sizes to multiples of `MULTIPLE`, heads to
    whole heads, or whole heads per KV group when the keys and values are grouped), the largest s whose
    parameter count is at most `target`. Width axes all given: `target` is not consulted."""
    base = replace(ref, layers=layers or ref.layers)

    def at(s: float) -> Shape:
        def size(full: int, given: int) -> int:
            return given or min(full, max(MULTIPLE, int(round(s * full / MULTIPLE)) * MULTIPLE))
        if heads:
            nh = heads
        elif ref.kv_heads == ref.heads:
            nh = max(1, int(round(s * ref.heads)))
        else:
            nh = ref.kv_heads * max(1, int(round(s * ref.group)))
        kv = nh if ref.kv_heads == ref.heads else ref.kv_heads
        return replace(base, hidden=size(ref.hidden, hidden), heads=nh, kv_heads=kv,
                       intermediate=size(ref.intermediate, intermediate))

    if hidden and heads and intermediate:
        return at(1.0)
    for i in range(1000, 0, -1):
        shape = at(i / 1000)
        if param_count(shape) <= target:
            return shape
    smallest = at(0.001)
    raise ConfigError(f"minitron: no width of {base.layers} blocks fits {target:,} parameters (the narrowest, "
                      f"{param_count(smallest):,}, does not): keep fewer blocks (layers=1 to {ref.layers - 1}) or "
                      f"raise target_params")


def check_shape(ref: Shape, s: Shape) -> None:
    for name, got, full in (("layers", s.layers, ref.layers), ("hidden", s.hidden, ref.hidden),
                            ("heads", s.heads, ref.heads), ("intermediate", s.intermediate, ref.intermediate)):
        if not 1 <= got <= full:
            raise ConfigError(f"minitron: {name}={got} is outside the reference's range 1 to {full}")
    if ref.kv_heads != ref.heads and s.heads % ref.kv_heads:
        raise ConfigError(f"minitron: heads={s.heads} must be a multiple of the reference's {ref.kv_heads} key/"
                          f"value heads (its query heads are grouped; every group keeps the same number)")


# ---- slicing ----------------------------------------------------------------------------------------------------

@dataclass
class Keep:
    """What survives: block indices, hidden channels, and per kept block its query heads, key/value heads and
    MLP neurons (all sorted: kept units keep their order)."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]


def choose(ref: Shape, target: Shape, imp: Importance, layers: list[int]) -> Keep:
    """The highest-scoring units for `target`: channels globally; per block the top neurons, and the top query
    heads within the top key/value groups (a group scores the sum of its query heads; without grouping a group
    is one head)."""
    per_group = target.heads // target.kv_heads
    heads, kvs = [], []
    for li in layers:
        s = imp.heads[li]
        groups = [float(s[g * ref.group:(g + 1) * ref.group].sum()) for g in range(ref.kv_heads)]
        kept_groups = top(groups, target.kv_heads)
        q = []
        for g in kept_groups:
            q += [g * ref.group + j for j in top(s[g * ref.group:(g + 1) * ref.group], per_group)]
        heads.append(q)
        kvs.append(kept_groups)
    return Keep(layers, top(imp.channels, target.hidden), heads, kvs,
                [top(imp.neurons[li], target.intermediate) for li in layers])


_LAYER = re.compile(r"^(?P<pre>.*\.)(?P<idx>\d+)\.(?P<rest>.+)$")


def slice_model(model, keep: Keep):
    """A new model of the same class with a smaller config, holding exactly the kept weights (see `Keep`)."""
    import torch

    from baselines.pruning import _calib

    ref = shape_of(model)
    _, attr, _ = _calib.find_blocks(model)
    d = ref.head_dim

    def rows(units: list[int]) -> "torch.Tensor":
        return torch.tensor([u * d + i for u in units for i in range(d)], dtype=torch.long)

    h = torch.tensor(keep.hidden, dtype=torch.long)
    out = {}
    for name, t in model.state_dict().items():
        m = _LAYER.match(name)
        if m and m.group("pre").endswith(attr + "."):
            old = int(m.group("idx"))
            if old not in keep.layers:
                continue
            j = keep.layers.index(old)
            rest = m.group("rest")
            q, kv, f = rows(keep.heads[j]), rows(keep.kv_heads[j]), torch.tensor(keep.neurons[j], dtype=torch.long)
            first = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": f, "up_proj": f,
                     "down_proj": h}
            second = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h,
                      "down_proj": f}
            proj = rest.split(".")[-2] if rest.count(".") >= 1 else ""
            if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                t = t[h]
            elif proj in first and rest.endswith(".weight"):
                t = t[first[proj]][:, second[proj]]
            elif proj in first and rest.endswith(".bias"):
                t = t[first[proj]]
            else:
                raise ConfigError(f"minitron cannot slice {name!r} (a Llama-style block holds only norms and the "
                                  f"q/k/v/o and gate/up/down projections)")
            out[f"{m.group('pre')}{j}.{rest}"] = t.clone()
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            out[name] = t[:, h].clone()
        elif name.endswith("norm.weight") and t.shape == (ref.hidden,):
            out[name] = t[h].clone()
        else:
            raise ConfigError(f"minitron cannot slice {name!r}: not part of a Llama-style decoder")
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size = len(keep.hidden)
    cfg.num_hidden_layers = len(keep.layers)
    cfg.num_attention_heads = len(keep.heads[0]) if keep.heads else ref.heads
    cfg.num_key_value_heads = len(keep.kv_heads[0]) if keep.kv_heads else ref.kv_heads
    cfg.intermediate_size = len(keep.neurons[0]) if keep.neurons else ref.intermediate
    cfg.head_dim = d
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = [cfg.layer_types[i] for i in keep.layers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        new = type(model)(cfg)
    missing, unexpected = new.load_state_dict(out, strict=False)
    allowed = {"lm_head.weight"} if ref.tied else set()
    if unexpected or set(missing) - allowed:
        raise ConfigError(f"minitron: the sliced weights do not fit the smaller config (missing {missing}, "
                          f"unexpected {unexpected})")
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.to(next(model.parameters()).device).eval()
