"""`arith`: tokenizer, published artifacts, lm-eval's exact match against a direct count, and a whole run."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks import arith
from tasks._kit import lm, lm_harness
from tasks.arith import ART, Arith
from tasks.arith_data import final_answer
from tasks.base import RunContext, Subject


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ctx() -> RunContext:
    torch.set_num_threads(2)
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1)


@pytest.fixture(scope="module")
def task(ctx) -> Arith:
    t = Arith()
    t.load(ctx)
    return t


@pytest.fixture(scope="module")
def reference(task, ctx) -> Subject:
    w = task.reference_weights(ctx)
    assert w.canonical, w.source
    return task.subject_from_state(w.state, ctx)


# ---- tokenizer ----------------------------------------------------------------------------------------------

def test_tokenizer_round_trips_and_spells_numbers_digit_by_digit(task):
    tok = task.tokenizer
    for p in task.test[:50]:
        text = lm.prompt_of(p["question"]) + " " + p["answer"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert all(not any(c.isdigit() for c in t) or (len(t) == 1) for t in tok.get_vocab())
    assert tok("1234", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "1234"]
    assert tok.eos_token == lm.EOS and tok.pad_token == lm.PAD and tok.eos_token_id != tok.pad_token_id


def test_training_the_tokenizer_reproduces_the_published_one(task):
    published = (ART / "tokenizer" / "tokenizer.json").read_text()
    assert lm.tokenizer_json(task.train_tokenizer()) == published
    assert hashlib.sha256(published.encode()).hexdigest() == arith.TOKENIZER_SHA256 == task.tokenizer_sha256


# ---- published artifacts ------------------------------------------------------------------------------------

def test_artifacts_match_their_recorded_hashes():
    assert sha256(ART / "reference" / "model.safetensors") == arith.REFERENCE_SHA256 == Arith.reference_sha256
    assert sha256(ART / "draft" / "model.safetensors") == arith.DRAFT_SHA256 == Arith.draft_sha256
    assert sha256(ART / "tokenizer" / "tokenizer.json") == arith.TOKENIZER_SHA256


def test_artifacts_are_hugging_face_model_folders(task, reference):
    from transformers import AutoModelForCausalLM

    for which, arch in (("reference", arith.REFERENCE_ARCH), ("draft", arith.DRAFT_ARCH)):
        model = AutoModelForCausalLM.from_pretrained(ART / which)
        assert model.config.hidden_size == arch.hidden and model.config.num_hidden_layers == arch.layers
        assert model.config.vocab_size == len(task.tokenizer)
        if which == "reference":
            for k, v in model.state_dict().items():
                assert torch.equal(v, reference.model.state_dict()[k]), k
    n_ref = sum(p.numel() for p in reference.model.parameters())
    draft = task.draft_subject(RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter()))
    assert sum(p.numel() for p in draft.model.parameters()) * 5 < n_ref
    assert task.draft_weights(RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter())).canonical


def test_a_tampered_artifact_is_not_used(task, ctx, tmp_path, monkeypatch):
    bad = tmp_path / "arith"
    (bad / "reference").mkdir(parents=True)
    blob = bytearray((ART / "reference" / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (bad / "reference" / "model.safetensors").write_bytes(bytes(blob))
    monkeypatch.setattr(arith, "ART", bad)
    monkeypatch.setattr(Arith, "train_reference", lambda self, ctx: {"rebuilt": torch.zeros(1)})
    with pytest.warns(UserWarning, match="does not match"):
        w = task.reference_weights(ctx)
    assert not w.canonical and set(w.state) == {"rebuilt"}


# ---- quality through lm-eval --------------------------------------------------------------------------------

def _direct_count(task, subject, n) -> np.ndarray:
    """Greedy answers generated here, outside lm-eval, scored by comparing final answers."""
    tok = subject.extra["tokenizer"]
    scores = []
    for p in task.test[:n]:
        ids = tok(lm.prompt_of(p["question"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = lm.generate_ids(subject, ids, lm_harness.MAX_GEN_TOKS)
        text = tok.decode(lm.completion_tokens(out, ids.shape[1], tok.eos_token_id), skip_special_tokens=True)
        got = final_answer(text.split("Question:")[0])
        scores.append(float(got is not None and got == final_answer(p["answer"])))
    return np.asarray(scores)


def _wrong_every_other(reference: Subject, task: Arith) -> Subject:
    """The reference's greedy answers with the final number changed for every other test problem (odd
    indices; lm-eval reorders its requests, so the choice is keyed by the prompt, not the call order): a
    subject whose exact match is known to be below the reference's, through the generation hook methods use."""
    tok = reference.extra["tokenizer"]
    odd = {tuple(tok(lm.prompt_of(p["question"]), add_special_tokens=False)["input_ids"])
           for p in task.test[1::2]}

    def generate(subject, input_ids, max_new_tokens, attention_mask=None):
        out = reference.model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                       attention_mask=torch.ones_like(input_ids))
        if tuple(input_ids[0].tolist()) not in odd:
            return out
        text = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        text = text.rsplit("####", 1)[0] + "#### 99999"
        new = tok(" " + text.lstrip(" "), add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new, torch.tensor([[tok.eos_token_id]])], dim=1)

    return Subject(reference.model, "causal-lm", {"tokenizer": tok, "generate": generate})


