"""`medusa`: Medusa-1 decoding heads on the frozen reference (Cai et al., "Medusa: Simple LLM Inference Acceleration
Framework with Multiple Decoding Heads", ICML 2024, arXiv:2401.10774), greedy and exact.

The heads (section 2.1.1). With h_t the reference's last hidden state at position t (the final norm's output,
which its LM head maps to p(x_{t+1})), head k = 1..K guesses the token k + 1 steps ahead:

    p_t^(k) = softmax( W_2^(k) ( SiLU(W_1^(k) h_t + b_1^(k)) + h_t ) ),   W_1^(k) in R^{d x d}, W_2^(k) in R^{V x d}

a residual block and a linear map to the vocabulary (`MedusaHeads`). As in the authors' code, W_1^(k) starts at
zero (their ResBlock is initialised as the identity) and W_2^(k) as a copy of the reference's LM head, so every
head starts by predicting x_{t+1}; the bias b_1 is theirs too (their ResBlock's linear layer has one).

Training, Medusa-1 (section 2.2.1, equation 1): the backbone is frozen and only the heads learn, by

    L_MEDUSA-1 = sum_{k=1..K} -lambda_k log p_t^(k)(y_{t+k+1}),   lambda_k = decay^k   (the paper: 0.8^k)

averaged over the positions t whose next token is part of an answer (the positions whose hidden state the
heads read when decoding). The targets y are self-distilled (section 2.3.2), as the paper recommends when the
training data does not come from the model's own distribution: `train_prompts` prompts drawn from the task's
train split (`TrainingRows`) are answered by the reference's own greedy decoding and the heads learn those
answers, so a head is right exactly when it predicts what the reference will emit. The optimiser loop is the
tasks' (`tasks._kit.lm.fit_lm`: AdamW, warm-up then cosine, clipping), with the heads as the trained module.
`heldout_prompts` further training prompts, answered the same way, measure each head's top-i accuracy a_k[i].
The heads and what only their build knows (seconds, steps, losses, the held-out accuracies) are one cache
entry (`bench.cache.cached_bundle`), keyed by the reference's weights, the data, the training settings, the
seed, budget, device and dtype; the record's cost is their training cost, cached or not.

Decoding (section 2.1.2): from the committed prefix and the target's next token r (the root), the heads read
the hidden state that chose r and their top-k guesses fill a candidate tree: the node at path (c_1..c_d) carries
head d's c_d-th guess (`candidate_tokens`). The tree (`tree`, a named preset) is either Medusa's optimised sparse
tree, the `sparse-N` paths of largest expected acceptance prod_d a_d[c_d] built from the held-out accuracies
(the paper's optimised tree construction; `_tree.best_first_tree`), a single chain of top-1 guesses, or the
dense top-2 tree. One target pass verifies every node with the tree attention mask, greedy acceptance keeps the
longest agreeing path, the KV cache keeps that path, and the bonus token and the hidden state at the path's end
start the next pass (`baselines.decoding._tree` holds the definitions). The output is the reference's greedy
output, token for token. The heads run on one hidden state per pass (the authors' code applies them to every
tree node and keeps one row: the same guesses, for 1/n of the head MACs of an n-node tree).

Method statistics (over the evaluation): `mean_accepted_length` (tokens per target pass, the prefill pass
included), `accept_depth_<k>` (the share of tree passes whose accepted path reached depth k, i.e. head k's
guess was kept), `head_macs_per_pass` and the measured seconds per pass of the heads and of the target's tree
pass, `tree_nodes`, and the held-out top-1 accuracy of each head.

Why hand-written: transformers 5's `generate` has no multi-token heads and no tree verification (see `_tree`);
the authors' `medusa-llm` package patches transformers 4's Llama with its own KV buffers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from baselines.base import Applied, Cost, Method
from baselines.decoding._tree import Tree, best_first_tree, keep_path, tree_forward, verify_greedy
from baselines.decoding.jacobi import Counters, decode_rows, int_in_range
from bench.api import TrainingRows, pick, require
from bench.config import check_range
from bench.registry import register_method
from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Subject, Task

TOPK = 10  # guesses per head ranked and scored (a_k[i], i < TOPK): the widest a sparse tree can branch
GEN_BATCH = 64  # prompts per batched greedy generation of the reference (self-distillation)
SMOKE_PROMPTS = 48  # train + held-out prompts under --budget smoke
TREES = ("sparse-16", "sparse-8", "sparse-32", "sparse-63", "chain", "dense-2")


@dataclass(frozen=True)
class MedusaConfig:
    # K: the heads; on arith, after 1,500 steps, head k's held-out top-1 accuracy was 0.68, 0.62, 0.57, 0.52, 0.49
    # for k = 1..5, and every head costs a read of its d x V matrix each pass
    num_heads: int = 5
    # the candidate tree: sparse-N is the paper's optimised tree of N guesses (63 for Vicuna-7B on an A100); a
    # CPU pass pays for every token it verifies, so fewer here. On arith (5 heads, a loaded 2-core machine):
    # 2.6 tokens per target pass for the chain, 2.8 for sparse-8, 3.0 for sparse-16, 3.3 for sparse-32, at 1.0,
    # 1.12, 1.25 and 1.45 times the chain's time per pass; chain, sparse-8 and sparse-16 ended within 5% of
    # each other end to end. chain = the top-1 guesses; dense-2 = the top-2 of every head
    tree: Literal["sparse-16", "sparse-8", "sparse-32", "sparse-63", "chain", "dense-2"] = "sparse-16"
    train_prompts: int = 2000  # training prompts answered by the reference (self-distillation)
    heldout_prompts: int = 100  # further prompts that measure the heads' top-k accuracies (the sparse tree)
    steps: int = 1500  # AdamW steps on the heads (~12 epochs of 2,000 answers; 600 steps left head 1 at 0.63)
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3  # peak rate, linear warm-up then cosine to zero (the authors' Medusa-1 script: 1e-3)
    warmup_steps: int = 40
    decay: float = 0.8  # lambda_k = decay^k, the paper's weighting of head k's loss
    max_new_tokens: int = 160  # the longest self-distilled answer (arith's answers are at most ~110 tokens)

    def validate(self) -> None:
        int_in_range("num_heads", self.num_heads, 1, 8)
        check_range("train_prompts", self.train_prompts, lo=1)
        check_range("heldout_prompts", self.heldout_prompts, lo=1)
        check_range("steps", self.steps, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, lo=0)
        check_range("decay", self.decay, lo=0, lo_open=True, hi=1)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


# ---- the heads ----------------------------------------------------------------------------------------------

def _module():
    import torch

    class MedusaHeads(torch.nn.Module):
        """K heads stacked: w1 (K, d, d) and b1 (K, d), zero at the start; w2 (K, V, d), the LM head's copies."""

        def __init__(self, lm_head_weight: "torch.Tensor", k: int):
            super().__init__()
            v, d = lm_head_weight.shape
            self.w1 = torch.nn.Parameter(torch.zeros(k, d, d))
            self.b1 = torch.nn.Parameter(torch.zeros(k, d))
            self.w2 = torch.nn.Parameter(lm_head_weight.detach().float().clone().expand(k, v, d).contiguous())

        def forward(self, h: "torch.Tensor") -> "torch.Tensor":
            """h (N, d) -> logits (K, N, V) of heads 1..K."""
            z = h + torch.nn.functional.silu(torch.einsum("nd,ked->kne", h, self.w1) + self.b1[:, None])
            return torch.bmm(z, self.w2.transpose(1, 2))

    return MedusaHeads


