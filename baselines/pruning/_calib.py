"""Calibration for the language-model pruning methods: data from the task's training split, the model's
transformer blocks, and the layer-by-layer pass that Wanda and SparseGPT prune in.

Data (`calibration_batches`): `n` examples drawn without replacement, seeded by the run's seed, from the task's
*training* split, through the capabilities the task declares (`bench.api`):
  - causal LMs (`TrainingRows`): the problem and its worked answer as the model was trained to read them,
    `Question: <q>\\nAnswer: <answer><EOS>` (arith's generated problems, gsm8k's lm-eval train split);
  - encoders (`EncoderData`): the task's labelled training examples as model keyword arguments
    (arith-nli's encoded pairs through the subject's own `model.inputs`, glue's train split tokenized as
    its evaluation split is).
Each batch is the Hugging Face model's keyword arguments, right-padded, with `attention_mask` marking the real
tokens: statistics are taken over real tokens only. Labels (`labels`) come along for encoders, for
gradient-based importance.

The papers use 128 random 2,048-token windows of C4 (Wanda, SparseGPT); here an example is one training
problem, which is what the task's model reads, and the default of 128 examples keeps the papers' count.

Layer by layer (`sequential_blocks`): the inputs of the first block are captured once (a pre-hook stops the
forward pass there, keeping the position embeddings and masks the model built for each batch), then each
block in turn is calibrated on its inputs, pruned, and run again to give the next block's inputs, so later
blocks are calibrated on what the already-pruned blocks produce, as in both papers' reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from bench.api import EncoderData, TrainingRows, pick, require

if TYPE_CHECKING:
    import torch

    from baselines.base import Applied
    from tasks.base import RunContext, Subject, Task

BATCH = 16  # calibration examples per forward pass


def hf_model(model) -> "torch.nn.Module":
    """The Hugging Face model itself (arith-nli's subject wraps it as `.hf`)."""
    return getattr(model, "hf", model)


def find_blocks(model) -> tuple["torch.nn.Module", str, "torch.nn.ModuleList"]:
    """(parent, attribute, ModuleList) of the transformer blocks: the ModuleList of identical blocks holding
    the most parameters (`model.layers` in a Llama or Qwen, `bert.encoder.layer` in a BERT)."""
    import torch.nn as nn

    best, best_size = None, -1
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not isinstance(child, nn.ModuleList) or len(child) == 0:
                continue
            if len({type(b) for b in child}) != 1:
                continue
            size = sum(p.numel() for p in child.parameters())
            if size > best_size:
                best, best_size = (parent, attr, child), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to prune")
    return best


def block_linears(block) -> dict[str, "torch.nn.Linear"]:
    """The Linear layers inside one block, by name: what Wanda, SparseGPT and per-layer magnitude prune
    (embeddings, the LM head and classifier heads outside the blocks stay dense, as in the papers)."""
    import torch.nn as nn

    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def all_block_linears(model) -> list["torch.nn.Linear"]:
    _, _, blocks = find_blocks(model)
    return [lin for b in blocks for lin in block_linears(b).values()]


# ---- data ------------------------------------------------------------------------------------------------------

def _lm_texts(task: "Task", n: int, seed: int) -> list[str]:
    from tasks._kit import lm

    rows = require(task, TrainingRows).training_rows()
    return [lm.prompt_of(rows[i]["question"]) + " " + rows[i]["answer"] for i in pick(len(rows), n, seed)]


def calibration_batches(task: "Task", subject: "Subject", ctx: "RunContext", n: int,
                        batch: int = BATCH) -> list[dict[str, Any]]:
    """`n` training examples (see the module docstring) as batches of model keyword arguments on the
    subject's device; every batch has an `attention_mask`, encoder batches also `labels`."""
    import torch

    seed = ctx.seed
    device = next(subject.model.parameters()).device
    out: list[dict[str, Any]] = []
    if subject.kind == "causal-lm":
        tok = subject.extra["tokenizer"]
        texts = _lm_texts(task, n, seed)
        ids = [t + [tok.eos_token_id] for t in tok(texts, add_special_tokens=False)["input_ids"]]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            width = max(len(s) for s in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, s in enumerate(chunk):
                x[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            out.append({"input_ids": x.to(device), "attention_mask": mask.to(device), "use_cache": False})
        return out
    if subject.kind != "text-classification":
        raise ValueError(f"calibration supports causal-lm and text-classification tasks, not {subject.kind!r}")
    return require(task, EncoderData).encoder_batches(subject, n, seed, batch)


def model_kwargs(batch: dict) -> dict:
    """A calibration batch without its labels: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k != "labels"}


def token_count(batches: list[dict]) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


# ---- layer by layer --------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@dataclass
class BlockInput:
    """One batch's input to a block: the hidden states and the other arguments the model passed."""

    hidden: "torch.Tensor"
    args: tuple
    kwargs: dict
    mask: "torch.Tensor"  # [B, L] bool, the real tokens


def capture_block_inputs(model, batches: list[dict]) -> list[BlockInput]:
    """The first block's inputs for every batch (the forward pass stops there)."""
    import torch

    _, _, blocks = find_blocks(model)
    seen: list[tuple] = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for b in batches:
                seen.clear()
                try:
                    model(**model_kwargs(b))
                except _Stop:
                    pass
                (args, kwargs), = seen
                if args:
                    hidden, args = args[0], tuple(args[1:])
                else:
                    kwargs = dict(kwargs)
                    hidden = kwargs.pop("hidden_states")
                mask = b["attention_mask"][:, :hidden.shape[1]].bool()
                out.append(BlockInput(hidden, args, dict(kwargs), mask))
    finally:
        handle.remove()
    return out


def run_block(block, inputs: list[BlockInput], on_batch: Callable[[BlockInput], None] | None = None
              ) -> list["torch.Tensor"]:
    """The block's output for each batch (`on_batch` is told which batch is about to run)."""
    import torch

    outs = []
    with torch.no_grad():
        for inp in inputs:
            if on_batch is not None:
                on_batch(inp)
            y = block(inp.hidden, *inp.args, **inp.kwargs)
            outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def collect_linear_inputs(block, inputs: list[BlockInput],
                          consume: Callable[[str, "torch.Tensor"], None]) -> None:
    """Run the block over every batch and hand `consume(linear name, X)` the input rows of each Linear at the
    real tokens: X is [tokens, in_features] in float32."""
    mask_now: list = [None]
    handles = []
    for name, lin in block_linears(block).items():
        def hook(module, args, _name=name):
            x = args[0]
            m = mask_now[0]
            rows = x[m] if m is not None and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])
            consume(_name, rows.detach().float())
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        run_block(block, inputs, on_batch=lambda inp: mask_now.__setitem__(0, inp.mask))
    finally:
        for h in handles:
            h.remove()


def sequential_blocks(model, batches: list[dict], prune_block: Callable[[int, Any, list[BlockInput]], None]) -> None:
    """Prune block after block: `prune_block(i, block, inputs)` sees the block's inputs as produced by the
    already-pruned blocks before it; its pruned output becomes the next block's input."""
    _, _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, batches)
    for i, block in enumerate(blocks):
        prune_block(i, block, inputs)
        outs = run_block(block, inputs)
        inputs = [replace(inp, hidden=h) for inp, h in zip(inputs, outs)]


