"""`textvqa`: TextVQA validation answered by a LLaVA, offline, on parquet files in the hub's layout (lmms-lab/textvqa)
and a tiny random LlavaForConditionalGeneration (a 2-layer CLIP tower on 56-pixel images in 14-pixel patches: 16
visual tokens an image; a 2-layer Llama) saved with its LlavaProcessor; the VQA metric on hand-made answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for the fixture writers, under --import-mode=importlib too

from bench.profiles import load_profile  # noqa: E402
from bench.progress import Reporter  # noqa: E402
from bench.registry import get_task_spec  # noqa: E402
from tasks import textvqa  # noqa: E402
from tasks._kit import lm, vlm  # noqa: E402
from tasks.base import RunContext  # noqa: E402
from tasks.textvqa import TextVQA  # noqa: E402

TOKENS_PER_IMAGE = 16  # (56 / 14)^2 patches, CLS dropped
# (question, ten answers, OCR tokens, image size, image mode): sizes differ (the processor resizes and crops) and one
# image is greyscale, as some of TextVQA's are
VALIDATION = [
    ("what is the brand of this camera?", ["dakota"] * 7 + ["dakota digital"] * 3, ["dakota", "digital"], (96, 64),
     "RGB"),
    ("what does the small white text spell?", ["copenhagen"] * 4 + ["thursday"] * 6, ["copenhagen"], (64, 64), "RGB"),
    ("what kind of beer is this?", ["ale"] * 10, ["stone", "ale"], (70, 120), "L"),
    ("how many items are on sale?", ["two"] * 5 + ["2"] * 5, [], (80, 60), "RGB"),
    ("what is the number on the jersey?", ["23"] * 9 + ["32"], ["23"], (60, 90), "RGB"),
    ("who is the author of the book?", ["the author"] * 2 + ["unanswerable"] * 8, [], (64, 96), "RGB"),
]
TRAIN = [(f"what is written on sign {i}?", [f"word {i}"] * 10, [f"word{i}"], (64 + 4 * i, 64), "RGB")
         for i in range(10)]


def write_textvqa(folder: Path, seed: int = 0) -> None:
    """The hub's lmms-lab/textvqa in its own layout: data/<split>-0000k-of-0000n.parquet with its columns (the image
    a datasets Image, its bytes in the file; the answers and OCR tokens lists of strings). Two training shards, so
    that reading only the first is visible."""
    import io

    import numpy as np
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    feats = Features({"image_id": Value("string"), "question_id": Value("int64"), "question": Value("string"),
                      "question_tokens": Sequence(Value("string")), "image": Image(),
                      "image_width": Value("int64"), "image_height": Value("int64"),
                      "flickr_original_url": Value("string"), "flickr_300k_url": Value("string"),
                      "answers": Sequence(Value("string")), "image_classes": Sequence(Value("string")),
                      "set_name": Value("string"), "ocr_tokens": Sequence(Value("string"))})

    def table(rows, first_id, set_name):
        cols = {k: [] for k in feats}
        for i, (q, answers, ocr, (w, h), mode) in enumerate(rows):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            PILImage.fromarray(pixels).convert(mode).save(buf, format="JPEG")
            row = {"image_id": f"{first_id + i:016x}", "question_id": first_id + i, "question": q,
                   "question_tokens": q.rstrip("?").split(), "image": {"bytes": buf.getvalue(), "path": None},
                   "image_width": w, "image_height": h, "flickr_original_url": "", "flickr_300k_url": "",
                   "answers": answers, "image_classes": ["Poster"], "set_name": set_name, "ocr_tokens": ocr}
            for k in feats:
                cols[k].append(row[k])
        return Dataset.from_dict(cols, features=feats)

    data = folder / "data"
    data.mkdir(parents=True)
    table(VALIDATION, 34602, "val").to_parquet(str(data / "validation-00000-of-00001.parquet"))
    table(TRAIN[:8], 0, "train").to_parquet(str(data / "train-00000-of-00002.parquet"))
    table(TRAIN[8:], 8, "train").to_parquet(str(data / "train-00001-of-00002.parquet"))


def save_tiny_llava(folder: Path, seed: int = 0) -> None:
    """A tiny random LlavaForConditionalGeneration with LLaVA-1.5's layout (CLIP tower, features of its second-last
    layer without CLS, two-layer GELU projector, Llama decoder) and its LlavaProcessor (CLIP's resize and centre
    crop to 56 pixels; a byte-level BPE over the fixture prompts with <image> a special token), saved as a
    checkpoint folder is."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    rows = VALIDATION + TRAIN
    texts = [textvqa.PROMPT.format(question=q) + " " + a[0] for q, a, *_ in rows]
    tok = lm.train_tokenizer(texts, vocab_size=400)
    tok.backend_tokenizer.add_special_tokens(["<image>"])
    tok = lm.wrap_tokenizer(tok.backend_tokenizer)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 56},
                                                             crop_size={"height": 56, "width": 56}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=proc.image_token_id,
                         image_seq_length=TOKENS_PER_IMAGE, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("textvqa")
    write_textvqa(root / "data")
    save_tiny_llava(root / "reference")
    return {"data": root / "data", "reference": root / "reference", "root": root}


