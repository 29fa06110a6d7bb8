"""`eagle`: the loss's alignment (a head that outputs f_{t+1} has zero regression loss and top-1 agreement
everywhere), training lowers the loss, the draft's tree passes equal direct causal forwards of the head along each
node's path, EAGLE-2's rerank keeps a connected tree equal to the top-m nodes by value (hand-made draft
probabilities), decoding reproduces greedy output token for token (static and dynamic trees, untrained and trained
heads, EOS and length limits), training through `apply` is cached with its cost, settings are checked, and whole
smoke runs on arith (both trees) and offline gsm8k."""

from __future__ import annotations

import copy
import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from baselines.decoding._eagle import Features, build_head, causal_mask, eagle_loss, heldout_metrics, train_head
from baselines.decoding._tree import Tree
from baselines.decoding.eagle import EagleConfig, EagleDecoder, select_dynamic, static_tree
from baselines.decoding.jacobi import Counters
from bench.config import ConfigError
from bench.registry import create_method
from decoding_models import RowsTask, greedy, tiny_llama
from tasks._kit import lm
from tasks.base import Subject

ACCURACY = [0.6, 0.2, 0.1, 0.05]  # made-up rank accuracies, for static trees


def noisy_head(model, noise: float, seed: int = 0):
    """An untrained head with extra noise on its weights, so its guesses vary."""
    head = build_head(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.ndim == 2:
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    return head.requires_grad_(False)


def loopy_prompts(vocab: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (1, 3 + (5 * i) % 9), generator=g) for i in range(count)]


def self_examples(model, prompts, max_new: int):
    out = []
    for p in prompts:
        answer = greedy(model, p, max_new, eos=10_000, pad=1)
        out.append((p[0].tolist() + answer, [-100] * p.shape[1] + answer))
    return out


def decoder_for(model, head, tree_kind: str, counters=None, depth=4, top_k=4, total=16):
    tree = None if tree_kind == "dynamic" else static_tree(ACCURACY, depth, top_k, total)
    return EagleDecoder(model, head, counters or Counters(), depth=depth, top_k=top_k, total_tokens=total, tree=tree,
                        dynamic=tree_kind == "dynamic")


@pytest.fixture(scope="module")
def trained(ctx):
    """A head briefly trained on a 16-token random Llama's own greedy continuations (which loop)."""
    model = tiny_llama(16, seed=2, eos=0, pad=1)
    examples = self_examples(model, loopy_prompts(16, 24, seed=5), 40)
    cfg = EagleConfig(steps=60, batch_size=8, warmup_steps=5, lr=3e-3)
    head, stats, metrics = train_head(model, examples[:20], examples[20:], cfg, ctx, pad_id=1)
    return SimpleNamespace(model=model, head=head.requires_grad_(False), stats=stats, metrics=metrics,
                           examples=examples, cfg=cfg)


# ---- the head and its loss ----------------------------------------------------------------------------------

def test_the_head_is_fc_then_one_decoder_layer_of_the_reference_width():
    model = tiny_llama(40, hidden=32, seed=1)
    head = build_head(model)
    assert head.fc.in_features == 64 and head.fc.out_features == 32
    assert isinstance(head.layer.input_layernorm, torch.nn.Identity)  # as in the authors' code
    f, e = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    out = head(f, e, torch.arange(5)[None].expand(2, 5), causal_mask(5, 0, torch.float32, "cpu"))
    assert out.shape == (2, 5, 32)
    # causal: position 2's output does not depend on later inputs
    f2 = f.clone()
    f2[:, 3:] += 1.0
    out2 = head(f2, e, torch.arange(5)[None].expand(2, 5), causal_mask(5, 0, torch.float32, "cpu"))
    torch.testing.assert_close(out[:, :3], out2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])


