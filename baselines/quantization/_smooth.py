"""Per-input-channel scaling that leaves a block's function unchanged, shared by `awq` and `smoothquant`.

A Linear y = W x reads the same through a scale s > 0 on its input channels,

    y = (W diag(s)) (diag(s)^-1 x),

and the division diag(s)^-1 x costs nothing at run time when it is folded into the operation that produced x:
  - a norm (LayerNorm, RMSNorm) whose output the Linears read directly: its weight (and bias) divided by s
    (q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm` in a pre-norm Llama/Qwen block);
  - a Linear whose output rows are the input channels: its rows (and bias) divided by s (`v_proj` before
    `o_proj` when every query head has its own value head, `up_proj` before `down_proj`, whose input is
    act(gate(x)) * up(x));
otherwise it stays an input multiplier (`InputScaled`: one elementwise product before the Linear).
Every Linear that reads the same x takes the same s (`groups`). A norm's fold is checked on a probe input before
it is used (a norm of another form, e.g. Gemma's (1 + weight), falls back to the multiplier).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

# (what produces the input, how it is folded, the Linears reading it) in a pre-norm Llama/Qwen/Mistral block
LLAMA_GROUPS = (
    ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", "rows", ("self_attn.o_proj",)),
    ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", "rows", ("mlp.down_proj",)),
)


@dataclass
class Group:
    """Linears of one block reading the same input, and what produced it (None: nothing to fold into)."""

    names: tuple[str, ...]
    prev: str | None = None
    kind: str | None = None  # "norm", "rows" or None (an input multiplier)


class InputScaled(nn.Module):
    """A Linear behind an input multiplier: forward(x) = linear(x * inv_scale)."""

    def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale.to(linear.weight.dtype))

    def forward(self, x):
        return self.linear(x * self.inv_scale)


def _linears(block) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _norm_folds(norm) -> bool:
    """Whether dividing the norm's weight (and bias) by s divides its output by s (checked on a probe)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        return False
    probe = copy.deepcopy(norm).float().cpu()  # in float32, whatever the model's dtype; the norm is not touched
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, w.numel(), generator=gen)
    s = torch.rand(w.numel(), generator=gen) + 0.5
    with torch.no_grad():
        before = probe(x)
        _fold_norm(probe, s)
        after = probe(x)
    return torch.allclose(after * s, before, rtol=1e-4, atol=1e-5)


def groups(block, folding: bool = True) -> list[Group]:
    """Every Linear of `block` in exactly one group; the Llama groups (`LLAMA_GROUPS`) where the block has them
    (and where the fold is exact), every other Linear alone behind a multiplier."""
    mods = dict(block.named_modules())
    linears = _linears(block)
    out, covered = [], set()
    for prev, kind, names in LLAMA_GROUPS if folding else ():
        if prev not in mods or not all(n in linears for n in names) or covered & set(names):
            continue
        if kind == "norm" and not _norm_folds(mods[prev]):
            continue
        if kind == "rows" and (not isinstance(mods[prev], nn.Linear)
                               or any(mods[prev].out_features != linears[n].in_features for n in names)):
            continue  # grouped-query attention: o_proj's channels repeat v_proj's
        out.append(Group(names, prev, kind))
        covered |= set(names)
    out += [Group((n,)) for n in linears if n not in covered]
    return out


def _fold_norm(norm, s):
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


def apply_scale(block, group: Group, s: torch.Tensor) -> None:
    """In place: the group's Linears take W diag(s), and their input diag(s)^-1 x (folded, or a multiplier)."""
    mods = dict(block.named_modules())
    with torch.no_grad():
        for n in group.names:
            lin = mods[n]
            lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))
        if group.kind == "norm":
            _fold_norm(mods[group.prev], s)
        elif group.kind == "rows":
            prev = mods[group.prev]
            prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            for n in group.names:
                parent_name, _, attr = n.rpartition(".")
                parent = mods[parent_name] if parent_name else block
                setattr(parent, attr, InputScaled(mods[n], 1 / s))