@pytest.fixture(scope="module")
def env(files):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(textvqa.DATA_ENV, str(files["data"]))
        mp.setenv(textvqa.REFERENCE_ENV, str(files["reference"]))
        mp.delenv(textvqa.OCR_ENV, raising=False)
        yield files


def context(budget: str = "smoke") -> RunContext:
    return RunContext.for_profile(load_profile("cpu"), "vision-language", 0, Reporter(), budget)


@pytest.fixture(scope="module")
def task(env) -> TextVQA:
    torch.set_num_threads(1)
    t = TextVQA()
    t.load(context())
    return t


@pytest.fixture(scope="module")
def reference(task):
    w = task.reference_weights(context())
    return task.subject_from_state(w.state, context())


# ---- the metric ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("The Dakota", "dakota"), ("an apple", "apple"), ("dont", "don't"), ("Coca-Cola", "coca cola"),
    ("coca - cola", "coca cola"), ("U.S.A.", "usa"), ("3.5", "3.5"), ("end.", "end"), ("1,000", "1000"),
    ("yes!", "yes"), ("it's", "it 's"), ("  stop\n", "stop"), ("none", "0"), ("(555) 123", "555 123"),
])
def test_answers_are_normalised_as_the_vqa_evaluation_does(raw, normalised):
    assert vlm.normalize_answer(raw) == normalised


