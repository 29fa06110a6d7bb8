"""`baselines.decoding._tree`: trees from choice paths, greedy verification of the longest agreeing path (hand-made
logits with a known answer, and a brute-force search over random cases), the tree attention mask against a
direct forward pass per branch on tiny Llamas, the KV cache kept for a non-contiguous accepted path, and Medusa's
best-first sparse tree."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import DynamicCache

from baselines.decoding._tree import Tree, best_first_tree, keep_path, tree_forward, verify_greedy
from decoding_models import tiny_llama

# root; depth 1: (0,) (1,) (2,); depth 2: (0,0) (0,1) (1,0); depth 3: (0,0,0) (1,0,0)
PATHS = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 0)]
TREES = {
    "chain-3": Tree.chain(3),
    "dense-2x3": Tree.from_paths([p for d in (1, 2, 3) for p in itertools.product((0, 1), repeat=d)]),
    "sparse": Tree.from_paths(PATHS),
}


# ---- the tree -----------------------------------------------------------------------------------------------

def test_paths_are_numbered_by_depth_then_choice_with_parents_first():
    t = Tree.from_paths(list(reversed(PATHS)))  # the order given does not matter
    assert t.paths == ((),) + tuple(PATHS)
    assert t.parents == (-1, 0, 0, 0, 1, 1, 2, 4, 6)
    assert t.depths == (0, 1, 1, 1, 2, 2, 2, 3, 3) and t.max_depth == 3 and t.size == 9
    assert t.path(8) == [0, 2, 6, 8] and t.path(0) == [0]
    assert Tree.chain(2).parents == (-1, 0, 1)


def test_the_ancestor_matrix_and_the_additive_mask():
    t = TREES["sparse"]
    want = torch.zeros(9, 9, dtype=torch.bool)
    for u in range(9):
        for v in t.path(u):
            want[u, v] = True
    assert torch.equal(t.ancestors, want)
    assert want[7].nonzero().flatten().tolist() == [0, 1, 4, 7]  # (0,0,0) sees (0,0), (0,) and the root
    m = t.attention_mask(5, torch.float32, "cpu")
    assert m.shape == (1, 1, 9, 14)
    assert (m[0, 0, :, :5] == 0).all()  # every node sees the whole cached prefix
    assert torch.equal(m[0, 0, :, 5:] == 0, want)
    assert (m[0, 0, :, 5:][~want] == torch.finfo(torch.float32).min).all()
    assert t.position_ids(5, "cpu").tolist() == [[5, 6, 6, 6, 7, 7, 7, 8, 8]]


@pytest.mark.parametrize("paths,match", [([(0, 1)], "prefixes"), ([(0,), (0, 0, 1)], "prefixes"),
                                         ([()], "non-empty"), ([(-1,)], ">= 0")])
def test_a_path_set_that_is_not_a_tree_is_refused(paths, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_paths(paths)


def test_a_tree_from_its_parent_array_is_the_tree_of_the_same_paths():
    """EAGLE-2's trees change every pass and come as parent arrays; the same shape from paths is the same tree."""
    t = Tree((-1, 0, 0, 0, 1, 1, 2, 4, 6))
    same = TREES["sparse"]
    assert t == same and t.paths is None
    assert t.depths == same.depths and torch.equal(t.ancestors, same.ancestors)
    assert [t.path(u) for u in range(t.size)] == [same.path(u) for u in range(same.size)]


@pytest.mark.parametrize("parents", [(0,), (-1, 1), (-1, 0, 3, 1), ()])
def test_parents_must_come_first(parents):
    with pytest.raises(ValueError):
        Tree(parents)


# ---- greedy verification on hand-made logits ---------------------------------------------------------------

def logits_with_argmax(predicted: list[int], vocab: int = 12) -> torch.Tensor:
    """Random logits whose row u has its maximum at predicted[u] (by a clear margin)."""
    g = torch.Generator().manual_seed(len(predicted))
    x = torch.randn(len(predicted), vocab, generator=g)
    x[torch.arange(len(predicted)), predicted] = x.max() + 1.0
    return x


# node:     0   1   2   3   4   5   6   7   8
# path:     r  (0) (1) (2) (00)(01)(10)(000)(100)
CASES = [
    # the target's argmax at each node, the tokens at each node -> the accepted path
    ("nothing agrees", [5, 5, 5, 5, 5, 5, 5, 5, 5], [9, 1, 2, 3, 4, 4, 6, 7, 8], [0]),
    ("first branch, all the way", [1, 4, 9, 9, 7, 9, 9, 3, 9], [9, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 4, 7]),
    ("first branch, stops at depth 2", [1, 4, 9, 9, 0, 9, 9, 3, 9], [9, 1, 2, 3, 4, 5, 6, 8, 8], [0, 1, 4]),
    ("second choice at depth 2", [1, 5, 9, 9, 9, 9, 9, 9, 9], [9, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 5]),
    ("second branch, deepest", [2, 9, 6, 9, 9, 9, 8, 9, 9], [9, 1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 6, 8]),
    ("third choice at depth 1 only", [3, 9, 9, 9, 9, 9, 9, 9, 9], [9, 1, 2, 3, 4, 5, 6, 7, 8], [0, 3]),
    # a node whose token agrees with its parent's prediction is not accepted when its parent was rejected
    ("an agreeing node under a rejected parent", [1, 0, 6, 0, 0, 0, 8, 0, 0], [9, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1]),
]


