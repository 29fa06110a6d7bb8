"""`head-prune`: remove the least important attention heads of a BERT-style encoder, slicing the weights
(Michel, Levy and Neubig, 2019, "Are Sixteen Heads Really Better than One?", NeurIPS 2019, arXiv:1905.10650).

Importance (the paper's gradient-based proxy): a gate xi_h = 1 multiplies each head's output, and

    I_h = E_x | dL(x) / d xi_h | = E_x | sum_t  Att_h(x)_t . dL(x) / d Att_h(x)_t |,

L the cross-entropy of the task's label, x a training example (per example, then averaged), on
`calibration_samples` examples of the task's training split. As in the paper, the scores are normalised by
their l2 norm within each layer and the heads are then ranked globally: the `share` lowest of all heads are
removed, keeping at least one head in every layer.

Slicing (transformers v5 removed `prune_heads` and `head_mask`, so this is done on the weights): in each layer,
the rows of the query, key and value projections (weights and biases) that belong to a removed head are cut,
and so are the matching input columns of the attention output projection (`attention.output.dense`); the
attention module's `num_attention_heads` and `all_head_size` follow, the head size stays. The model is
smaller by exactly 3 (d_head * hidden + d_head) + hidden * d_head parameters per removed head, and its attention
and projections cost proportionally less: a structural speedup on any runtime. Heads may differ between layers,
so `config.num_attention_heads` keeps the unpruned geometry (it still gives the head size) and
`config.pruned_heads` records {layer: [removed heads]} (the key transformers' own head pruning used).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import EncoderData, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class HeadPruneConfig:
    share: float = 0.5  # share of all attention heads removed (at least one is kept in every layer)
    calibration_samples: int = 256  # labelled training examples the importance is averaged over

    def validate(self) -> None:
        check_range("share", self.share, lo=0, hi=1, hi_open=True)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def attention_modules(model) -> list:
    """The self-attention module (`attention.self`) of every encoder block; the output projection is
    `attention.output.dense` beside it."""
    from baselines.pruning import _calib

    _, _, blocks = _calib.find_blocks(model)
    out = []
    for b in blocks:
        att = getattr(b, "attention", None)
        sa = getattr(att, "self", None)
        if sa is None or not all(hasattr(sa, n) for n in ("query", "key", "value", "num_attention_heads")) \
                or not hasattr(getattr(att, "output", None), "dense"):
            raise ConfigError(f"head-prune supports BERT-style encoders (blocks with attention.self.query/key/value"
                              f" and attention.output.dense); {type(model).__name__} has {type(b).__name__} blocks")
        out.append(att)
    return out


def head_importance(model, batches) -> list["object"]:
    """Michel et al.'s I_h per layer (a tensor [heads] per block), not yet normalised."""
    import torch
    import torch.nn.functional as F

    from baselines.pruning import _calib

    atts = attention_modules(model)
    scores = [torch.zeros(a.self.num_attention_heads, dtype=torch.float64) for a in atts]
    gates: list = [None] * len(atts)
    handles = []
    for li, att in enumerate(atts):
        d = att.self.attention_head_size

        def hook(module, args, _li=li, _d=d):
            x = args[0]
            g = gates[_li]
            return (x * g.repeat_interleave(_d, dim=1).unsqueeze(1).to(x.dtype),)

        handles.append(att.output.dense.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is used
    try:
        with torch.enable_grad():
            for b in batches:
                n = b["input_ids"].shape[0]
                for li, att in enumerate(atts):
                    gates[li] = torch.ones(n, att.self.num_attention_heads, requires_grad=True,
                                           device=b["input_ids"].device)
                logits = model(**_calib.model_kwargs(b)).logits
                loss = F.cross_entropy(logits.float(), b["labels"], reduction="sum")  # per-example gradients
                grads = torch.autograd.grad(loss, gates)
                for li, g in enumerate(grads):
                    scores[li] += g.detach().abs().sum(dim=0).double().cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(int(b["input_ids"].shape[0]) for b in batches)
    return [s / max(1, total) for s in scores]


def choose_heads(importance: list, share: float) -> dict[int, list[int]]:
    """Heads to remove per layer: the round(share * all heads) lowest layer-normalised scores, globally, keeping
    at least one head per layer (ties by layer, then head)."""
    norm = [s / s.norm() if float(s.norm()) > 0 else s for s in importance]
    order = sorted(((float(v), li, h) for li, s in enumerate(norm) for h, v in enumerate(s.tolist())))
    n_remove = int(round(share * len(order)))
    left = {li: len(s) for li, s in enumerate(norm)}
    out: dict[int, list[int]] = {li: [] for li in left}
    for _, li, h in order:
        if n_remove == 0:
            break
        if left[li] > 1:
            out[li].append(h)
            left[li] -= 1
            n_remove -= 1
    return {li: sorted(hs) for li, hs in out.items()}


def slice_heads(att, remove: list[int]) -> None:
    """Cut the given heads out of one BERT attention block in place (see the module docstring)."""
    import torch

    sa, dense = att.self, att.output.dense
    d, n = sa.attention_head_size, sa.num_attention_heads
    keep_heads = [h for h in range(n) if h not in set(remove)]
    if len(keep_heads) == n:
        return
    idx = torch.tensor([h * d + i for h in keep_heads for i in range(d)], device=dense.weight.device)
    with torch.no_grad():
        for name in ("query", "key", "value"):
            lin = getattr(sa, name)
            new = torch.nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None,
                                  device=lin.weight.device, dtype=lin.weight.dtype)
            new.weight.copy_(lin.weight[idx])
            if lin.bias is not None:
                new.bias.copy_(lin.bias[idx])
            setattr(sa, name, new)
        new = torch.nn.Linear(len(idx), dense.out_features, bias=dense.bias is not None,
                              device=dense.weight.device, dtype=dense.weight.dtype)
        new.weight.copy_(dense.weight[:, idx])
        if dense.bias is not None:
            new.bias.copy_(dense.bias)
        att.output.dense = new
    sa.num_attention_heads = len(keep_heads)
    sa.all_head_size = len(keep_heads) * d