def test_vqa_accuracy_counts_annotators_leaving_each_out_in_turn():
    ten = ["dakota"] * 7 + ["dakota digital"] * 3
    assert vlm.vqa_accuracy("Dakota", ten) == 1.0  # 7 of 10: at least 3 others agree whoever is left out
    # 3 of 10: leaving out one of the 3 leaves 2 (2/3), leaving out another leaves 3 (1): (3 * 2/3 + 7) / 10
    assert vlm.vqa_accuracy("dakota digital", ten) == pytest.approx(0.9)
    assert vlm.vqa_accuracy("the dakota digital.", ten) == pytest.approx(0.9)  # the same after normalisation
    assert vlm.vqa_accuracy("two", ["2"] * 2 + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vlm.vqa_accuracy("2", ["two"] * 5 + ["2"] * 5) == 1.0  # number words are digits on both sides
    assert vlm.vqa_accuracy("kodak", ten) == 0.0
    with pytest.raises(ValueError, match="validation split"):
        vlm.vqa_accuracy("x", [])


# ---- the task --------------------------------------------------------------------------------------------------

def test_registered_as_a_full_vision_language_task_with_digits_vlms_capabilities():
    from bench import api

    spec = get_task_spec("textvqa")
    assert (spec.modality, spec.tier, spec.metric, spec.higher_is_better) == \
        ("vision-language", "full", "vqa_accuracy", True)
    caps = {c for c in api.CAPABILITIES if api.offers(spec.cls, c)}
    assert caps == {c for c in api.CAPABILITIES if api.offers(get_task_spec("digits-vlm").cls, c)}


def test_it_reads_the_validation_split_and_only_the_first_training_shard(task):
    assert [r["question"] for r in task.val] == [q for q, *_ in VALIDATION]
    assert [list(r["answers"]) for r in task.val] == [a for _, a, *_ in VALIDATION]
    assert [r["question"] for r in task.calib] == [q for q, *_ in TRAIN[:8]]  # train-00000 only
    assert len(task.data_fingerprint()) == 64
    again = TextVQA()
    again.load(context())
    assert again.data_fingerprint() == task.data_fingerprint()


def test_the_prompt_is_llavas_with_the_image_expanded_to_its_visual_tokens(task):
    assert task.tokens_per_image == TOKENS_PER_IMAGE and task.image_token_id == task.model_config.image_token_id
    row = task.val[2]  # the greyscale image
    ids, pix = task.inputs(row)
    assert pix.shape == (1, 3, 56, 56)
    visual = (ids[0] == task.image_token_id).nonzero().flatten().tolist()
    assert len(visual) == TOKENS_PER_IMAGE and visual == list(range(visual[0], visual[0] + TOKENS_PER_IMAGE))
    text = task.tokenizer.decode(ids[0].tolist())
    assert text == ("USER: " + "<image>" * TOKENS_PER_IMAGE + "\nwhat kind of beer is this?\n"
                    "Answer the question using a single word or phrase. ASSISTANT:")
    assert not bool(ids[0, -1] == task.image_token_id)  # the text after the image: what dropping methods need


def test_ocr_tokens_join_the_prompt_only_when_asked(task, monkeypatch):
    row = task.val[0]
    assert "Reference OCR token" not in textvqa.prompt_of(row, task.with_ocr)
    assert textvqa.prompt_of(row, True) == ("USER: <image>\nwhat is the brand of this camera?\nReference OCR token: "
                                            "dakota, digital\nAnswer the question using a single word or phrase. "
                                            "ASSISTANT:")
    monkeypatch.setenv(textvqa.OCR_ENV, "1")
    with_ocr = TextVQA()
    with_ocr.load(context())
    assert with_ocr.with_ocr and with_ocr.data_fingerprint() != task.data_fingerprint()


def test_the_subject_carries_the_vision_language_contract(task, reference):
    extra = reference.extra
    assert extra["image_token_id"] == task.image_token_id and extra["tokens_per_image"] == TOKENS_PER_IMAGE
    assert extra["num_layers"] == 2 == len(reference.model.model.language_model.layers)
    assert extra["tokenizer"] is task.tokenizer and task.tokenizer.eos_token_id in extra["stop"].eos_ids
    calib = extra["calibration"](3, 0)
    assert len(calib) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                   for a, b in zip(calib, extra["calibration"](3, 0)))  # deterministic for its seed
    questions = {r["question"] for r in task.calib}
    for ids, pix in calib:  # training questions, never validation ones
        text = task.tokenizer.decode(ids[0].tolist())
        assert any(q in text for q in questions) and not any(q in text for q, *_ in VALIDATION)
        assert int((ids == task.image_token_id).sum()) == TOKENS_PER_IMAGE and pix.shape == (1, 3, 56, 56)


def test_answers_come_from_llavas_generate_or_the_hook(task, reference):
    row = task.val[0]
    ids, pix = task.inputs(row)
    with torch.inference_mode():
        out = vlm.answer_ids(reference, ids, pix, 5)
        direct = reference.model.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=5, do_sample=False)
    n = out.shape[1]
    assert torch.equal(out[0], direct[0, :n]) and n <= ids.shape[1] + 5
    seen = {}

    def hook(subject, input_ids, pixel_values, max_new_tokens):
        seen.update(ids=input_ids, pix=pixel_values, n=max_new_tokens)
        return torch.cat([input_ids, torch.tensor([[7, task.tokenizer.eos_token_id, 9]])], dim=1)

    hooked = type(reference)(reference.model, reference.kind, {**reference.extra, "generate": hook})
    out = vlm.answer_ids(hooked, ids, pix, 3)
    assert seen["ids"] is ids and seen["pix"] is pix and seen["n"] == 3
    assert out[0, ids.shape[1]:].tolist() == [7, task.tokenizer.eos_token_id]  # cut after end-of-text


def test_digits_vlm_reads_the_same_answer_ids():
    from tasks import digits_vlm

    assert digits_vlm.answer_ids is vlm.answer_ids


# ---- preflight -------------------------------------------------------------------------------------------------

def test_preflight_passes_for_local_files(env):
    assert TextVQA().preflight(context()) == []


def test_preflight_refuses_a_data_folder_without_the_files(env, tmp_path, monkeypatch):
    monkeypatch.setenv(textvqa.DATA_ENV, str(tmp_path))
    problems = TextVQA().preflight(context())
    assert len(problems) == 1 and textvqa.DATA_ENV in problems[0] and "data/validation-*.parquet" in problems[0]
    assert "hf download lmms-lab/textvqa" in problems[0]
    with pytest.raises(textvqa.TextVQADataNotFound, match=textvqa.DATA_ENV):
        TextVQA().load(context())


