"""`arith-nli`: GLUE-layout pairs from arith, the digit-by-digit tokenizer, the published reference, a whole run."""

from __future__ import annotations

import collections
import hashlib

import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks import arith_data, arith_nli, arith_nli_data
from tasks.arith_nli import ART, ArithNLI
from tasks.base import RunContext

# sha256 of the pairs as generated (arith_data.fingerprint): a change to either generator shows up here
TRAIN_FINGERPRINT = "951b0f8073d8ad5e546db29d6cf6c04150270cf2302ec9aeee42caa0d05071f4"
TEST_FINGERPRINT = "80e90a30302e5bf0db286521012d23d60647dfc9862618a4a14cb9504d22f25f"
REFERENCE_ACCURACY = 0.798  # the published reference on the 1,000 test pairs, cpu profile (see the module)


@pytest.fixture(scope="module")
def ctx() -> RunContext:
    torch.set_num_threads(1)
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=32)


@pytest.fixture(scope="module")
def task(ctx) -> ArithNLI:
    t = ArithNLI()
    t.load(ctx)
    return t


@pytest.fixture(scope="module")
def problems():
    return arith_data.generate()


# ---- pairs --------------------------------------------------------------------------------------------------

def test_pairs_are_in_glue_layout_balanced_and_pinned(task, problems):
    for rows, source in ((task.train_pairs, problems[0]), (task.test_pairs, problems[1])):
        assert len(rows) == 2 * len(source)
        assert all(set(r) == {"premise", "hypothesis", "label", "idx"} for r in rows)
        assert [r["idx"] for r in rows] == list(range(len(rows)))
        for i, p in enumerate(source):  # two rows per problem, adjacent: the question with each label once
            a, b = rows[2 * i], rows[2 * i + 1]
            assert a["premise"] == b["premise"] == p["question"]
            assert {a["label"], b["label"]} == {0, 1}
        assert collections.Counter(r["label"] for r in rows) == {0: len(source), 1: len(source)}
    assert len(task.test_pairs) == 1000 and len(task.train_pairs) == 40_000
    assert arith_nli_data.LABELS == ("entailment", "not_entailment")
    assert arith_data.fingerprint(task.train_pairs) == TRAIN_FINGERPRINT
    assert arith_data.fingerprint(task.test_pairs) == TEST_FINGERPRINT
    assert arith_nli_data.generate() == (task.train_pairs, task.test_pairs)  # deterministic


def test_true_hypothesis_is_the_answer_and_false_one_a_plausible_distractor(task, problems):
    kinds = collections.Counter()
    for rows, source in ((task.train_pairs, problems[0]), (task.test_pairs, problems[1])):
        answers = {int(arith_data.final_answer(p["answer"])) for p in source}
        for i, p in enumerate(source):
            answer = int(arith_data.final_answer(p["answer"]))
            true, false = sorted(rows[2 * i:2 * i + 2], key=lambda r: r["label"])
            assert arith_nli_data.number_of(true["hypothesis"]) == answer
            wrong = arith_nli_data.number_of(false["hypothesis"])
            assert wrong != answer and 1 <= wrong < arith_nli_data.MAX_VALUE
            # one of the problem's own candidates, or another problem's answer far enough from this one
            own = [k for k, values in arith_nli_data.candidates(p)[1].items() if wrong in values]
            gap, share = arith_nli_data.FAR
            far = wrong in answers and abs(wrong - answer) >= max(gap, share * answer)
            assert own or far
            kinds.update(own or ["other"])
    assert all(kinds[k] > 1000 for k in ("question", "step", "op", "other")), kinds  # every kind is used
    p = {"question": "Ava has 4 bags with 6 pens in each and 5 more pens.",
         "answer": "A <<4*6=24>>24 b.\nB <<24+5=29>>29 c.\n#### 29"}
    assert arith_nli_data.candidates(p) == (29, {"question": [4, 5, 6], "step": [24], "op": [19, 120], "other": []})
    # other answers are kept at least max(5, 25% of 29) = 7.25 away from 29, and in range
    assert arith_nli_data.candidates(p, [29, 30, 20, 7, 300, 22, 36, 37])[1]["other"] == [7, 20, 37]


def test_the_hypothesis_alone_does_not_give_the_label(task):
    """A per-number majority vote learned on the training pairs is at chance on the test pairs."""
    votes = collections.defaultdict(collections.Counter)
    for r in task.train_pairs:
        votes[arith_nli_data.number_of(r["hypothesis"])][r["label"]] += 1
    guess = [votes[arith_nli_data.number_of(r["hypothesis"])].most_common(1) for r in task.test_pairs]
    acc = sum((g[0][0] if g else 0) == r["label"] for g, r in zip(guess, task.test_pairs)) / len(task.test_pairs)
    assert 0.45 < acc < 0.56, acc


# ---- tokenizer ----------------------------------------------------------------------------------------------

