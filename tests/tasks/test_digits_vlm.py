"""digits-vlm: deterministic questions on disjoint train/test images, visual tokens as most of the sequence, a model
that reads its images (through LLaVA's own placement), the token-dropping contract in the subject's extra, and the
task end to end at smoke budget."""

from __future__ import annotations

import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks.base import RunContext


def context(budget: str = "smoke") -> RunContext:
    return RunContext.for_profile(load_profile("cpu"), "vision-language", 0, Reporter(), budget)


@pytest.fixture(scope="module")
def task():
    from tasks.digits_vlm import DigitsVLM

    t = DigitsVLM()
    t.load(context())
    return t


@pytest.fixture(scope="module")
def untrained(task):
    """The reference's architecture at its seeded initialisation, as a subject (no training: the tests below are
    about where the images go, not what the model answers)."""
    return task.prepare(task.build_reference(), context())


def test_questions_are_deterministic_and_answered_by_their_images_labels():
    from tasks.digits_vlm import KINDS, questions

    labels = [i % 10 for i in range(50)]
    a, b = questions(labels, 300, seed=3), questions(labels, 300, seed=3)
    assert a == b and a != questions(labels, 300, seed=4)
    assert [q["kind"] for q in a[:6]] == [k for k, _, _ in KINDS] * 2
    for q in a:
        ys = [labels[i] for i in q["images"]]
        if q["kind"] == "digit":
            assert len(ys) == 1 and q["answer"] == str(ys[0])
        elif q["kind"] == "sum":
            assert len(ys) == 2 and q["answer"] == str(ys[0] + ys[1])
        else:
            assert len(ys) == 2 and ys[0] != ys[1] and q["answer"] == str(max(ys))


def test_train_and_test_questions_come_from_digits_disjoint_splits(task):
    from tasks.digits import Digits
    from tasks.digits_vlm import EVAL_SIZE, TRAIN_QUESTIONS

    digits = Digits()
    digits.load()
    assert not set(task.train_rows.tolist()) & set(task.test_rows.tolist())  # scikit-learn rows, disjoint
    assert torch.equal(task.train_images, digits.train.x) and torch.equal(task.test_images, digits.test.x)
    assert len(task.train) == TRAIN_QUESTIONS and len(task.test) == EVAL_SIZE
    assert max(i for q in task.train for i in q["images"]) < len(task.train_images)
    assert max(i for q in task.test for i in q["images"]) < len(task.test_images)
    for q in task.test[:30]:  # the answers are the test images' own labels
        ys = [int(digits.test.y[i]) for i in q["images"]]
        assert q["answer"] == str({"digit": ys[0], "sum": sum(ys), "larger": max(ys)}[q["kind"]])
    again = type(task)()
    again.load()
    assert again.train == task.train and again.test == task.test
    assert again.data_fingerprint() == task.data_fingerprint()


def test_visual_tokens_are_most_of_the_sequence(task):
    from tasks.digits_vlm import TOKENS_PER_IMAGE

    for q in task.test[:3]:
        ids, pix = task.inputs(q, "test")
        visual = int((ids == task.image_token_id).sum())
        assert visual == TOKENS_PER_IMAGE * len(q["images"]) == TOKENS_PER_IMAGE * pix.shape[0]
        # the visual positions come first and are contiguous, image after image
        assert (ids[0, :visual] == task.image_token_id).all() and not (ids[0, visual:] == task.image_token_id).any()
        share = visual / ids.shape[1]
        assert share > (0.85 if len(q["images"]) == 2 else 0.75), (q["kind"], share)


def test_the_model_reads_its_images_at_the_visual_positions(task, untrained):
    model = untrained.model
    q = next(q for q in task.test if q["kind"] == "sum")
    ids, pix = task.inputs(q, "test")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pix)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.flatten(0, 1)
        assert feats.shape[0] == int((ids == task.image_token_id).sum())  # one feature per visual position
        base = model(input_ids=ids, pixel_values=pix).logits[0, -1]
        assert torch.equal(base, model(input_ids=ids, pixel_values=pix.clone()).logits[0, -1])
        other = pix.clone()
        other[1] = task.test_images[(q["images"][1] + 1) % len(task.test_images)][0]  # change the second image
        assert not torch.allclose(base, model(input_ids=ids, pixel_values=other).logits[0, -1])
        # the embeddings at the visual positions are the projected features, not the image token's embedding
        embeds = model.get_input_embeddings()(ids)
        visual = (ids == task.image_token_id)[0]
        placed = embeds.clone()
        placed[0, visual] = feats.to(placed.dtype)
        hidden = model.model.language_model(inputs_embeds=placed).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden)[0, -1], base)