@pytest.mark.parametrize("broken", [False, True], ids=["reference", "half-wrong"])
def test_lm_eval_exact_match_equals_a_direct_count(task, reference, broken):
    n = 8
    subject = _wrong_every_other(reference, task) if broken else reference
    r = lm_harness.evaluate(subject, task.harness_folder(), "arith", limit=n)
    direct = _direct_count(task, subject, n)
    np.testing.assert_array_equal(r.per_example, direct)
    assert r.value == pytest.approx(direct.mean())
    if broken:
        assert direct[1::2].sum() == 0 and r.value <= 0.5
    sd = direct.std(ddof=1) if direct.std() > 0 else 0.0
    assert r.stderr == pytest.approx(sd / math.sqrt(n))  # lm-eval's stderr of a mean
    assert len(r.generated) == n and all(ids[-1] == task.tokenizer.eos_token_id for ids in r.generated)


def test_evaluation_outputs_and_fidelity(task, reference, ctx):
    smoke = RunContext(profile=ctx.profile, seed=0, progress=Reporter(), batch_size=1, budget="smoke")
    ev = task.evaluate(reference, smoke)
    assert ev.per_example.shape == (arith.SMOKE_EVAL_SIZE,) and ev.outputs.shape[0] == arith.SMOKE_EVAL_SIZE
    assert task.fidelity(ev, ev) == ("identical_answer_tokens", 1.0)
    other = type(ev)(ev.value, ev.per_example, ev.outputs.copy())
    other.outputs[0, 0] += 1
    assert task.fidelity(ev, other)[1] == pytest.approx(1 - 1 / arith.SMOKE_EVAL_SIZE)


def test_workload_counts_generated_tokens(task, reference, ctx):
    smoke = RunContext(profile=ctx.profile, seed=0, progress=Reporter(), batch_size=1, budget="smoke")
    fn, tokens, unit = task.workload(reference, smoke)
    outs = fn()
    assert len(outs) == arith.SMOKE_WORKLOAD_SIZE and "tokens" in unit
    tok = task.tokenizer
    prompt_lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in task.workload_prompts(smoke)]
    assert tokens == sum(len(lm.completion_tokens(o, n, tok.eos_token_id)) for o, n in zip(outs, prompt_lens))


def test_workload_at_a_larger_batch_generates_the_same_answers(task, reference, ctx):
    """Left-padded batches (a GPU profile's batch size) give the batch-1 answers here."""
    one = RunContext(profile=ctx.profile, seed=0, progress=Reporter(), batch_size=1, budget="smoke")
    two = RunContext(profile=ctx.profile, seed=0, progress=Reporter(), batch_size=2, budget="smoke")
    _, tokens_one, _ = task.workload(reference, one)
    fn, tokens_two, unit = task.workload(reference, two)
    assert tokens_two == tokens_one and "batch 2" in unit and len(fn()) == 1


# ---- a whole run --------------------------------------------------------------------------------------------

def test_none_runs_on_arith(results_root):
    from bench.runner import run
    from bench.store import load_result

    out = run("arith", "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.reference_canonical and r.task.modality == "causal-lm"
    assert r.quality.metric == "exact_match" and r.quality.n == arith.SMOKE_EVAL_SIZE
    assert r.quality.delta == 0 and r.fidelity.value == 1.0
    assert r.speed.items_per_call > 0 and "tokens" in r.speed.unit and r.speed.speedup > 0
    assert r.size.method.parameters == r.size.reference.parameters > 0


@pytest.mark.slow
def test_training_is_deterministic(task):
    smoke = RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), budget="smoke")
    a, b = task.train_draft(smoke), task.train_draft(smoke)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_reference_reaches_its_documented_exact_match(task, reference, ctx):
    ev = task.evaluate(reference, ctx)
    assert ev.value >= 0.5 and ev.per_example.shape == (arith.EVAL_SIZE,)


# ---- the KV-cache keyword across transformers versions --------------------------------------------------------

def test_cache_kwargs_follow_the_forward_signature():
    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=False): ...

    class New:
        def forward(self, input_ids, cache=None, use_cache=False, **kwargs): ...

    assert lm.cache_kwargs(Old(), "c") == {"past_key_values": "c"}
    assert lm.cache_kwargs(New(), "c") == {"cache": "c"}


def test_a_cache_passed_by_cache_kwargs_is_filled_and_used_without_deprecation(task, reference):
    import warnings

    from transformers import DynamicCache

    model = reference.model
    ids = torch.tensor([task.tokenizer("Question: 3 + 4\nAnswer:")["input_ids"]])
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the old name warns from transformers 5.25 on
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], **lm.cache_kwargs(model, cache), use_cache=True)
            assert lm.output_cache(out) is cache and cache.get_seq_length() == ids.shape[1] - 1
            step = model(input_ids=ids[:, -1:], **lm.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
            full = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
