"""Tree-structured verification of guessed continuations, shared by the tree drafting methods (`medusa`, `eagle`).

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.

Definitions. A committed prefix x_1..x_L sits in the target's KV cache. A candidate tree T has nodes 0..n-1:
node 0, the root, carries the token r = x_{L+1} that the target has already chosen (its greedy token after the
prefix); every other node u carries a guessed token t_u and has a parent pa(u) < u, so the nodes are in
topological order. anc(u) is the set of u's ancestors and u itself, and depth(u) = |anc(u)| - 1. The path to u,
r = t_{a_0}, t_{a_1}, ..., t_{a_d} = t_u (a_0 = 0, a_j = pa(a_{j+1})), is one guessed continuation of x.

A tree is built from paths of top-k choice indices (`Tree.from_paths`, Medusa's "tree choices"): the path
(c_1, ..., c_d) is the node reached from the root by taking the c_1-th candidate at depth 1, then the c_2-th at
depth 2, and so on; every prefix of a path is a node too. Nodes are numbered in the order (depth, path), so a
parent always precedes its children and the first choices come first. `Tree(parents)` takes the parent
array directly (a tree that changes every pass, such as EAGLE-2's).

One target pass over every candidate (`tree_forward`). The n tokens are fed after the cache with

    position(u) = L + depth(u)                                                     (`Tree.position_ids`)
    M[u, j] = 0 if j <= L (any cached token) or j = L + 1 + v with v in anc(u), else -inf   (`Tree.attention_mask`)

(keys numbered 1..L + n: the cached x_1..x_L, then node v as key L + 1 + v; a 4-D additive mask of shape
(1, 1, n, L + n); Llama-style models in transformers 5 take a 4-D mask as given, with the `sdpa` and `eager`
attention implementations, and skip their own causal-mask construction). Under
this mask and these positions, the hidden state and logits at node u are, at every layer, those of a plain
causal forward over x_1..x_L followed by the path to u: attention sees exactly the same keys and values at the
same rotary positions. So one pass yields, for every node u,

    y_u = argmax_v p(v | x_1..x_L, path to u),

the target's greedy choice after that continuation (`tree_forward` returns the logits and the final hidden
states, which the heads of Medusa and the draft of EAGLE read).

Greedy verification (`verify_greedy`). The root is accepted; a node u != 0 is accepted iff its parent is accepted
and its token is the target's choice after the parent:

    acc(0) = true,   acc(u) = acc(pa(u)) and t_u = y_{pa(u)}.

Accepted nodes form one chain when siblings carry distinct tokens (each is accepted only if it equals the one
token y_{pa(u)}); the deepest accepted node u* ends the longest path of the tree whose every token agrees with
the target's argmax, and tokens t_{a_1}..t_{a_d} of that path plus the bonus token y_{u*} are exactly what greedy
decoding would emit next: each is the argmax given the exact committed sequence before it. One pass emits
depth(u*) + 1 tokens (the accepted guesses and the bonus, which becomes the next root); with no guess accepted
it is a plain greedy step.

Rolling the KV cache back (`keep_path`). After the pass the cache holds x_1..x_L and then all n nodes in node
order; the accepted path's entries are at (0-based) slots L + a_0, ..., L + a_d, which are not contiguous when
the path leaves the first branch. They are *gathered* into slots L..L + d and the rest cropped
(`DynamicCache.crop`). Gathering is exact: a node's key and value at every layer are functions of its token, its
position L + depth and the states it attends to, which under the tree mask are those of the prefix and its
ancestors, i.e. the accepted path itself; a sequential forward over the path computes the same entries (up to the
rounding of a different batch shape). Re-running the accepted tokens instead would cost one more target pass per
iteration for nothing. (Medusa's and EAGLE's code gather too, into preallocated buffers; here the cache is
transformers' own `DynamicCache`, whose layers expose their `keys` and `values` tensors.)

Why hand-written: transformers 5's `generate` verifies a single chain of candidates (assisted decoding, prompt
lookup) and has no tree candidates, no tree attention mask and no way to keep a non-contiguous path of a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

from tasks._kit.lm import cache_kwargs

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Tree:
    """A candidate tree: `parents[u]` (-1 for the root, node 0; otherwise < u), and, when it was built from
    paths, `paths[u]` (the root's is ())."""

    parents: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        p = self.parents
        if not p or p[0] != -1:
            raise ValueError("a tree's node 0 is its root (parent -1)")
        bad = [u for u in range(1, len(p)) if not 0 <= p[u] < u]
        if bad:
            raise ValueError(f"nodes {bad} have no earlier parent: a tree's nodes come in topological order")

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "Tree":
        """The tree whose nodes are the root and `paths` (tuples of choice indices), numbered by (depth, path).
        Every prefix of a path must be one of the paths too."""
        nodes = sorted({tuple(int(c) for c in p) for p in paths}, key=lambda p: (len(p), p))
        if any(not p or min(p) < 0 for p in nodes):
            raise ValueError("tree paths are non-empty tuples of choice indices >= 0")
        index = {(): 0}
        for i, p in enumerate(nodes, 1):
            index[p] = i
        missing = sorted({p[:-1] for p in nodes} - set(index))
        if missing:
            raise ValueError(f"tree paths {missing} are prefixes of others but not in the tree")
        return cls(tuple([-1] + [index[p[:-1]] for p in nodes]), tuple([()] + nodes))

    @classmethod
    def chain(cls, depth: int) -> "Tree":
        """The root and one path of first choices, `depth` long (plain draft-and-verify)."""
        return cls.from_paths([(0,) * d for d in range(1, depth + 1)])

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        d = [0] * self.size
        for u in range(1, self.size):
            d[u] = d[self.parents[u]] + 1
        return tuple(d)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def path(self, u: int) -> list[int]:
        """Nodes from the root to `u`, both included."""
        out = [u]
        while self.parents[out[-1]] >= 0:
            out.append(self.parents[out[-1]])
        return out[::-1]

    @cached_property
    def ancestors(self) -> "torch.Tensor":
        """(n, n) bool: [u, v] iff v is u or one of its ancestors (u's row of the tree attention)."""
        import torch

        allow = torch.zeros(self.size, self.size, dtype=torch.bool)
        for u in range(self.size):
            allow[u, self.path(u)] = True
        return allow

    def attention_mask(self, past: int, dtype: "torch.dtype", device) -> "torch.Tensor":
        """The additive (1, 1, n, past + n) mask M of the module docstring: every node sees the `past` cached
        tokens and its own ancestors (itself included)."""
        import torch

        tree = torch.zeros(self.size, self.size, dtype=dtype)
        tree.masked_fill_(~self.ancestors, torch.finfo(dtype).min)
        m = torch.cat([torch.zeros(self.size, past, dtype=dtype), tree], dim=1)
        return m.to(device)[None, None]

    def position_ids(self, past: int, device) -> "torch.Tensor":
        """(1, n): position L + depth(u) of node u after `past` = L cached tokens."""
        import torch

        return torch.tensor([[past + d for d in self.depths]], device=device)


def tree_forward(model, cache, tree: Tree, tokens: Sequence[int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One target pass over the tree's `tokens` (node order) after the prefix in `cache`, which keeps their keys
    and values (roll back with `keep_path`). Returns (logits (n, V), final hidden states (n, H)): the decoder's
    normalised output, which the output embedding (lm_head) maps to the logits."""
    import torch

    decoder = model.get_decoder()
    past = cache.get_seq_length()
    dev = model.device
    out = decoder(input_ids=torch.tensor([list(tokens)], device=dev), position_ids=tree.position_ids(past, dev),
                  attention_mask=tree.attention_mask(past, model.dtype, dev), **cache_kwargs(decoder, cache),
                  use_cache=True)
    hidden = out.last_hidden_state[0]
    return model.get_output_embeddings()(hidden), hidden


def verify_greedy(tree: Tree, tokens: Sequence[int], predicted: Sequence[int]) -> list[int]:
    """The accepted path (node indices, root first) of greedy verification: acc(0); acc(u) iff acc(pa(u)) and
    tokens[u] == predicted[pa(u)], where predicted[v] is the target's argmax at node v. The deepest accepted
    node ends it (the first in node order if two were, which distinct sibling tokens rule out)."""
    ok = [False] * tree.size
    ok[0] = True
    best, depths, parents = 0, tree.depths, tree.parents
    for u in range(1, tree.size):
        p = parents[u]
        if ok[p] and tokens[u] == predicted[p]:
            ok[u] = True
            if depths[u] > depths[best]:
                best = u
    return tree.path(best)


def keep_path(cache, past: int, path: Sequence[int]) -> None:
    """Keep only the prefix (`past` entries) and the accepted `path`'s entries, gathered to past..past+len-1
    (see the module docstring); everything after is cropped."""
    import torch

    n = len(path)
    if list(path) != list(range(n)):
        layers = cache.layers
        idx = torch.tensor(path, device=layers[0].keys.device) + past
        for layer in layers:
            layer.keys[:, :, past:past + n] = layer.keys.index_select(2, idx)
            layer.values[:, :, past:past + n] = layer.values.index_select(2, idx)
    extra = cache.get_seq_length() - (past + n)
    if extra > 0:
        cache.crop(-extra)


def best_first_tree(accuracy: Sequence[Sequence[float]], size: int) -> list[tuple[int, ...]]:
    """Medusa's optimised sparse tree (Cai et al. 2024): with a_d[i] the probability that the i-th ranked
    candidate at depth d is right (measured), and depths assumed independent, a node's path
    (c_1..c_d) contributes prod_j a_j[c_j] to the expected accepted length, so the best tree of `size` non-root
    nodes holds the `size` paths of largest product. A child's product never exceeds its parent's, so taking
    them best first (ties: the lexicographically smaller path) always yields a tree. Returns the paths."""
    import heapq

    depth = len(accuracy)
    heap = [(-accuracy[0][c], (c,)) for c in range(len(accuracy[0]))]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < size:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < depth:
            for c in range(len(accuracy[len(path)])):
                heapq.heappush(heap, (neg * accuracy[len(path)][c], path + (c,)))
    return chosen
