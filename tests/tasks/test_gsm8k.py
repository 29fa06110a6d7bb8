"""`gsm8k`: lm-eval's own task on GSM8K-format fixture files with tiny random Llama models, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks import gsm8k
from tasks._kit import lm, lm_harness, pretrained
from tasks.base import RunContext, Subject
from tasks.gsm8k import GSM8K, GSM8KDataNotFound

# GSM8K's format (openai/grade-school-math): a question, and an answer whose reasoning carries calculator
# annotations <<...>> and ends with "#### <n>".
TRAIN = [
    ("Tom has 3 boxes with 4 apples in each box. How many apples does Tom have?",
     "Each box has 4 apples, so 3 boxes hold 3*4=<<3*4=12>>12 apples.\n#### 12"),
    ("A pen costs $2 and a book costs $7. How much do 2 pens and a book cost?",
     "Two pens cost 2*2=<<2*2=4>>4 dollars.\nWith the book that is 4+7=<<4+7=11>>11 dollars.\n#### 11"),
    ("Mia read 15 pages on Monday and twice as many on Tuesday. How many pages did she read?",
     "On Tuesday she read 15*2=<<15*2=30>>30 pages.\nIn all she read 15+30=<<15+30=45>>45 pages.\n#### 45"),
    ("A farmer has 20 cows and sells 8 of them. How many cows are left?",
     "He has 20-8=<<20-8=12>>12 cows left.\n#### 12"),
    ("Sam saves $5 a week for 6 weeks. How much does he save?",
     "He saves 5*6=<<5*6=30>>30 dollars.\n#### 30"),
    ("There are 24 students split evenly into 4 teams. How many students are on each team?",
     "Each team has 24/4=<<24/4=6>>6 students.\n#### 6"),
]
TEST = [
    ("Lia buys 3 bags of 5 oranges and eats 2. How many oranges does she have?",
     "She buys 3*5=<<3*5=15>>15 oranges.\nShe has 15-2=<<15-2=13>>13 left.\n#### 13"),
    ("A train travels 60 miles an hour for 3 hours. How far does it go?",
     "It goes 60*3=<<60*3=180>>180 miles.\n#### 180"),
    ("Ben has 1,200 stamps and gives away 200. How many stamps does he keep?",
     "He keeps 1200-200=<<1200-200=1000>>1,000 stamps.\n#### 1,000"),
    ("A cake is cut into 8 slices and 5 are eaten. How many slices remain?",
     "8-5=<<8-5=3>>3 slices remain.\n#### 3"),
]


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))


def save_llama(folder: Path, tok, hidden: int, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=2048, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """GSM8K jsonl files and two tiny random Llama folders (reference, smaller draft) sharing a tokenizer."""
    root = tmp_path_factory.mktemp("gsm8k")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", TRAIN)
    write_jsonl(data / "test.jsonl", TEST)
    tok = lm.train_tokenizer([lm.prompt_of(q) + " " + a for q, a in TRAIN + TEST], vocab_size=400)
    save_llama(root / "reference", tok, hidden=32, layers=2, seed=0)
    save_llama(root / "draft", tok, hidden=16, layers=1, seed=1)
    return {"data": data, "reference": root / "reference", "draft": root / "draft", "root": root}


@pytest.fixture(scope="module")
def env(files):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gsm8k.DATA_ENV, str(files["data"]))
        mp.setenv(gsm8k.REFERENCE_ENV, str(files["reference"]))
        mp.setenv(gsm8k.DRAFT_ENV, str(files["draft"]))
        yield files


def context(budget: str = "smoke") -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1, budget=budget)


@pytest.fixture(scope="module")
def task(env) -> GSM8K:
    torch.set_num_threads(1)
    t = GSM8K()
    t.load(context())
    return t


@pytest.fixture(scope="module")
def reference(task) -> Subject:
    w = task.reference_weights(context())
    return task.subject_from_state(w.state, context())


# ---- lm-eval's own task definition ---------------------------------------------------------------------------

def test_the_task_is_lm_evals_gsm8k_yaml_with_only_the_dataset_source_replaced(task, env):
    import lm_eval

    own = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    assert gsm8k.lm_eval_yaml().resolve() == own.resolve()  # found through lm-eval's default registry
    raw = yaml.safe_load(own.read_text())
    source = {"dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in task.config.items() if k not in source} == {k: v for k, v in raw.items()
                                                                          if k not in source}
    assert raw["dataset_path"] == "openai/gsm8k" and raw["dataset_name"] == "main"
    assert task.config["dataset_path"] == "json" and task.config["dataset_name"] is None
    assert task.config["dataset_kwargs"]["data_files"] == {"train": str(env["data"] / "train.jsonl"),
                                                           "test": str(env["data"] / "test.jsonl")}
    built = gsm8k.build_lm_eval_task(task.config)  # as lm-eval builds it
    assert built.config.doc_to_text == raw["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert built.config.num_fewshot == raw["num_fewshot"] == 5
    assert built.config.generation_kwargs["until"] == raw["generation_kwargs"]["until"]
    assert [f["name"] for f in built.config.filter_list] == ["strict-match", "flexible-extract"]
    assert [r["question"] for r in built.dataset["test"]] == [q for q, _ in TEST]
    assert task.test == [{"question": q, "answer": a} for q, a in TEST]


def test_without_the_variable_the_data_is_the_hubs_openai_gsm8k(monkeypatch):
    monkeypatch.delenv(gsm8k.DATA_ENV, raising=False)
    assert gsm8k.data_folder() is None
    cfg = gsm8k.lm_eval_config(None)
    assert (cfg["dataset_path"], cfg["dataset_name"], cfg["test_split"], cfg["fewshot_split"]) == \
        ("openai/gsm8k", "main", "test", "train")


def test_a_bad_data_path_names_the_variable_and_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv(gsm8k.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(GSM8KDataNotFound) as err:
        GSM8K().load(context())
    msg = str(err.value)
    assert gsm8k.DATA_ENV in msg and "train.jsonl" in msg and "test.jsonl" in msg and "nowhere" in msg
    write_jsonl(tmp_path / "train.jsonl", TRAIN)
    monkeypatch.setenv(gsm8k.DATA_ENV, str(tmp_path))
    with pytest.raises(GSM8KDataNotFound, match="lacks test.jsonl"):
        GSM8K().load(context())


def test_fingerprint_follows_the_data(task, env, tmp_path, monkeypatch):
    other = tmp_path / "data"
    other.mkdir()
    write_jsonl(other / "train.jsonl", TRAIN)
    write_jsonl(other / "test.jsonl", TEST[:-1] + [(TEST[-1][0], TEST[-1][1].replace("3", "4"))])
    monkeypatch.setenv(gsm8k.DATA_ENV, str(other))
    changed = GSM8K()
    changed.load(context())
    assert len(task.data_fingerprint()) == 64 and changed.data_fingerprint() != task.data_fingerprint()


# ---- models ----------------------------------------------------------------------------------------------------

def test_reference_is_the_configured_folder_hashed_as_loaded(task, reference, env):
    from transformers import AutoModelForCausalLM

    w = task.reference_weights(context())
    loaded = AutoModelForCausalLM.from_pretrained(env["reference"])
    assert not w.canonical and w.source == str(env["reference"].resolve())
    assert w.sha256 == pretrained.state_sha256(loaded.state_dict())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference.model.state_dict()[k]), k
    loaded.model.norm.weight.data[0] += 1
    assert pretrained.state_sha256(loaded.state_dict()) != w.sha256
    gen = reference.model.generation_config  # plain greedy, whatever the checkpoint's settings were
    assert gen.do_sample is False and gen.repetition_penalty in (None, 1.0)
    assert gen.eos_token_id == task.tokenizer.eos_token_id


def test_draft_is_smaller_and_shares_the_tokenizer(task, reference, env, tmp_path, monkeypatch):
    draft = task.draft_subject(context())
    assert draft.extra["tokenizer"] is task.tokenizer
    assert sum(p.numel() for p in draft.model.parameters()) * 3 < sum(p.numel() for p in reference.model.parameters())
    other = lm.train_tokenizer(["entirely different words here"] * 3, vocab_size=300)
    save_llama(tmp_path / "foreign", other, hidden=16, layers=1, seed=2)
    monkeypatch.setenv(gsm8k.DRAFT_ENV, str(tmp_path / "foreign"))
    with pytest.raises(ValueError, match="different vocabulary"):
        task.draft_subject(context())


def test_model_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_X", raising=False)
    s = pretrained.model_source("BENCH_X", "Qwen/Qwen2.5-1.5B-Instruct")
    assert (s.path, s.revision, s.local) == ("Qwen/Qwen2.5-1.5B-Instruct", None, False)
    monkeypatch.setenv("BENCH_X", "org/model@v1.0")
    s = pretrained.model_source("BENCH_X", "unused/default")
    assert (s.path, s.revision, s.local) == ("org/model", "v1.0", False)
    monkeypatch.setenv("BENCH_X", str(tmp_path))
    assert pretrained.model_source("BENCH_X", "unused/default").local
    monkeypatch.setenv("BENCH_X", str(tmp_path / "missing"))
    with pytest.raises(pretrained.PretrainedNotFound, match="BENCH_X=.*missing: no such folder"):
        pretrained.model_source("BENCH_X", "unused/default")


# ---- measurement -----------------------------------------------------------------------------------------------

def _answering(reference: Subject, right) -> Subject:
    """A subject whose own generation procedure (the hook decoding methods set) writes the gold answer of the
    question being asked when `right(call)` and a wrong final number otherwise, then the next question."""
    tok = reference.extra["tokenizer"]
    gold = {q: a for q, a in TEST}
    calls = []

    def generate(subject, input_ids, max_new_tokens, attention_mask=None):
        question = tok.decode(input_ids[0]).rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
        answer = gold[question] if right(len(calls)) else gold[question].rsplit("####", 1)[0] + "#### 99999"
        calls.append(1)
        new = tok(" " + answer + "\n\nQuestion: and then", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new], dim=1)

    return Subject(reference.model, "causal-lm", {"tokenizer": tok, "generate": generate})


def test_exact_match_is_lm_evals_strict_match_through_the_generation_hook(task, reference):
    r = lm_harness.evaluate(_answering(reference, lambda i: i % 2 == 0), None, "gsm8k", limit=4, config=task.config)
    np.testing.assert_array_equal(r.per_example, [1, 0, 1, 0])
    assert r.value == 0.5 and r.raw["exact_match,flexible-extract"] == 0.5
    assert r.texts[2] == " " + TEST[2][1] + "\n\n"  # cut at lm-eval's stop string "Question:"; "1,000" matched


def test_evaluation_outputs_fidelity_and_a_method_procedure_that_does_not_stop(task, reference):
    ctx = context()
    ev = task.evaluate(reference, ctx)
    assert ev.per_example.shape == (gsm8k.SMOKE_EVAL_SIZE,) and ev.outputs.shape == (gsm8k.SMOKE_EVAL_SIZE,)
    tok = task.tokenizer

    def plain(subject, input_ids, max_new_tokens, attention_mask=None):  # greedy to EOS, no stop strings
        return reference.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                        max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)

    hooked = task.evaluate(Subject(reference.model, "causal-lm", {"tokenizer": tok, "generate": plain}), ctx)
    assert task.fidelity(ev, hooked) == ("identical_responses", 1.0)
    np.testing.assert_array_equal(hooked.per_example, ev.per_example)
    other = type(ev)(ev.value, ev.per_example, np.asarray([ev.outputs[0] + "x", *ev.outputs[1:]]))
    assert task.fidelity(ev, other)[1] == pytest.approx(1 - 1 / gsm8k.SMOKE_EVAL_SIZE)


def test_workload_generates_from_lm_evals_five_shot_prompts(task, reference):
    ctx = context()
    prompts = task.workload_contexts(ctx)
    assert len(prompts) == gsm8k.SMOKE_WORKLOAD_SIZE
    assert prompts[0].count("Question:") == 6 and prompts[0].endswith(f"Question: {TEST[0][0]}\nAnswer:")
    assert sum(a in prompts[0] for _, a in TRAIN) == 5  # five worked train answers as the shots
    fn, tokens, unit = task.workload(reference, ctx)
    outs = fn()
    prompt_len = len(task.tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    assert 0 < tokens == len(lm.completion_tokens(outs[0], prompt_len, task.tokenizer.eos_token_id)) <= 16
    assert "tokens" in unit and "batch 1" in unit


# ---- a whole run -----------------------------------------------------------------------------------------------

def test_none_runs_on_gsm8k(env, results_root):
    from bench.runner import run
    from bench.store import load_result

    out = run("gsm8k", "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.task.modality == "causal-lm"
    assert not r.task.reference_canonical and len(r.task.reference_sha256) == 64
    assert r.quality.metric == "exact_match" and r.quality.n == gsm8k.SMOKE_EVAL_SIZE and r.quality.delta == 0
    assert r.fidelity.metric == "identical_responses" and r.fidelity.value == 1.0
    assert r.speed.items_per_call > 0 and "tokens" in r.speed.unit and r.speed.speedup > 0
    assert r.size.method.parameters == r.size.reference.parameters > 0


@pytest.mark.slow
def test_speculative_decoding_runs_on_gsm8k_with_the_draft(env, results_root):
    """A decoding method is evaluated through lm-eval by its own procedure, drafting with the task's draft;
    greedy speculative decoding reproduces the reference's responses exactly."""
    from bench.runner import run
    from bench.store import load_result

    out = run("gsm8k", "speculative", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.fidelity.value == 1.0 and r.quality.delta == 0
    assert 0 <= r.method_stats["acceptance_rate"] <= 1


@pytest.mark.slow
def test_medusa_trains_on_the_train_split_and_decodes_gsm8k_exactly(env, results_root):
    """Medusa's heads learn from the reference's answers to lm-eval's own train split (TrainingRows), and the
    tree-verified decoding reproduces the reference's responses exactly."""
    from bench.runner import run
    from bench.store import load_result

    out = run("gsm8k", "medusa", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.fidelity.value == 1.0 and r.quality.delta == 0
    assert r.cost.steps > 0 and r.method_stats["mean_accepted_length"] >= 1