def test_preflight_refuses_a_reference_that_is_not_a_llava(env, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    monkeypatch.setenv(textvqa.REFERENCE_ENV, str(tmp_path))
    problems = TextVQA().preflight(context())
    assert len(problems) == 1 and textvqa.REFERENCE_ENV in problems[0] and "'llama'" in problems[0]
    with pytest.raises(textvqa.NotALlava, match="model_type 'llava'"):
        textvqa.load_config(textvqa.TextVQA().reference_source())


def test_preflight_refuses_a_llava_without_its_processor(env, tmp_path, monkeypatch):
    import shutil

    shutil.copy(env["reference"] / "config.json", tmp_path / "config.json")
    monkeypatch.setenv(textvqa.REFERENCE_ENV, str(tmp_path))
    problems = TextVQA().preflight(context())
    assert len(problems) == 1 and "no image processor" in problems[0] and textvqa.REFERENCE_ENV in problems[0]


def test_preflight_refuses_a_missing_reference_folder_and_a_bad_ocr_setting(env, tmp_path, monkeypatch):
    monkeypatch.setenv(textvqa.REFERENCE_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setenv(textvqa.OCR_ENV, "yes")
    problems = TextVQA().preflight(context())
    assert len(problems) == 2
    assert any(textvqa.REFERENCE_ENV in p and "no such folder" in p for p in problems)
    assert any(textvqa.OCR_ENV in p for p in problems)


def test_offline_without_local_copies_it_names_both_variables(tmp_path, monkeypatch):
    monkeypatch.delenv(textvqa.DATA_ENV, raising=False)
    monkeypatch.delenv(textvqa.REFERENCE_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub unreachable; this machine's cache holds neither
    problems = TextVQA().preflight(context())
    assert len(problems) == 2
    assert any(textvqa.DATA_ENV in p and "lmms-lab/textvqa" in p and "cannot reach" in p for p in problems)
    assert any(textvqa.REFERENCE_ENV in p and "llava-hf/llava-1.5-7b-hf" in p for p in problems)


# ---- whole runs ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_none_runs_on_textvqa(env, results_root):
    """bench run's path at smoke budget: the reference loaded from the folder, answering 4 validation questions one
    at a time, scored by VQA accuracy, timed with questions as items (slow: about a minute on 2 busy cores; the vtw
    run below covers the reference arm by default)."""
    from bench.runner import run
    from bench.store import load_result

    out = run("textvqa", "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.task.modality == "vision-language"
    assert not r.task.reference_canonical and len(r.task.reference_sha256) == 64
    assert r.quality.metric == "vqa_accuracy" and r.quality.n == textvqa.SMOKE_EVAL_SIZE
    assert r.quality.delta == 0 and r.fidelity.metric == "identical_answer_tokens" and r.fidelity.value == 1.0
    assert r.speed.items_per_call == textvqa.SMOKE_WORKLOAD_SIZE and "questions" in r.speed.unit


@pytest.mark.parametrize("method, overrides, kept", [
    ("vtw", {"layer": "1"}, 0.0),
    pytest.param("fastv", {"layer": "1", "keep_ratio": "0.5"}, 0.5, marks=pytest.mark.slow)])
def test_visual_token_methods_run_on_textvqa_and_keep_fewer_visual_tokens(env, results_root, method, overrides, kept):
    """vtw and fastv through bench run's path on the tiny LLaVA (2 decoder layers, 16 visual tokens a question):
    after layer 1, vtw withdraws every visual token and fastv keeps the 8 the text attends to most (fastv slow:
    each run is a minute or two on 2 busy cores). No claim on MACs here: at this size FastV's ranking (the text rows'
    queries recomputed in layer 1) costs about what dropping 8 tokens from one 32-wide layer saves (its record came
    out 0.3% above the reference, with the same 8-token answers); the methods' own tests check MACs on digits-vlm."""
    from bench.runner import run
    from bench.store import load_result

    r = load_result(run("textvqa", method, budget="smoke", overrides=overrides, results_root=results_root).path,
                    results_root)
    assert r.status == "ok" and r.method.family == "pruning" and r.quality.metric == "vqa_accuracy"
    stats = r.method_stats
    assert stats["visual_tokens_per_question"] == TOKENS_PER_IMAGE
    assert stats["visual_kept_after_drop"] == kept < 1.0
    assert stats["visual_token_layers_kept"] == pytest.approx((1 + kept) / 2)  # layer 0 all, layer 1 what is kept
    assert stats["kv_kept_fraction"] < 1.0 and stats["drop_layer"] == 1