def build_heads(model, k: int):
    return _module()(model.get_output_embeddings().weight, k)


# ---- self-distillation and training -------------------------------------------------------------------------

def self_distilled(model, tok, prompts: list[list[int]], max_new_tokens: int, device, progress) -> list[list[int]]:
    """The reference's greedy answers to `prompts` (batched, left-padded), each up to and including EOS."""
    import torch

    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[list[int]] = []
    with progress.step("Answering training prompts with the reference (self-distillation)",
                       total=len(prompts)) as advance, torch.inference_mode():
        for i in range(0, len(prompts), GEN_BATCH):
            chunk = prompts[i:i + GEN_BATCH]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            gen = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad).cpu()
            for r in range(len(chunk)):
                new = gen[r, width:].tolist()
                out.append(new[:new.index(eos) + 1] if eos in new else new)
            advance(len(chunk))
    return out


def head_targets(heads, decoder, ids, mask, labels, k: int):
    """(logits (K, N, V), targets (K, N)) at the N positions t whose next token is an answer token (labels[t+1]
    != -100): target[k-1] = labels[t + k + 1], -100 past the end. The frozen decoder runs without gradients."""
    import torch

    with torch.no_grad():
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    lab = torch.nn.functional.pad(labels, (0, k + 1), value=-100)
    sel = lab[:, 1:ids.shape[1] + 1] != -100
    b, t = sel.nonzero(as_tuple=True)
    targets = torch.stack([lab[b, t + j + 1] for j in range(1, k + 1)])
    return heads(h[b, t].float()), targets