@pytest.mark.parametrize("name,predicted,tokens,want", CASES, ids=[c[0] for c in CASES])
def test_verification_accepts_exactly_the_longest_agreeing_path(name, predicted, tokens, want):
    tree = TREES["sparse"]
    logits = logits_with_argmax(predicted)
    assert verify_greedy(tree, tokens, logits.argmax(-1).tolist()) == want


def brute_force(tree: Tree, tokens, predicted) -> int:
    """The depth of the longest root-to-node path whose every token is the target's argmax after its parent."""
    best = 0
    for u in range(tree.size):
        p = tree.path(u)
        if all(tokens[p[j + 1]] == predicted[p[j]] for j in range(len(p) - 1)):
            best = max(best, len(p) - 1)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", list(TREES))
def test_verification_matches_a_brute_force_search(name, seed):
    tree, rng = TREES[name], random.Random(seed)
    for _ in range(200):
        vocab = rng.choice([2, 3, 5])  # small vocabularies: many agreements, and repeated tokens among siblings
        tokens = [rng.randrange(vocab) for _ in range(tree.size)]
        predicted = [rng.randrange(vocab) for _ in range(tree.size)]
        path = verify_greedy(tree, tokens, predicted)
        assert path[0] == 0 and len(path) - 1 == brute_force(tree, tokens, predicted)
        assert path == tree.path(path[-1])  # a root-to-node path of the tree
        assert all(tokens[path[j + 1]] == predicted[path[j]] for j in range(len(path) - 1))


# ---- the tree attention mask against a direct forward pass --------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("past", [1, 7])
def test_each_node_sees_exactly_its_ancestors(attn, name, past):
    """One pass over the tree after a cached prefix gives, at every node, the logits and hidden state of a plain
    causal forward over the prefix followed by the node's path (float32, to rounding)."""
    tree = TREES[name]
    model = tiny_llama(64, seed=3)
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(past)
    prefix = torch.randint(2, 64, (1, past), generator=g)
    tokens = torch.randint(2, 64, (tree.size,), generator=g).tolist()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix, cache=cache, use_cache=True)
        logits, hidden = tree_forward(model, cache, tree, tokens)
        assert cache.get_seq_length() == past + tree.size
        for u in range(tree.size):
            seq = torch.cat([prefix, torch.tensor([[tokens[v] for v in tree.path(u)]])], dim=1)
            out = model(input_ids=seq, output_hidden_states=True)
            torch.testing.assert_close(logits[u], out.logits[0, -1], rtol=1e-4, atol=1e-5)
            want_h = model.get_decoder()(input_ids=seq).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[u], want_h, rtol=1e-4, atol=1e-5)


# ---- keeping the accepted path in the KV cache --------------------------------------------------------------

@pytest.mark.parametrize("node", [0, 1, 4, 7, 5, 8, 3])  # contiguous paths (0, 1, 4, 7) and scattered ones
def test_the_cache_keeps_exactly_the_accepted_path(node):
    """After keep_path the cache holds what a direct forward over prefix + path would have put there, and the next
    step's logits are the direct ones."""
    tree = TREES["sparse"]
    path = tree.path(node)
    model = tiny_llama(64, seed=4)
    g = torch.Generator().manual_seed(node)
    prefix = torch.randint(2, 64, (1, 5), generator=g)
    tokens = torch.randint(2, 64, (tree.size,), generator=g).tolist()
    kept = [tokens[u] for u in path]
    cache, direct = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix, cache=cache, use_cache=True)
        tree_forward(model, cache, tree, tokens)
        keep_path(cache, 5, path)
        model(input_ids=torch.cat([prefix, torch.tensor([kept])], 1), cache=direct, use_cache=True)
        assert cache.get_seq_length() == direct.get_seq_length() == 5 + len(path)
        for a, b in zip(cache.layers, direct.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)
        nxt = torch.tensor([[11]])
        got = model(input_ids=nxt, cache=cache, use_cache=True).logits[0, -1]
        want = model(input_ids=torch.cat([prefix, torch.tensor([kept]), nxt], 1)).logits[0, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- Medusa's best-first sparse tree ------------------------------------------------------------------------

def test_the_sparse_tree_holds_the_paths_of_largest_expected_acceptance():
    acc = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.05], [0.4, 0.1, 0.0]]
    value = {p: float(torch.tensor([acc[d][c] for d, c in enumerate(p)]).prod())
             for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)}
    for size in (1, 4, 9, 20):
        paths = best_first_tree(acc, size)
        assert len(paths) == size and len(set(paths)) == size
        Tree.from_paths(paths)  # a valid tree: every prefix is in it
        worst_in = min(value[p] for p in paths)
        best_out = max((v for p, v in value.items() if p not in paths), default=0.0)
        assert worst_in >= best_out - 1e-12
    assert best_first_tree(acc, 3) == [(0,), (0, 0), (1,)]  # expected acceptance 0.6, 0.3, then 0.2
    assert len(best_first_tree(acc, 100)) == 39  # capped by every path there is: 3 + 9 + 27