def test_the_loss_targets_the_next_feature_and_the_token_after():
    """Draft position i reads (f_i, x_{i+1}) and is scored against f_{i+1} and p_{i+2}: a head that returns
    exactly f_{i+1} has L_reg = 0, L_cls = H(p) and top-1 agreement at every scored position; positions count
    where x_{i+2} is an answer token."""
    model = tiny_llama(40, seed=3)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8]])  # a 2-token prompt, then a 4-token answer
    feats, embeds = Features(model)(ids, torch.ones_like(ids))
    w = model.lm_head.weight.detach()

    def oracle(inp, emb, pos, mask, cache=None):
        assert torch.equal(emb, embeds[:, 1:])  # the shifted tokens' embeddings
        return feats[:, 1:]

    loss, parts = eagle_loss(oracle, feats, embeds, labels, w, w_cls=0.1)
    assert parts["positions"] == 4 and parts["top1"] == 4 and parts["reg"] == 0.0
    p = torch.softmax(feats[0, 1:5] @ w.T, -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert parts["cls"] == pytest.approx(entropy, rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * entropy, rel=1e-5)


def test_features_are_the_reference_top_layer_and_memoised():
    model = tiny_llama(40, seed=3)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    feats = Features(model)
    f, e = feats(ids, mask)
    want = model.get_decoder()(input_ids=ids[:1]).last_hidden_state[0]
    torch.testing.assert_close(f[0], want)
    torch.testing.assert_close(model.lm_head(f[0]), model(input_ids=ids[:1]).logits[0])  # what the LM head reads
    assert len(feats.memo) == 2 and (f[1, 2:] == 0).all()
    again, _ = feats(ids, mask)
    assert torch.equal(again, f)


def test_training_lowers_the_loss_and_leaves_the_reference_alone(ctx, trained):
    before = heldout_metrics(build_head(trained.model, ctx.seed), Features(trained.model), trained.examples[:20],
                             trained.cfg, "cpu", 1)
    after = heldout_metrics(trained.head, Features(trained.model), trained.examples[:20], trained.cfg, "cpu", 1)
    assert after["loss"] < 0.7 * before["loss"] and after["accuracy"][0] > before["accuracy"][0]
    assert trained.stats.steps == 60 and trained.stats.tokens_seen > 0
    assert len(trained.metrics["accuracy"]) == 10 and 0 <= trained.metrics["accuracy"][0] <= 1
    assert sum(trained.metrics["accuracy"]) <= 1 + 1e-6  # ranks are exclusive
    ref = tiny_llama(16, seed=2, eos=0, pad=1)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), trained.model.state_dict().values()))


# ---- drafting -----------------------------------------------------------------------------------------------

def direct_logp(model, head, pairs_f: torch.Tensor, pairs_t: list[int]) -> torch.Tensor:
    """log p^ at the last of a chain of pairs, by a plain causal forward of the head without a cache."""
    n = len(pairs_t)
    out = head(pairs_f[None], model.get_input_embeddings()(torch.tensor([pairs_t])), torch.arange(n)[None],
               causal_mask(n, 0, torch.float32, "cpu"))[0]
    return torch.log_softmax(model.lm_head(out), -1), out


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_tree_passes_equal_direct_forwards_along_each_path(kind):
    """Every drafted node's token is the c-th ranked token (static) or among the top-k (dynamic) of its parent's
    draft distribution as a direct forward of the head over the committed pairs and the path computes it, and the
    dynamic score is the sum of those log-probabilities along the path."""
    model = tiny_llama(64, seed=4)
    head = noisy_head(model, 0.5, seed=4)
    dec = decoder_for(model, head, kind, depth=3, top_k=3, total=10)
    prompt = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        f = model.get_decoder()(input_ids=prompt).last_hidden_state[0]
        root = int(model.lm_head(f[-1]).argmax())
        toks = prompt[0, 1:].tolist() + [root]
        cache = DynamicCache(config=head.config)
        # commit the first 4 pairs first, so the draft pass runs after a non-empty draft cache
        dec.draft(cache, f[:4], toks[:4])
        cache.crop(-(cache.get_seq_length() - 4))
        tree, tokens = dec.draft(cache, f[4:], toks[4:])
        assert cache.get_seq_length() == 6  # drafted entries cropped, the pairs kept
        assert tokens[0] == root and tree.size == 11
        for u in range(1, tree.size):
            path = tree.path(u)
            pf, pt = f, list(toks)
            score = 0.0
            for j in range(1, len(path)):  # walk down, each node's input feature is its parent's output
                logp, out = direct_logp(model, head, pf, pt)
                rank = logp[-1].argsort(descending=True).tolist().index(tokens[path[j]])
                score += float(logp[-1, tokens[path[j]]])
                pf = torch.cat([pf, out[-1:]])
                pt = pt + [tokens[path[j]]]
            if kind == "static":
                assert rank == tree.paths[u][-1]
            else:
                assert rank < 3
        assert tree.max_depth <= 3


