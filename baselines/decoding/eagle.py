"""`eagle`: EAGLE's feature-level draft head with tree drafting and one-pass tree verification (Li et al., "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty", ICML 2024, arXiv:2401.15077); `--set tree=dynamic`
is EAGLE-2's context-aware dynamic draft tree (Li et al., "EAGLE-2: Faster Inference of Language Models with
Dynamic Draft Trees", EMNLP 2024, arXiv:2406.16858). Greedy and exact.

The draft head and its training (f^_{t+1} = Draft(f_{<=t}, x_{<=t+1}), p^_{t+2} = softmax(LMHead(f^_{t+1})),
L = SmoothL1(f_{t+1}, f^_{t+1}) + w_cls CE(p_{t+2}, p^_{t+2}), noise U(-0.1, 0.1) on the input features) are in
`baselines.decoding._eagle`. The head learns from the reference's own greedy answers to `train_prompts` prompts of
the task's training split (`TrainingRows`; `medusa.self_distilled`), `heldout_prompts` more measure its top-i
accuracy. The head and what only its training knows (seconds, steps, losses, held-out accuracies) are one cache
entry (`bench.cache.cached_bundle`) keyed by the task (name, version, data fingerprint), the reference's weights,
the training settings (every setting but the decoding ones: tree, depth, top_k, total_tokens), the seed, budget,
device and dtype; the record's cost is the training cost, cached or not.

Drafting (`EagleDecoder.draft`). State after a target pass: the committed sequence x_1..x_L is in the target's KV
cache, the target has chosen the root r = x_{L+1}, and the draft's own KV cache holds the pairs (f_t, x_{t+1}) of
the committed sequence computed with the target's true features, except the newest ones ("pending": after the
prefill every prompt pair, later the pairs of the accepted path, ending with the root pair (f_L, r)). One draft
pass feeds the pending pairs (a causal mask over the draft's cache); the root pair's output f^_{L+1} gives the
depth-1 distribution p^. Then the tree grows a layer at a time: the nodes to expand at depth j are fed in ONE draft
pass, node u as the pair (f^ of its parent, t_u) at position pos(root) + depth(u) under a tree mask (it sees the
committed pairs and exactly its own drafted ancestors, which were fed before it), and each output gives its
children's distribution. A tree of depth D costs D draft passes. Drafted entries are then cropped from the draft's
cache: they were computed from predicted features, and the accepted ones are fed again next time with the target's
true features (f at each accepted node comes out of the verification pass for free).

- `tree=static` (EAGLE-1): a fixed tree of `total_tokens` nodes, at most `depth` deep and `top_k` wide, given as
  choice paths (node (c_1..c_d) carries the c_d-th ranked draft token after its parent). EAGLE-1 fixes its tree by
  hand; here it is the best-first tree (`_tree.best_first_tree`) under the draft's measured held-out rank
  accuracies a[i], assumed the same at every depth: the paths of largest prod_j a[c_j], which for a draft with
  a[0] >> a[1] is a deep first-choice spine with side branches near the root, EAGLE-1's shape.
- `tree=dynamic` (EAGLE-2, section 4): with value V(u) = prod_{v in path(u)} p^(t_v | parent of v) (the draft's
  confidence along the path, an estimate of u's acceptance probability), *expand*: depth 1 holds the root's top_k
  tokens; at each of depth - 1 further steps the top_k nodes of the newest layer by V are fed to the draft and
  each spawns its top_k children (top_k^2 new nodes); *rerank*: of all drafted nodes the `total_tokens` of
  largest V are verified. V never grows along a path (each factor is <= 1) and ties rank the shallower node
  first, so every kept node's parent is kept: the selection is a connected tree, built with `_tree.Tree(parents)`.
  V is kept as a sum of log-probabilities (the same order, no underflow).

Verification (`baselines.decoding._tree`): one target pass over root + tree with the tree attention mask, greedy
acceptance of the longest path whose every token is the target's argmax, the target's KV cache keeps that path;
the accepted tokens plus the bonus token are exactly greedy decoding's next tokens, so the output is the
reference's greedy output token for token (in float32; see `_tree` on rounding).

Method statistics (over the evaluation): `mean_accepted_length` (tokens per target pass, the prefill included),
`accept_depth_<k>` (share of tree passes whose accepted path reached depth k), `draft_passes_per_target_pass`,
`draft_seconds_per_pass` / `target_seconds_per_pass`, `tree_nodes` (mean verified drafted nodes),
`draft_parameters`, `draft_macs_per_token` (one fed token: head + LM head), `draft_tokens_per_pass` (tokens fed to
the head per target pass), and the draft's held-out top-1 accuracy and loss.

Why hand-written: transformers 5's `generate` has no feature-level drafts and no tree verification; the authors'
`eagle-llm` package patches transformers 4's Llama with its own KV buffers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from baselines.base import Applied, Cost, Method
from baselines.decoding._eagle import (build_head, causal_mask, head_macs_per_token, head_parameters,
                                       train_head)
from baselines.decoding._tree import Tree, best_first_tree, keep_path, tree_forward, verify_greedy
from baselines.decoding.jacobi import Counters, decode_rows, int_in_range
from baselines.decoding.medusa import self_distilled
from bench.api import TrainingRows, pick, require
from bench.config import ConfigError, check_range
from bench.registry import register_method
from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch

    from tasks.base import RunContext, Subject, Task

SMOKE_PROMPTS = 48  # train + held-out prompts under --budget smoke
TREES = ("static", "dynamic")
DECODING_SETTINGS = ("tree", "depth", "top_k", "total_tokens")  # not part of the trained head's cache key


@dataclass(frozen=True)
class EagleConfig:
    # static = EAGLE-1's fixed tree (best-first from the draft's held-out rank accuracies), dynamic = EAGLE-2's
    # tree expanded and reranked by the draft's confidence every pass
    tree: Literal["static", "dynamic"] = "static"
    # draft passes per target pass, and the tree's deepest guess (EAGLE-2's GPU setting: 6; a CPU pass of the
    # one-layer draft costs a sizeable share of a 4-layer target pass, so fewer here)
    depth: int = 4
    # the widest branching: children per expanded node, and nodes expanded per layer (EAGLE-2: 10)
    top_k: int = 4
    # drafted nodes verified per target pass, root excluded (EAGLE-2: 60 on an A100; a CPU pays for every
    # verified token, and medusa's sparse-16 was about its best tree size on arith)
    total_tokens: int = 16
    train_prompts: int = 2000  # training prompts answered by the reference (self-distillation), as medusa's
    heldout_prompts: int = 100  # further prompts: the head's held-out rank accuracies (the static tree) and loss
    steps: int = 1500  # AdamW steps on the head (~12 epochs of 2,000 answers at batch 16)
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3  # peak rate, linear warm-up then cosine to zero (a small head learns fast; EAGLE's 7B: 3e-5)
    warmup_steps: int = 40
    w_cls: float = 0.1  # weight of the token loss L_cls against the feature regression L_reg (the paper's 0.1)
    noise: float = 0.1  # input features get U(-noise, noise) during training (the paper's 0.1); 0 = none
    max_new_tokens: int = 160  # the longest self-distilled answer (arith's answers are at most ~110 tokens)

    def validate(self) -> None:
        if self.tree not in TREES:
            raise ConfigError(f"tree={self.tree!r} is not one of {', '.join(TREES)}")
        int_in_range("depth", self.depth, 1, 16)
        int_in_range("top_k", self.top_k, 1, 64)
        int_in_range("total_tokens", self.total_tokens, 1, 1024)
        check_range("train_prompts", self.train_prompts, lo=1)
        check_range("heldout_prompts", self.heldout_prompts, lo=1)
        check_range("steps", self.steps, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        check_range("lr", self.lr, lo=0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, lo=0)
        check_range("w_cls", self.w_cls, lo=0)
        check_range("noise", self.noise, lo=0)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)


def static_tree(accuracy: list[float], depth: int, top_k: int, total_tokens: int) -> Tree:
    """EAGLE-1's fixed tree: the `total_tokens` paths (at most `depth` deep, choices < `top_k`) of largest
    expected acceptance prod_j a[c_j] under the draft's rank accuracies `accuracy` (`_tree.best_first_tree`)."""
    ranks = [max(float(a), 1e-9) for a in accuracy[:top_k]] or [1.0]
    return Tree.from_paths(best_first_tree([ranks] * depth, total_tokens))