def train_heads(model, examples, heldout, cfg: MedusaConfig, ctx: "RunContext", pad_id: int):
    """Fit the heads on `examples` (L_MEDUSA-1) and measure their top-i accuracies on `heldout`. Returns (heads,
    `lm.TrainStats`, accuracy[k][i])."""
    import math

    import torch

    from tasks._kit import lm

    heads = build_heads(model, cfg.num_heads)
    decoder = model.get_decoder()
    weights = [cfg.decay ** j for j in range(1, cfg.num_heads + 1)]

    def batch_loss(h_mod, ids, mask, labels):
        logits, targets = head_targets(h_mod, decoder, ids, mask, labels, cfg.num_heads)
        loss = sum(w * torch.nn.functional.cross_entropy(logits[j], targets[j], ignore_index=-100, reduction="sum")
                   / (targets[j] != -100).sum().clamp_min(1) for j, w in enumerate(weights))
        return loss, int(targets.shape[1])

    recipe = lm.LMRecipe(epochs=cfg.steps / math.ceil(len(examples) / cfg.batch_size), lr=cfg.lr,
                         batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps)
    stats = lm.fit_lm(heads, examples, recipe, ctx, seed=ctx.seed, pad_id=pad_id, batch_loss=batch_loss,
                      description=f"Training {cfg.num_heads} Medusa heads on the frozen reference")
    ranks = min(TOPK, heads.w2.shape[1])
    hits = torch.zeros(cfg.num_heads, ranks)
    counts = torch.zeros(cfg.num_heads)
    with torch.no_grad():
        for i in range(0, len(heldout), cfg.batch_size):
            ids, mask, labels = (x.to(ctx.device) for x in lm.collate(heldout, list(range(i, min(i + cfg.batch_size,
                                                                                               len(heldout)))), pad_id))
            logits, targets = head_targets(heads, decoder, ids, mask, labels, cfg.num_heads)
            top = logits.topk(ranks, dim=-1).indices.cpu()  # (K, N, ranks)
            targets = targets.cpu()
            valid = targets != -100
            hits += ((top == targets[..., None]) & valid[..., None]).sum(1).float()
            counts += valid.sum(1).float()
    accuracy = (hits / counts.clamp_min(1)[:, None]).tolist()
    return heads, stats, accuracy


# ---- decoding -----------------------------------------------------------------------------------------------

def build_tree(name: str, accuracy: list[list[float]], k: int) -> Tree:
    if name == "chain":
        return Tree.chain(k)
    if name == "dense-2":
        import itertools

        return Tree.from_paths([p for d in range(1, k + 1) for p in itertools.product((0, 1), repeat=d)])
    if name.startswith("sparse-"):
        return Tree.from_paths(best_first_tree(accuracy[:k], int(name.split("-")[1])))
    raise ValueError(f"tree={name!r} is not one of {', '.join(TREES)}")