def test_the_dynamic_tree_is_the_top_m_nodes_by_value_and_connected():
    """Hand-made draft distributions (a fixed random table per fed node's token path): the verified tree is a
    connected tree whose nodes are exactly the m drafted nodes of largest V = product of draft probabilities."""
    vocab, k, depth, m = 9, 3, 4, 12
    model = tiny_llama(vocab, seed=5)
    g = torch.Generator().manual_seed(5)
    table = {}

    def logp_of(path):  # the draft's distribution after a token path (root excluded)
        if path not in table:
            table[path] = torch.log_softmax(2 * torch.randn(vocab, generator=g), -1)
        return table[path]

    dec = decoder_for(model, build_head(model), "dynamic", depth=depth, top_k=k, total=m)
    fed_paths = {}

    def fake_pass(cache, feats, tokens, positions, mask):
        # the fed feature carries the node's path id; return each node's hand-made distribution and a feature
        # naming the path of each fed node (looked up from the feature's first entry)
        paths = [fed_paths[int(f[0])] + (t,) for f, t in zip(feats, tokens)]
        out = torch.zeros(len(tokens), feats.shape[1])
        for i, p in enumerate(paths):
            fed_paths[len(fed_paths)] = p
            out[i, 0] = len(fed_paths) - 1
        return out, torch.stack([logp_of(p) for p in paths])

    dec._pass = fake_pass
    fed_paths[0] = ()
    root_h = torch.zeros(model.config.hidden_size)
    dec._base = 0
    tree, tokens = dec._dynamic(DynamicCache(config=dec.head.config), 1, root_h, logp_of(()), 0)
    got = {tuple(tokens[v] for v in tree.path(u)[1:]) for u in range(1, tree.size)}
    # the same expansion by brute force: every drafted path with its V
    values = {}
    current = {}
    for t, p in enumerate(logp_of(()).exp().tolist()):
        current[(t,)] = p
    current = dict(sorted(current.items(), key=lambda x: -x[1])[:k])
    values.update(current)
    for _ in range(2, depth + 1):
        new = {}
        for q in sorted(current, key=lambda q: -current[q])[:k]:
            probs = logp_of(q).exp()
            for t in probs.topk(k).indices.tolist():
                new[q + (t,)] = current[q] * float(probs[t])
        values.update(new)
        current = new
    want = set(sorted(values, key=lambda q: -values[q])[:m])
    assert got == want and tree.size == m + 1
    assert all(q[:-1] in got or len(q) == 1 for q in got)  # connected: every node's parent is in the tree
    worst_in = min(values[q] for q in got)
    assert all(values[q] <= worst_in + 1e-9 for q in values if q not in got)


@pytest.mark.parametrize("seed", range(5))
def test_rerank_keeps_the_top_m_and_is_closed_under_parents(seed):
    rng = random.Random(seed)
    parents, scores, depths = [], [], []
    for i in range(40):
        p = rng.choice([-1] + list(range(i))) if i else -1
        parents.append(p)
        s = math.log(rng.choice([1.0, 0.5, 0.3, 0.1]))  # factors of 1 make ties with the parent
        scores.append(s + (scores[p] if p >= 0 else 0.0))
        depths.append(1 + (depths[p] if p >= 0 else 0))
    for m in (1, 5, 17, 40):
        keep = select_dynamic(parents, scores, depths, m)
        assert len(keep) == m and set(keep) >= {parents[u] for u in keep} - {-1}
        order = {u: i for i, u in enumerate(keep)}
        assert all(parents[u] < 0 or order[parents[u]] < order[u] for u in keep)  # parents first
        worst = min(scores[u] for u in keep)
        assert all(scores[u] <= worst for u in range(40) if u not in keep)