def one_shot(subject: "Subject", task: "Task", ctx: "RunContext", cfg, prune: Callable[..., list],
             what: str) -> "Applied":
    """Wanda's and SparseGPT's common apply: a float copy of the model, `cfg.calibration_samples` calibration
    examples, `prune(hf_model, batches)` block by block (skipped at sparsity 0: every block linear, unchanged),
    and the cost and sparsity stats they report alike. `what` ends the cost's description."""
    import copy
    import time

    from baselines.base import Applied, Cost
    from baselines.pruning import _sparse

    t0 = time.perf_counter()
    model = copy.deepcopy(subject.model).float()
    batches = calibration_batches(task, task.prepare(model, ctx), ctx, cfg.calibration_samples)
    hf = hf_model(model)
    pruned = prune(hf, batches) if cfg.sparsity > 0 else all_block_linears(hf)
    tokens = token_count(batches)
    cost = Cost(time.perf_counter() - t0, len(batches), sum(len(b["input_ids"]) for b in batches),
                f"one-shot: {tokens} calibration tokens{what}")
    stats = {**_sparse.pruning_stats(hf, pruned, cfg.structure, cfg.sparsity), "calibration_tokens": tokens}
    return Applied(task.prepare(model, ctx), cost, runtime_exploits_sparsity=False, stats=lambda: stats)