class MedusaDecoder:
    """Greedy Medusa decoding of one sequence with `model` (the reference, unchanged) and trained `heads`."""

    def __init__(self, model, heads, tree: Tree, counters: Counters):
        import torch

        self.model, self.tree, self.counters = model, tree, counters
        self.heads = heads.to(device=model.device, dtype=model.dtype).eval()
        self.k = min(tree.max_depth, heads.w1.shape[0])
        if tree.max_depth > heads.w1.shape[0]:
            raise ValueError(f"the tree is {tree.max_depth} deep but there are {heads.w1.shape[0]} heads")
        self.width = max(p[-1] for p in tree.paths[1:]) + 1
        # node u's token is row (depth - 1), column c_d of the heads' top-`width` guesses, flattened
        self.flat = torch.tensor([(len(p) - 1) * self.width + p[-1] for p in tree.paths[1:]], device=model.device)
        v, d = heads.w2.shape[1:]
        self.head_macs = self.k * (d * d + v * d)
        # the first k heads laid out for one hidden vector: W_1 stacked (k d, d), W_2 transposed (k, d, V) (a
        # row-vector batch product reads W_2 about twice as fast on these CPUs as a matrix-vector one)
        self.w1 = self.heads.w1[:self.k].reshape(-1, d).contiguous()
        self.b1 = self.heads.b1[:self.k]
        self.w2t = self.heads.w2[:self.k].transpose(1, 2).contiguous()

    def candidate_tokens(self, root: int, h: "torch.Tensor") -> list[int]:
        """[r] + the heads' guesses at every node (head d's c_d-th ranked token at path (c_1..c_d))."""
        import torch

        z = h + torch.nn.functional.silu(torch.mv(self.w1, h).view(self.k, -1) + self.b1)  # (k, d)
        logits = torch.bmm(z[:, None, :], self.w2t)[:, 0]  # (k, V)
        guesses = logits.topk(self.width, dim=-1).indices  # (k, width)
        return [root] + guesses.flatten()[self.flat].tolist()

    def generate(self, prompt: "torch.Tensor", max_new_tokens: int, eos: int | None) -> list[int]:
        from transformers import DynamicCache

        c, tree = self.counters, self.tree
        model = self.model
        decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        h = decoder(input_ids=prompt, **cache_kwargs(decoder, cache), use_cache=True).last_hidden_state[0, -1]
        root = int(lm_head(h).argmax())
        c.add("target_seconds", time.perf_counter() - t0)
        c.calls += 1
        c.forward_passes += 1
        out = [root]
        while len(out) < max_new_tokens and root != eos:
            t0 = time.perf_counter()
            tokens = self.candidate_tokens(root, h)
            t1 = time.perf_counter()
            past = cache.get_seq_length()
            logits, hidden = tree_forward(model, cache, tree, tokens)
            predicted = logits.argmax(-1).tolist()
            path = verify_greedy(tree, tokens, predicted)
            keep_path(cache, past, path)
            c.add("head_seconds", t1 - t0)
            c.add("target_seconds", time.perf_counter() - t1)
            c.forward_passes += 1
            c.add("tree_passes", 1)
            depth = len(path) - 1
            for j in range(1, depth + 1):
                c.add(f"accept_depth_{j}", 1)
            root, h = predicted[path[-1]], hidden[path[-1]]
            new = [tokens[u] for u in path[1:]] + [root]
            out += new
            if eos in new:
                break
        if eos is not None and eos in out:
            out = out[:out.index(eos) + 1]
        out = out[:max_new_tokens]
        c.tokens += len(out)
        return out


@register_method("medusa", family="decoding", year=2024, url="https://arxiv.org/abs/2401.10774",
                 paper="Cai et al., Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
                 modalities=("causal-lm",), requires=(TrainingRows,),
                 summary="Medusa-1: K heads on the frozen reference guess tokens 2..K+1 ahead (self-distilled); "
                         "a candidate tree verified in one pass with tree attention; exact greedy output")