@pytest.mark.parametrize("depth,top_k,total", [(4, 4, 16), (2, 3, 5), (5, 2, 20), (3, 10, 12)])
def test_the_static_tree_fits_its_settings(depth, top_k, total):
    tree = static_tree([0.7, 0.1, 0.05, 0.03, 0.02], depth, top_k, total)
    assert tree.size - 1 == min(total, sum(min(top_k, 5) ** d for d in range(1, depth + 1)))
    assert tree.max_depth <= depth and max(p[-1] for p in tree.paths[1:]) < min(top_k, 5)
    assert static_tree([0.7, 0.1], 4, 1, 4) == Tree.chain(4)


# ---- exact greedy output ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("head_kind", ["untrained", "trained"])
def test_reproduces_greedy_on_a_model_that_repeats_itself(kind, head_kind, trained):
    model = trained.model
    head = trained.head if head_kind == "trained" else noisy_head(model, 0.3)
    counters = Counters()
    dec = decoder_for(model, head, kind, counters)
    total = 0
    for p in loopy_prompts(16, 5, seed=1):
        with torch.no_grad():
            got = dec.generate(p, 60, None)
        assert got == greedy(model, p, 60, eos=10_000, pad=1)
        total += len(got)
    assert counters.tokens == total and counters.calls == 5
    if head_kind == "trained":
        assert counters.extra.get("accept_depth_2", 0) > 0 and counters.forward_passes < total / 1.5
    assert counters.extra["draft_passes"] == 4 * counters.extra["tree_passes"]


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_reproduces_greedy_with_the_arith_tokenizer(target, tokenizer, prompts, kind):
    """An 883-token random Llama: guesses are mostly wrong, so most passes reject every node."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    dec = decoder_for(target, noisy_head(target, 0.3), kind)
    for ids in prompts:
        with torch.no_grad():
            assert dec.generate(ids, 40, eos) == greedy(target, ids, 40, eos, pad)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("max_new", [1, 2, 5, 17, 40])
def test_stops_at_eos_and_at_max_new_tokens(kind, max_new, trained):
    model = trained.model
    dec = decoder_for(model, trained.head, kind)
    for p in loopy_prompts(16, 3, seed=3):
        free = greedy(model, p, 40, eos=10_000, pad=1)
        for eos in (free[0], free[3], free[11], 10_000):  # first token, inside, later, never
            with torch.no_grad():
                got = dec.generate(p, max_new, eos)
            assert got == greedy(model, p, max_new, eos=eos, pad=1)
            assert len(got) <= max_new and eos not in got[:-1]


# ---- apply: training, cache, cost, statistics ---------------------------------------------------------------

def test_apply_trains_caches_and_decodes_exactly(target, tokenizer, arith_task, prompts, smoke_ctx):
    model = copy.deepcopy(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    subject = Subject(model, "causal-lm", {"tokenizer": tokenizer})
    task = RowsTask(arith_task.train[:200])
    method = create_method("eagle", {"tree": "dynamic", "max_new_tokens": "40"})
    applied = method.apply(subject, task, smoke_ctx)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the reference is frozen
    assert applied.cost.steps == 20 and applied.cost.seconds > 0 and applied.cost.tokens_seen > 0
    assert "greedy answers" in applied.cost.description and "one-layer draft head" in applied.cost.description
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids in prompts[:2]:
        with torch.no_grad():
            out = lm.generate_ids(applied.subject, ids, 30)
        assert out[0, :ids.shape[1]].tolist() == ids[0].tolist()
        assert out[0, ids.shape[1]:].tolist() == greedy(model, ids, 30, eos, pad)
    s = applied.stats()
    assert s["mean_accepted_length"] == pytest.approx(s["tokens"] / s["forward_passes"]) and s["calls"] == 2
    assert s["draft_passes_per_target_pass"] == 4 and 0 < s["tree_nodes"] <= 16
    assert s["draft_parameters"] > 0 and s["draft_macs_per_token"] > s["draft_parameters"] / 2
    assert s["draft_seconds_per_pass"] > 0 and s["target_seconds_per_pass"] > 0
    assert 0 <= s["heldout_top1"] <= 1 and s["heldout_loss"] > 0
    assert all(0 <= s[f"accept_depth_{d}"] <= 1 for d in range(1, 5))
    # a second apply reads the head and its cost from the cache, whatever the tree and its shape
    again = create_method("eagle", {"tree": "static", "depth": "3", "max_new_tokens": "40"})
    head, meta, built = again.train(subject, task, smoke_ctx)
    first, _, _ = method.train(subject, task, smoke_ctx)
    assert not built and all(torch.equal(a, b) for a, b in zip(head.parameters(), first.parameters()))
    static = again.apply(subject, task, smoke_ctx)
    assert static.cost == applied.cost
    with torch.no_grad():
        out = lm.generate_ids(static.subject, prompts[2], 30)
    assert out[0, prompts[2].shape[1]:].tolist() == greedy(model, prompts[2], 30, eos, pad)
    assert static.stats()["draft_passes_per_target_pass"] <= 3
    # a training setting is part of the key: another noise level trains another head
    _, _, built = create_method("eagle", {"noise": "0", "max_new_tokens": "40"}).train(subject, task, smoke_ctx)
    assert built


# ---- settings and contracts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [("tree", "sparse", "not one of"), ("depth", "0", "depth"),
                                             ("top_k", "0", "top_k"), ("total_tokens", "0", "total_tokens"),
                                             ("w_cls", "-1", "w_cls"), ("noise", "-0.1", "noise"),
                                             ("steps", "0", "steps"), ("lr", "0", "lr")])
def test_invalid_settings_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        create_method("eagle", {key: value}).config.validate()


def test_defaults_validate():
    cfg = EagleConfig()
    cfg.validate()
    assert cfg.tree == "static" and cfg.w_cls == 0.1 and cfg.noise == 0.1


def test_an_attention_that_ignores_4d_masks_is_refused(target, tokenizer, ctx):
    model = copy.deepcopy(target)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        create_method("eagle").apply(Subject(model, "causal-lm", {"tokenizer": tokenizer}), RowsTask([]), ctx)


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_smoke_run_on_arith(results_root, tree):
    from bench.runner import run

    r = run("arith", "eagle", budget="smoke", overrides={"tree": tree}, results_root=results_root).result
    assert r.status == "ok"
    assert r.fidelity.value == 1.0 and r.quality.delta == 0  # greedy: the reference's answers, token for token
    s = r.method_stats
    assert s["mean_accepted_length"] >= 1 and s["forward_passes"] > 0 and 0 <= s["accept_depth_1"] <= 1
    assert s["draft_passes_per_target_pass"] > 0 and s["draft_parameters"] > 0 and "heldout_top1" in s
    assert r.cost.steps == 20 and r.cost.seconds > 0


@pytest.mark.slow
def test_smoke_run_on_gsm8k_offline(tmp_path_factory, results_root):
    """The full task through the runner on its fixture files and tiny random models (lm-eval's 5-shot contexts,
    the pad = EOS tokenizer setup, TrainingRows from the train.jsonl)."""
    import sys
    from pathlib import Path

    from bench.runner import run
    from bench.store import load_result

    sys.path.insert(0, str(Path(__file__).parents[2] / "tasks"))  # the task tests' fixture writers
    import full_fixtures

    with full_fixtures.full_task_env(tmp_path_factory.mktemp("full"), separate_draft=False):
        r = load_result(run("gsm8k", "eagle", budget="smoke", overrides={"max_new_tokens": "24", "tree": "dynamic"},
                            results_root=results_root).path, results_root)
    assert r.status == "ok" and r.task.tier == "full"
    assert r.fidelity.value == 1.0
    assert 0 < r.cost.steps <= 20 and r.cost.tokens_seen > 0
    assert r.method_stats["forward_passes"] > 0 and r.method_stats["mean_accepted_length"] >= 1
