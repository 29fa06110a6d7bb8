"""`layer-drop`: remove the transformer blocks whose output is closest to their input (Men et al., 2024,
"ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", arXiv:2403.03853).

Block influence of block i, measured on calibration data from the task's training split:

    BI_i = 1 - E_t [ x_{i,t} . x_{i+1,t} / ( ||x_{i,t}|| ||x_{i+1,t}|| ) ],

x_{i,t} the hidden state entering block i at token t and x_{i+1,t} the one leaving it, averaged over the real
(non-padding) calibration tokens. All BIs come from one pass through the unpruned model (as in the paper), and
the `layers` blocks with the lowest BI are removed: the block after a removed one reads the removed block's
input instead of its output (a low BI says the two are nearly parallel), and no weight changes.

The blocks are really removed: the block list is rebuilt without them, `config.num_hidden_layers` (and
`config.layer_types`, where the model has one) follow, and each kept block's `layer_idx` (its KV-cache slot)
is renumbered, so the smaller model generates with a smaller cache and is timed as what it is. The speedup is
structural and shows on a CPU. Runs on decoder LMs (Llama, Qwen) and on encoders (BERT), whose blocks are
the same kind of residual stack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from baselines.base import Applied, Cost, Method
from bench.config import ConfigError, check_range
from bench.api import EncoderData, TrainingRows
from bench.registry import register_method


@dataclass(frozen=True)
class LayerDropConfig:
    layers: int = 1  # blocks removed (of the arith reference's 4; the paper removes about a quarter)
    calibration_samples: int = 128  # training examples the block influence is averaged over

    def validate(self) -> None:
        check_range("layers", self.layers, lo=0)
        check_range("calibration_samples", self.calibration_samples, lo=1)


def block_influence(model, batches) -> list[float]:
    """BI of every block of `model` (unchanged), averaged over the real tokens of `batches`."""
    import torch

    from baselines.pruning import _calib

    _, _, blocks = _calib.find_blocks(model)
    inputs = _calib.capture_block_inputs(model, batches)
    out = []
    for block in blocks:
        outs = _calib.run_block(block, inputs)
        total, count = 0.0, 0
        for inp, y in zip(inputs, outs):
            cos = torch.nn.functional.cosine_similarity(inp.hidden.float(), y.float(), dim=-1)[inp.mask]
            total += float(cos.double().sum())
            count += int(cos.numel())
        out.append(1.0 - total / max(1, count))
        inputs = [type(inp)(h, inp.args, inp.kwargs, inp.mask) for inp, h in zip(inputs, outs)]
    return out


def drop_blocks(model, drop: list[int]) -> None:
    """Remove the blocks with the given indices from `model` in place (see the module docstring)."""
    import torch.nn as nn

    from baselines.pruning import _calib

    parent, attr, blocks = _calib.find_blocks(model)
    keep = [i for i in range(len(blocks)) if i not in set(drop)]
    new = nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(new):
        for m in block.modules():
            if hasattr(m, "layer_idx") and isinstance(m.layer_idx, int):
                m.layer_idx = j
    setattr(parent, attr, new)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]


@register_method("layer-drop", family="pruning", paper="Men et al., ShortGPT: Layers in Large Language Models are "
                 "More Redundant Than You Expect", year=2024, url="https://arxiv.org/abs/2403.03853",
                 modalities=("causal-lm", "text-classification"),
                 beyond_compute=("a removed block also takes its per-layer framework overhead (kernel launches, "
                                 "Python dispatch) with it, which dominates a small model's decoding on the CPU "
                                 "and which the MAC count does not see"),
                 requires={"causal-lm": (TrainingRows,), "text-classification": (EncoderData,)},
                 summary="remove the blocks with the lowest block influence 1 - cos(input, output), measured on "
                         "training data")
class LayerDrop(Method):
    Config = LayerDropConfig

    def apply(self, subject, task, ctx) -> Applied:
        import copy

        from baselines.pruning import _calib

        cfg = self.config
        t0 = time.perf_counter()
        model = copy.deepcopy(subject.model).float()
        hf = _calib.hf_model(model)
        n_blocks = len(_calib.find_blocks(hf)[2])
        if cfg.layers >= n_blocks:
            raise ConfigError(f"layer-drop: layers={cfg.layers} would remove all {n_blocks} blocks of "
                              f"{task.spec.name!r}'s model; valid: 0 to {n_blocks - 1}")
        batches = _calib.calibration_batches(task, task.prepare(model, ctx), ctx, cfg.calibration_samples)
        bi = block_influence(hf, batches)
        drop = sorted(sorted(range(n_blocks), key=lambda i: (bi[i], i))[:cfg.layers])
        drop_blocks(hf, drop)
        cost = Cost(time.perf_counter() - t0, len(batches), sum(len(b["input_ids"]) for b in batches),
                    f"one pass over {_calib.token_count(batches)} calibration tokens for the block influences, "
                    f"then {len(drop)} of {n_blocks} blocks removed")
        ctx.progress.log("layer-drop: block influence " + ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(bi))
                         + f"; removed {drop}")
        stats = {f"block_influence_{i}": v for i, v in enumerate(bi)}
        stats.update({f"dropped_block_{k}": float(i) for k, i in enumerate(drop)},
                     blocks_before=float(n_blocks), blocks_after=float(n_blocks - len(drop)))
        return Applied(task.prepare(model, ctx), cost, runtime_exploits_sparsity=False, stats=lambda: stats)