class Medusa(Method):
    Config = MedusaConfig

    def train(self, subject: "Subject", task: "Task", ctx: "RunContext"):
        """(heads, meta, built now): the trained heads from the cache, or trained now (see the docstring)."""
        from bench import cache
        from tasks._kit import lm

        cfg = self.config
        model, tok = subject.model, subject.extra["tokenizer"]
        rows = require(task, TrainingRows, "medusa trains its heads on the task's training split").training_rows()
        n = ctx.budget.pick(cfg.train_prompts + cfg.heldout_prompts, SMOKE_PROMPTS)
        picked = pick(len(rows), n, ctx.seed)
        n_held = max(1, min(cfg.heldout_prompts, len(picked) // 4))
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "tree"}  # the tree is chosen when decoding
        key = cache.key(task.spec.name, task.spec.version, task.data_fingerprint(), cache.weights_digest(model),
                        settings, ctx.seed, ctx.budget, ctx.device, ctx.dtype)
        path = cache.method_dir("medusa", task) / f"heads-{key}.safetensors"
        heads = build_heads(model, cfg.num_heads)

        def build() -> tuple[dict, dict]:
            t0 = time.perf_counter()
            prompts = tok([lm.prompt_of(rows[i]["question"]) for i in picked], add_special_tokens=False)["input_ids"]
            answers = self_distilled(model, tok, prompts, cfg.max_new_tokens, ctx.device, ctx.progress)
            examples = [(p + a, [-100] * len(p) + a) for p, a in zip(prompts, answers) if a]
            gen_seconds = time.perf_counter() - t0
            trained, stats, accuracy = train_heads(model, examples[:-n_held], examples[-n_held:], cfg, ctx,
                                                   tok.pad_token_id if tok.pad_token_id is not None
                                                   else tok.eos_token_id)
            state = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
            return state, {"seconds": time.perf_counter() - t0, "generation_seconds": gen_seconds,
                           "steps": stats.steps, "samples_seen": stats.samples_seen, "tokens_seen": stats.tokens_seen,
                           "final_loss": stats.final_loss, "accuracy": accuracy,
                           "train_examples": len(examples) - n_held, "heldout_examples": n_held,
                           "answer_tokens": sum(len(a) for a in answers)}

        state, meta, _, built = cache.cached_bundle(path, build)
        heads.load_state_dict(state)
        ctx.progress.log(f"medusa: {cfg.num_heads} heads, {meta['steps']} steps, {meta['seconds']:.0f} s"
                         + ("" if built else " (cached)") + "; held-out top-1 accuracy "
                         + ", ".join(f"{a[0]:.2f}" for a in meta["accuracy"]))
        heads.requires_grad_(False)
        return heads, meta, built

    def apply(self, subject: "Subject", task: "Task", ctx: "RunContext") -> Applied:
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        impl = getattr(subject.model.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise ValueError(f"medusa needs an attention implementation that takes a 4D additive mask "
                             f"('sdpa' or 'eager'); the model uses {impl!r}")
        heads, meta, _ = self.train(subject, task, ctx)
        tree = build_tree(cfg.tree, meta["accuracy"], cfg.num_heads)
        counters = Counters()
        decoder = MedusaDecoder(subject.model, heads, tree, counters)

        def generate(subj: "Subject", input_ids, max_new_tokens: int, attention_mask=None):
            return decode_rows(subj, input_ids, max_new_tokens, attention_mask,
                               lambda ids, m, eos: decoder.generate(ids, m, eos))

        def stats() -> dict[str, float]:
            e = counters.extra
            passes = max(1.0, e.get("tree_passes", 0.0))
            out = {**counters.base(), "tree_nodes": float(tree.size - 1), "tree_depth": float(tree.max_depth),
                   "head_macs_per_pass": float(decoder.head_macs),
                   "head_seconds_per_pass": e.get("head_seconds", 0.0) / passes,
                   "target_seconds_per_pass": e.get("target_seconds", 0.0) / max(1, counters.forward_passes)}
            for j in range(1, tree.max_depth + 1):
                out[f"accept_depth_{j}"] = e.get(f"accept_depth_{j}", 0.0) / passes
            for j, a in enumerate(meta["accuracy"], 1):
                out[f"heldout_top1_head_{j}"] = float(a[0])
            return out

        n_params = sum(p.numel() for p in heads.parameters())
        cost = Cost(meta["seconds"], meta["steps"], meta["samples_seen"],
                    f"the reference's greedy answers to {meta['train_examples'] + meta['heldout_examples']:,} training "
                    f"prompts ({meta['answer_tokens']:,} tokens, {meta['generation_seconds']:.0f} s), then "
                    f"{meta['steps']} AdamW steps of {cfg.num_heads} heads ({n_params:,} parameters) on the frozen "
                    f"reference", tokens_seen=meta["tokens_seen"])
        new = Subject(subject.model, subject.kind, {**subject.extra, "generate": generate})
        return Applied(new, cost, stats=stats)