def prune_heads(model, remove: dict[int, list[int]]) -> None:
    """Slice every layer's heads in `remove` ({layer: [heads]}) out of `model` and record them in its config."""
    for li, att in enumerate(attention_modules(model)):
        slice_heads(att, remove.get(li, []))
    model.config.pruned_heads = {str(li): hs for li, hs in remove.items() if hs}


@register_method("head-prune", family="pruning", paper="Michel et al., Are Sixteen Heads Really Better than One?",
                 year=2019, url="https://arxiv.org/abs/1905.10650", modalities=("text-classification",),
                 requires={"causal-lm": (TrainingRows,), "text-classification": (EncoderData,)},
                 summary="remove the attention heads of lowest gradient-based importance, slicing Q/K/V rows and "
                         "output-projection columns")
class HeadPrune(Method):
    Config = HeadPruneConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        from baselines.pruning import _calib

        cfg = self.config
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.model).float()
        hf = _calib.hf_model(model)
        heads_before = sum(a.self.num_attention_heads for a in attention_modules(hf))
        batches = _calib.calibration_batches(task, task.prepare(model, ctx), ctx, cfg.calibration_samples)
        importance = head_importance(hf, batches)
        remove = choose_heads(importance, cfg.share)
        prune_heads(hf, remove)
        removed = sum(len(v) for v in remove.values())
        cost = Cost(time.perf_counter() - t0, len(batches), sum(len(b["input_ids"]) for b in batches),
                    f"one forward and backward pass over {sum(len(b['input_ids']) for b in batches)} labelled "
                    f"training examples for the head importances, then {removed} of {heads_before} heads sliced "
                    f"out")
        ctx.progress.log(f"head-prune: removed {removed} of {heads_before} heads: "
                         + "; ".join(f"layer {li}: {hs}" for li, hs in remove.items()))
        stats = {"heads_before": float(heads_before), "heads_after": float(heads_before - removed)}
        stats.update({f"heads_kept_layer_{li}": float(len(imp) - len(remove[li]))
                      for li, imp in enumerate(importance)})
        return Applied(task.prepare(model, ctx), cost, runtime_exploits_sparsity=False, stats=lambda: stats)