def select_dynamic(parents: list[int], scores: list[float], depths: list[int], m: int) -> list[int]:
    """EAGLE-2's rerank: the `m` drafted nodes of largest value (scores: log V), ties to the shallower, then the
    earlier node; returned in (depth, index) order, so parents come first. `parents[i]` is -1 for a child of the
    root. Since log V never grows along a path, the selection is closed under parents (a connected tree)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], depths[i], i))[:m]
    return sorted(order, key=lambda i: (depths[i], i))


class EagleDecoder:
    """Greedy EAGLE / EAGLE-2 decoding of one sequence with `model` (the reference, unchanged) and a trained
    draft `head`. `tree` is the static tree (None with `dynamic=True`)."""

    def __init__(self, model, head, counters: Counters, *, depth: int, top_k: int, total_tokens: int,
                 tree: Tree | None = None, dynamic: bool = False):
        if not dynamic and tree is None:
            raise ValueError("a static EAGLE decoder needs its tree")
        self.model, self.counters = model, counters
        self.head = head.to(device=model.device, dtype=model.dtype).eval()
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.dynamic, self.top_k = dynamic, top_k
        self.depth = depth if dynamic else tree.max_depth
        self.total_tokens = total_tokens if dynamic else tree.size - 1
        self.tree = tree
        self.macs_per_token = head_macs_per_token(head, self.lm_head.weight.shape[0])
        if tree is not None:
            # per depth j: the nodes that have children (fed at depth j), and the widest child rank below each
            kids: dict[int, list[int]] = {}
            for u in range(1, tree.size):
                kids.setdefault(tree.parents[u], []).append(u)
            self.kids = kids
            self.fed = [[u for u in range(tree.size) if tree.depths[u] == j and u in kids]
                        for j in range(tree.max_depth)]

    # ---- the draft --------------------------------------------------------------------------------------------

    def _pass(self, cache, feats: "torch.Tensor", tokens: list[int], positions: list[int],
              mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """One draft pass: (f^ (n, d), log p^ (n, V)) of n fed pairs."""
        import torch

        dev = feats.device
        ids = torch.tensor(tokens, device=dev)
        pos = torch.tensor([positions], device=dev)
        h = self.head(feats[None], self.embed(ids)[None], pos, mask, cache)[0]
        self.counters.add("draft_passes", 1)
        self.counters.add("draft_tokens", len(tokens))
        return h, torch.log_softmax(self.lm_head(h).float(), dim=-1)

    def _tree_mask(self, past: int, slot: dict[int, int], fed: list[int], parent_of, dtype, device):
        """(1, 1, n, past + n) additive mask of a tree pass: fed node u sees the committed pairs (slots below
        `self._base`) and the slots of its drafted ancestors, itself included (`parent_of` is None at depth 1)."""
        import torch

        n = len(fed)
        m = torch.full((n, past + n), torch.finfo(dtype).min, dtype=dtype)
        m[:, :self._base] = 0
        for row, u in enumerate(fed):
            v = u
            while v is not None:
                m[row, slot[v]] = 0
                v = parent_of(v)
        return m.to(device)[None, None]

    def draft(self, cache, pend_feats: "torch.Tensor", pend_tokens: list[int]) -> tuple[Tree, list[int]]:
        """Feed the pending pairs (the last is the root's), grow the tree, crop the drafted entries; returns the
        tree to verify and its tokens (node 0: the root's token)."""
        past = cache.get_seq_length()
        n = len(pend_tokens)
        dt, dev = pend_feats.dtype, pend_feats.device
        h, logp = self._pass(cache, pend_feats, pend_tokens, list(range(past, past + n)),
                             causal_mask(n, past, dt, dev))
        self._base = past + n
        root_pos = past + n - 1
        root_h, root_logp = h[-1], logp[-1]
        tree, tokens = (self._dynamic(cache, pend_tokens[-1], root_h, root_logp, root_pos) if self.dynamic
                        else self._static(cache, pend_tokens[-1], root_h, root_logp, root_pos))
        extra = cache.get_seq_length() - self._base
        if extra > 0:
            cache.crop(-extra)
        return tree, tokens

    def _static(self, cache, root_token: int, root_h, root_logp, root_pos: int):
        import torch

        tree = self.tree
        tokens = [root_token] + [0] * (tree.size - 1)
        out_h = {0: root_h}
        out_logp = {0: root_logp}
        slot: dict[int, int] = {}
        parent_of = lambda u: None if tree.parents[u] <= 0 else tree.parents[u]  # noqa: E731
        for j in range(tree.max_depth):
            parents = self.fed[j]
            width = max(tree.paths[c][-1] for p in parents for c in self.kids[p]) + 1
            top = torch.stack([out_logp[p] for p in parents]).topk(width, dim=-1).indices.tolist()
            for p, row in zip(parents, top):
                for c in self.kids[p]:
                    tokens[c] = row[tree.paths[c][-1]]
            if j + 1 < tree.max_depth:
                nxt = self.fed[j + 1]
                if not nxt:
                    break
                past = cache.get_seq_length()
                for i, u in enumerate(nxt):
                    slot[u] = past + i
                mask = self._tree_mask(past, slot, nxt, parent_of, root_h.dtype, root_h.device)
                feats = torch.stack([out_h[tree.parents[u]] for u in nxt])
                h, logp = self._pass(cache, feats, [tokens[u] for u in nxt], [root_pos + j + 1] * len(nxt), mask)
                for i, u in enumerate(nxt):
                    out_h[u], out_logp[u] = h[i], logp[i]
        return tree, tokens

    def _dynamic(self, cache, root_token: int, root_h, root_logp, root_pos: int):
        import torch

        k = self.top_k
        vals, idx = root_logp.topk(min(k, root_logp.shape[-1]))
        parents: list[int] = [-1] * len(vals)  # drafted node i's parent (-1: the root)
        tokens: list[int] = idx.tolist()
        scores: list[float] = vals.tolist()  # log V
        depths: list[int] = [1] * len(vals)
        layer = list(range(len(vals)))
        out_h: dict[int, "torch.Tensor"] = {-1: root_h}
        slot: dict[int, int] = {}
        parent_of = lambda u: None if parents[u] < 0 else parents[u]  # noqa: E731
        for d in range(2, self.depth + 1):
            expand = sorted(layer, key=lambda i: (-scores[i], i))[:k]  # EAGLE-2's expand: top-k of the layer by V
            past = cache.get_seq_length()
            for i, u in enumerate(expand):
                slot[u] = past + i
            mask = self._tree_mask(past, slot, expand, parent_of, root_h.dtype, root_h.device)
            feats = torch.stack([out_h[parents[u]] for u in expand])
            h, logp = self._pass(cache, feats, [tokens[u] for u in expand], [root_pos + d - 1] * len(expand), mask)
            vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
            cum = (vals + torch.tensor([scores[u] for u in expand], dtype=vals.dtype, device=vals.device)[:, None])
            layer = []
            for i, u in enumerate(expand):
                out_h[u] = h[i]
                for t, s in zip(idx[i].tolist(), cum[i].tolist()):
                    layer.append(len(tokens))
                    parents.append(u)
                    tokens.append(t)
                    scores.append(s)
                    depths.append(d)
        keep = select_dynamic(parents, scores, depths, self.total_tokens)
        node = {u: i + 1 for i, u in enumerate(keep)}
        tree = Tree(tuple([-1] + [0 if parents[u] < 0 else node[parents[u]] for u in keep]))
        return tree, [root_token] + [tokens[u] for u in keep]

    # ---- the loop ---------------------------------------------------------------------------------------------

    def generate(self, prompt: "torch.Tensor", max_new_tokens: int, eos: int | None) -> list[int]:
        from transformers import DynamicCache

        c, model = self.counters, self.model
        decoder = model.get_decoder()
        cache = DynamicCache(config=model.config)
        dcache = DynamicCache(config=self.head.config)
        t0 = time.perf_counter()
        hidden = decoder(input_ids=prompt, **cache_kwargs(decoder, cache), use_cache=True).last_hidden_state[0]
        root = int(self.lm_head(hidden[-1]).argmax())
        c.add("target_seconds", time.perf_counter() - t0)
        c.calls += 1
        c.forward_passes += 1
        out = [root]
        pend_feats, pend_tokens = hidden, prompt[0, 1:].tolist() + [root]  # pairs (f_t, x_{t+1}) of the prompt
        while len(out) < max_new_tokens and root != eos:
            t0 = time.perf_counter()
            tree, tokens = self.draft(dcache, pend_feats, pend_tokens)
            t1 = time.perf_counter()
            past = cache.get_seq_length()
            logits, hidden = tree_forward(model, cache, tree, tokens)
            predicted = logits.argmax(-1).tolist()
            path = verify_greedy(tree, tokens, predicted)
            keep_path(cache, past, path)
            c.add("draft_seconds", t1 - t0)
            c.add("target_seconds", time.perf_counter() - t1)
            c.forward_passes += 1
            c.add("tree_passes", 1)
            c.add("tree_nodes", tree.size - 1)
            depth = len(path) - 1
            for j in range(1, depth + 1):
                c.add(f"accept_depth_{j}", 1)
            root = predicted[path[-1]]
            new = [tokens[u] for u in path[1:]] + [root]
            pend_feats, pend_tokens = hidden[path], new  # (f at each accepted node, the token after it)
            out += new
            if eos in new:
                break
        if eos is not None and eos in out:
            out = out[:out.index(eos) + 1]
        out = out[:max_new_tokens]
        c.tokens += len(out)
        return out


@register_method("eagle", family="decoding", year=2024, url="https://arxiv.org/abs/2401.15077",
                 paper="Li et al., EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty "
                       "(tree=dynamic: EAGLE-2, arXiv:2406.16858)",
                 modalities=("causal-lm",), requires=(TrainingRows,),
                 summary="a one-layer draft head over the frozen reference's top-layer features and the next "
                         "tokens (self-distilled); a static (EAGLE-1) or dynamic (EAGLE-2) draft tree verified in "
                         "one pass with tree attention; exact greedy output")
class Eagle(Method):
    Config = EagleConfig

    def train(self, subject: "Subject", task: "Task", ctx: "RunContext"):
        """(head, meta, built now): the trained head from the cache, or trained now (see the docstrings)."""
        from bench import cache
        from tasks._kit import lm

        cfg = self.config
        model, tok = subject.model, subject.extra["tokenizer"]
        rows = require(task, TrainingRows, "eagle trains its draft head on the task's training split").training_rows()
        n = ctx.budget.pick(cfg.train_prompts + cfg.heldout_prompts, SMOKE_PROMPTS)
        picked = pick(len(rows), n, ctx.seed)
        n_held = max(1, min(cfg.heldout_prompts, len(picked) // 4))
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in DECODING_SETTINGS}
        key = cache.key(task.spec.name, task.spec.version, task.data_fingerprint(), cache.weights_digest(model),
                        settings, ctx.seed, ctx.budget, ctx.device, ctx.dtype)
        path = cache.method_dir("eagle", task) / f"head-{key}.safetensors"
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def build() -> tuple[dict, dict]:
            t0 = time.perf_counter()
            prompts = tok([lm.prompt_of(rows[i]["question"]) for i in picked], add_special_tokens=False)["input_ids"]
            answers = self_distilled(model, tok, prompts, cfg.max_new_tokens, ctx.device, ctx.progress)
            examples = [(p + a, [-100] * len(p) + a) for p, a in zip(prompts, answers) if a]
            gen_seconds = time.perf_counter() - t0
            head, stats, metrics = train_head(model, examples[:-n_held], examples[-n_held:], cfg, ctx, pad)
            state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
            return state, {"seconds": time.perf_counter() - t0, "generation_seconds": gen_seconds,
                           "training_seconds": stats.seconds, "steps": stats.steps,
                           "samples_seen": stats.samples_seen, "tokens_seen": stats.tokens_seen,
                           "final_loss": stats.final_loss, "heldout": metrics,
                           "train_examples": len(examples) - n_held, "heldout_examples": n_held,
                           "answer_tokens": sum(len(a) for a in answers)}

        state, meta, _, built = cache.cached_bundle(path, build)
        head = build_head(model, ctx.seed)
        head.load_state_dict(state)
        head.requires_grad_(False)
        acc = meta["heldout"]["accuracy"]
        ctx.progress.log(f"eagle: draft head, {meta['steps']} steps, {meta['seconds']:.0f} s"
                         + ("" if built else " (cached)") + f"; held-out top-1 accuracy {acc[0]:.2f}")
        return head, meta, built

    def apply(self, subject: "Subject", task: "Task", ctx: "RunContext") -> Applied:
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        impl = getattr(subject.model.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise ValueError(f"eagle needs an attention implementation that takes a 4D additive mask "
                             f"('sdpa' or 'eager'); the model uses {impl!r}")
        head, meta, _ = self.train(subject, task, ctx)
        dynamic = cfg.tree == "dynamic"
        tree = None if dynamic else static_tree(meta["heldout"]["accuracy"], cfg.depth, cfg.top_k, cfg.total_tokens)
        counters = Counters()
        decoder = EagleDecoder(subject.model, head, counters, depth=cfg.depth, top_k=cfg.top_k,
                               total_tokens=cfg.total_tokens, tree=tree, dynamic=dynamic)

        def generate(subj: "Subject", input_ids, max_new_tokens: int, attention_mask=None):
            return decode_rows(subj, input_ids, max_new_tokens, attention_mask,
                               lambda ids, m, eos: decoder.generate(ids, m, eos))

        n_params = head_parameters(head)

        def stats() -> dict[str, float]:
            return eagle_stats(counters, decoder, meta, n_params)

        cost = Cost(meta["seconds"], meta["steps"], meta["samples_seen"],
                    f"the reference's greedy answers to {meta['train_examples'] + meta['heldout_examples']:,} training "
                    f"prompts ({meta['answer_tokens']:,} tokens, {meta['generation_seconds']:.0f} s), then "
                    f"{meta['steps']} AdamW steps of a one-layer draft head ({n_params:,} parameters) on the frozen "
                    f"reference's features", tokens_seen=meta["tokens_seen"])
        new = Subject(subject.model, subject.kind, {**subject.extra, "generate": generate})
        return Applied(new, cost, stats=stats)


def eagle_stats(counters: Counters, decoder: EagleDecoder, meta: dict, n_params: int) -> dict[str, float]:
    e = counters.extra
    passes = max(1.0, e.get("tree_passes", 0.0))
    out = {**counters.base(),
           "tree_nodes": e.get("tree_nodes", 0.0) / passes, "tree_depth": float(decoder.depth),
           "draft_passes_per_target_pass": e.get("draft_passes", 0.0) / passes,
           "draft_tokens_per_pass": e.get("draft_tokens", 0.0) / passes,
           "draft_seconds_per_pass": e.get("draft_seconds", 0.0) / passes,
           "target_seconds_per_pass": e.get("target_seconds", 0.0) / max(1, counters.forward_passes),
           "draft_parameters": float(n_params), "draft_macs_per_token": float(decoder.macs_per_token),
           "heldout_top1": float(meta["heldout"]["accuracy"][0]), "heldout_loss": float(meta["heldout"]["loss"])}
    for j in range(1, decoder.depth + 1):
        out[f"accept_depth_{j}"] = e.get(f"accept_depth_{j}", 0.0) / passes
    return out