def test_the_subject_carries_what_a_token_dropping_method_needs(task, untrained):
    from tasks.digits_vlm import TEXT_ARCH, TOKENS_PER_IMAGE, answer_ids

    extra = untrained.extra
    assert untrained.kind == "vision-language"
    assert extra["image_token_id"] == task.image_token_id == untrained.model.config.image_token_id
    assert extra["tokens_per_image"] == TOKENS_PER_IMAGE
    assert extra["num_layers"] == len(untrained.model.model.language_model.layers) == TEXT_ARCH.layers
    calib, again = extra["calibration"](3, 0), extra["calibration"](3, 0)
    assert len(calib) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(calib, again))
    for ids, pix in calib:  # training questions: every image is a training image, placed as the prompt says
        assert int((ids == task.image_token_id).sum()) == TOKENS_PER_IMAGE * pix.shape[0]
        assert all((task.train_images == image).flatten(1).all(1).any() for image in pix)

    # the generation hook replaces model.generate, and its output is cut by the task's stop rule
    ids, pix = task.inputs(task.test[0], "test")
    eos = task.tokenizer.eos_token_id
    seen = []

    def hook(subject, input_ids, pixel_values, max_new_tokens):
        seen.append((input_ids.shape, pixel_values.shape, max_new_tokens))
        answer = torch.tensor([[task.tokenizer.convert_tokens_to_ids("7"), eos, 5, 5]])
        return torch.cat([input_ids, answer], 1)

    hooked = type(untrained)(untrained.model, untrained.kind, {**extra, "generate": hook})
    out = answer_ids(hooked, ids, pix, 4)
    assert seen == [(ids.shape, pix.shape, 4)] and out.shape[1] == ids.shape[1] + 2 and out[0, -1] == eos


def test_a_tokenizer_trained_again_is_the_published_one(task):
    from tasks._kit import lm
    from tasks.digits_vlm import TOKENIZER_SHA256, _sha256

    text = lm.tokenizer_json(task.train_tokenizer())
    if TOKENIZER_SHA256:
        assert _sha256(text.encode()) == TOKENIZER_SHA256 == task.tokenizer_sha256
    assert task.tokenizer.convert_tokens_to_ids("<image>") == task.image_token_id == len(task.tokenizer) - 1
    assert task.tokenizer("<image><image>", add_special_tokens=False)["input_ids"] == [task.image_token_id] * 2


def test_none_runs_on_digits_vlm(results_root):
    """bench run's path at smoke budget: the published reference (or a smoke-trained one), answered one question at
    a time, timed with questions as items."""
    from bench.runner import run
    from bench.store import load_result
    from tasks.digits_vlm import SMOKE_EVAL_SIZE

    out = run("digits-vlm", "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.modality == "vision-language" and r.task.tier == "embedded"
    assert r.quality.metric == "exact_match" and r.quality.n == SMOKE_EVAL_SIZE
    assert r.quality.delta == 0 and r.fidelity.value == 1.0 and r.fidelity.metric == "identical_answer_tokens"
    assert r.speed.items_per_call == 2 and "questions" in r.speed.unit


@pytest.mark.slow
def test_the_published_reference_answers_most_test_questions():
    from tasks.digits_vlm import EVAL_SIZE, REFERENCE_SHA256, DigitsVLM

    if REFERENCE_SHA256 is None:
        pytest.skip("digits-vlm's reference is not published")
    ctx = context("full")
    t = DigitsVLM()
    t.load(ctx)
    w = t.reference_weights(ctx)
    assert w.canonical
    e = t.evaluate(t.subject_from_state(w.state, ctx), ctx)
    assert len(e.per_example) == EVAL_SIZE and e.value >= 0.6