def test_tokenizer_spells_digits_and_round_trips(task):
    tok = task.tokenizer
    assert all(not any(c.isdigit() for c in t) or len(t.removeprefix("##")) == 1 for t in tok.get_vocab())
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == list("1234")
    for r in task.test_pairs[:200]:
        for text in (r["premise"], r["hypothesis"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            # WordPiece keeps every character; only the spaces between tokens are not kept
            assert "".join(tok.decode(ids).split()) == "".join(text.split())
    enc = tok("Ava has 3 pens.", "The answer is 12.")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == \
        ["[CLS]", "Ava", "has", "3", "pens", ".", "[SEP]", "The", "answer", "is", "1", "2", ".", "[SEP]"]
    assert enc["token_type_ids"] == [0] * 7 + [1] * 7
    assert tok.pad_token_id == 0 and tok.cls_token == "[CLS]" and tok.mask_token == "[MASK]"


def test_the_published_tokenizer_is_rebuilt_byte_for_byte(task):
    published = (ART / "tokenizer.json").read_text()
    assert arith_nli_data.tokenizer_json(task.train_tokenizer()) == published
    assert hashlib.sha256(published.encode()).hexdigest() == arith_nli.TOKENIZER_SHA256 == task.tokenizer_sha256
    loaded = arith_nli_data.load_tokenizer(ART / "tokenizer.json")
    assert loaded("Ava has 3 pens.", "The answer is 12.") == task.tokenizer("Ava has 3 pens.", "The answer is 12.")


# ---- models -------------------------------------------------------------------------------------------------

def test_encoded_splits_and_student(task):
    x, y = task.test.x, task.test.y
    assert x.dtype == torch.int64 and x.shape[:2] == (1000, 2) and y.tolist() == [r["label"] for r in task.test_pairs]
    student, reference = task.build_student(), task.build_reference()
    n_s, n_r = (sum(p.numel() for p in m.parameters()) for m in (student, reference))
    assert n_s < n_r / 3
    assert student.hf.config.num_hidden_layers * 2 == reference.hf.config.num_hidden_layers
    assert student.hf.config.id2label == {0: "entailment", 1: "not_entailment"}
    student.eval()
    with torch.inference_mode():  # padding beyond the longest pair changes nothing
        wide = torch.cat([x[:8], torch.zeros(8, 2, 5, dtype=torch.int64)], dim=2)
        assert torch.allclose(student(x[:8]), student(wide), atol=1e-6)
        assert student(x[:8]).shape == (8, 2)


def test_the_recipes_warm_up_and_clipping_are_optional():
    """arith-nli's recipes use `TrainRecipe`'s warm-up and clipping; a recipe without them keeps its old repr (the
    cache keys of every other task's trained models are built from it) and its schedule (no warm-up)."""
    from tasks._kit.classification import TrainRecipe, _warmup_cosine

    assert repr(TrainRecipe(epochs=40, lr=2e-3, batch_size=64)) == \
        "TrainRecipe(epochs=40, lr=0.002, batch_size=64, weight_decay=0.0)"
    assert repr(arith_nli.RECIPE) == ("TrainRecipe(epochs=8, lr=0.0003, batch_size=32, weight_decay=0.0, "
                                      "warmup_steps=300, clip=1.0)")
    factors = [_warmup_cosine(step, warm=4, total=12) for step in range(12)]
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.05


def test_published_reference_is_canonical_and_accurate(task, ctx):
    w = task.reference_weights(ctx)
    assert w.canonical and w.sha256 == arith_nli.REFERENCE_SHA256, w.source
    assert all(v.dtype == torch.float16 for v in w.state.values())
    ev = task.evaluate(task.subject_from_state(w.state, ctx), ctx)
    assert ev.per_example.shape == (1000,) and set(ev.per_example.tolist()) <= {0.0, 1.0}
    assert ev.value == pytest.approx(REFERENCE_ACCURACY, abs=0.005)  # other CPUs may round a logit apart
    assert task.fidelity(ev, ev) == ("label_agreement", 1.0)


def test_published_reference_learned_the_task(task, ctx):
    """Well above chance, and on both labels: not a model that predicts one label (version 1's reference did)."""
    w = task.reference_weights(ctx)
    ev = task.evaluate(task.subject_from_state(w.state, ctx), ctx)
    labels = task.test.y.numpy()
    assert ev.value > 0.75
    for label in (0, 1):
        assert ev.per_example[labels == label].mean() > 0.65, label


def test_a_whole_run_with_the_unchanged_reference(tmp_path, monkeypatch):
    from bench.runner import run

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    out = run("arith-nli", "none", budget="smoke", results_root=tmp_path / "results")
    r = out.result
    assert r.status == "ok" and r.task.reference_canonical
    assert r.task.modality == "text-classification" and r.quality.n == 1000
    assert r.quality.value == r.quality.reference_value == pytest.approx(REFERENCE_ACCURACY, abs=0.005)
    assert r.fidelity.metric == "label_agreement" and r.fidelity.value == 1.0
    assert r.speed.items_per_call == 1000 and r.profile.batch_size == 32


@pytest.mark.slow
def test_retraining_reproduces_the_published_reference(tmp_path, monkeypatch):
    """`bench reference build arith-nli` on this kind of machine (x86-64, 2 threads): minutes."""
    from bench.reference import build_reference

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    digest, _, matches = build_reference("arith-nli")
    assert digest == arith_nli.REFERENCE_SHA256 and matches
