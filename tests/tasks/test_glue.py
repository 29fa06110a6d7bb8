"""`glue-sst2` and `glue-mnli`: the loader on parquet fixtures in the hub's layout, the label-order mapping,
tiny random BERTs with a tiny WordPiece vocabulary, and whole runs, all offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.profiles import load_profile
from bench.progress import Reporter
from tasks import glue
from tasks._kit import pretrained
from tasks.base import RunContext
from tasks.glue import MNLI, SST2, GlueDataError, GlueDataNotFound, GlueMNLI, GlueSST2, LabelOrderUnknown

SST2_ROWS = [  # (sentence, label): GLUE's sst2 text is lower-cased and tokenized, with a trailing space
    ("it 's a charming and often affecting journey . ", 1),
    ("unflinchingly bleak and desperate ", 0),
    ("the acting , costumes , music , cinematography and sound are all astounding . ", 1),
    ("it 's slow -- very , very slow . ", 0),
    ("a sometimes tedious film . ", 0),
    ("the movie is a charming and affecting film . ", 1),
]
MNLI_ROWS = [  # (premise, hypothesis, label)
    ("The new rights are nice enough", "Everyone really likes the newest benefits", 1),
    ("This site includes a list of all award winners.", "The site has a list of winners.", 0),
    ("uh i don't know i i have mixed emotions about him", "I like him for the most part.", 1),
    ("Yes now you know if if everybody like in August", "August is a black out month.", 2),
    ("The film was slow.", "The film was very fast.", 2),
]


def words(texts) -> list[str]:
    return sorted({w for t in texts for w in t.lower().replace(",", " , ").replace(".", " . ").split()})


def write_parquet(path: Path, columns: dict, labels: tuple[str, ...]) -> None:
    """A file as in the hub's nyu-mll/glue: the label a ClassLabel, idx an int32."""
    from datasets import ClassLabel, Dataset, Features, Value

    feats = {c: Value("string") for c in columns if c not in ("label", "idx")}
    feats.update(label=ClassLabel(names=list(labels)), idx=Value("int32"))
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=Features(feats)).to_parquet(str(path))


def save_bert(folder: Path, vocab: list[str], id2label: dict[int, str], seed: int = 0) -> None:
    """A tiny random BertForSequenceClassification with a WordPiece tokenizer over `vocab`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=160, num_labels=len(id2label),
                     id2label=id2label, label2id={v: k for k, v in id2label.items()})
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glue")
    data = root / "data"
    write_parquet(data / "sst2" / "validation-00000-of-00001.parquet",
                  {"sentence": [s for s, _ in SST2_ROWS], "label": [y for _, y in SST2_ROWS],
                   "idx": list(range(len(SST2_ROWS)))}, SST2.labels)
    write_parquet(data / "mnli" / "validation_matched-00000-of-00001.parquet",
                  {"premise": [p for p, _, _ in MNLI_ROWS], "hypothesis": [h for _, h, _ in MNLI_ROWS],
                   "label": [y for *_, y in MNLI_ROWS], "idx": list(range(len(MNLI_ROWS)))}, MNLI.labels)
    save_bert(root / "sst2-ref", words(s for s, _ in SST2_ROWS), {0: "negative", 1: "positive"})
    # outputs in TextAttack's MNLI order, named in id2label
    save_bert(root / "mnli-ref", words(t for p, h, _ in MNLI_ROWS for t in (p, h)),
              {0: "contradiction", 1: "entailment", 2: "neutral"})
    return {"data": data, "sst2": root / "sst2-ref", "mnli": root / "mnli-ref", "root": root}


@pytest.fixture
def env(files, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv(glue.DATA_ENV, str(files["data"]))
    monkeypatch.setenv(SST2.reference_env, str(files["sst2"]))
    monkeypatch.setenv(MNLI.reference_env, str(files["mnli"]))
    for spec in (SST2, MNLI):
        monkeypatch.delenv(spec.labels_env, raising=False)
    return files


def context(budget: str = "smoke", batch_size: int = 4) -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=batch_size, budget=budget)


# ---- data ---------------------------------------------------------------------------------------------------

def test_loads_the_fixture_rows_in_the_hubs_layout(env):
    sst2, mnli = GlueSST2(), GlueMNLI()
    sst2.load(context())
    mnli.load(context())
    assert sst2.texts == {"sentence": [s for s, _ in SST2_ROWS]}
    np.testing.assert_array_equal(sst2.labels, [y for _, y in SST2_ROWS])
    assert mnli.texts["premise"][3] == MNLI_ROWS[3][0] and mnli.texts["hypothesis"][3] == MNLI_ROWS[3][1]
    np.testing.assert_array_equal(mnli.labels, [y for *_, y in MNLI_ROWS])
    enc = mnli.encode(mnli.tokenizer, 0, 2)  # premise-hypothesis pairs: two segments
    assert enc["input_ids"].shape[0] == 2 and set(enc["token_type_ids"][0].tolist()) == {0, 1}
    assert len(sst2.data_fingerprint()) == 64 and sst2.data_fingerprint() != mnli.data_fingerprint()


def test_a_bad_data_path_names_the_variable_and_the_files(env, tmp_path, monkeypatch):
    monkeypatch.setenv(glue.DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(GlueDataNotFound) as err:
        GlueSST2().load(context())
    msg = str(err.value)
    assert glue.DATA_ENV in msg and str(tmp_path / "empty" / "sst2" / "validation-*.parquet") in msg
    assert "sentence, label, idx" in msg and "hf download nyu-mll/glue" in msg
    with pytest.raises(GlueDataNotFound, match=r"mnli/validation_matched-\*\.parquet.*premise, hypothesis, label, idx"):
        GlueMNLI().load(context())


def test_wrong_columns_and_hidden_test_labels_are_errors(env, tmp_path, monkeypatch):
    write_parquet(tmp_path / "sst2" / "validation-00000-of-00001.parquet",
                  {"text": ["a film . "], "label": [1], "idx": [0]}, SST2.labels)
    monkeypatch.setenv(glue.DATA_ENV, str(tmp_path))
    with pytest.raises(GlueDataError, match="lacks the column.*sentence"):
        GlueSST2().load(context())
    from datasets import Dataset

    Dataset.from_dict({"sentence": ["a film . "], "label": [-1], "idx": [0]}).to_parquet(
        str(tmp_path / "sst2" / "validation-00000-of-00001.parquet"))
    with pytest.raises(GlueDataError, match=r"labels \[-1\]"):
        GlueSST2().load(context())


# ---- label order --------------------------------------------------------------------------------------------

def test_textattack_label_orders_are_recorded():
    assert glue.KNOWN_LABEL_ORDERS["textattack/bert-base-uncased-MNLI"] == ("contradiction", "entailment", "neutral")
    assert glue.KNOWN_LABEL_ORDERS["textattack/bert-base-uncased-SST-2"] == SST2.labels
    hub = pretrained.ModelSource(MNLI.reference_env, MNLI.reference, MNLI.reference, None, False)

    class Generic:
        num_labels, id2label = 3, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}

    assert glue.output_order(MNLI, hub, Generic) == ("contradiction", "entailment", "neutral")


def test_mnli_outputs_are_put_in_glues_order(env):
    from transformers import AutoModelForSequenceClassification

    task = GlueMNLI()
    task.load(context())
    w = task.reference_weights(context())
    ref = task.subject_from_state(w.state, context())
    raw = AutoModelForSequenceClassification.from_pretrained(env["mnli"]).eval()
    enc = task.encode(task.tokenizer, 0, len(MNLI_ROWS))
    with torch.no_grad():
        a, b = ref.model(**enc).logits, raw(**enc).logits
    # the checkpoint's outputs are (contradiction, entailment, neutral); GLUE's labels (entailment, neutral,
    # contradiction) are its outputs 1, 2, 0
    torch.testing.assert_close(a, b[:, [1, 2, 0]])
    assert ref.model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert w.sha256 == pretrained.state_sha256(ref.model.state_dict()) and not w.canonical


def test_an_unknown_label_order_names_the_variable_and_the_variable_sets_it(env, files, tmp_path, monkeypatch):
    save_bert(tmp_path / "generic", words(s for s, _ in SST2_ROWS), {0: "LABEL_0", 1: "LABEL_1"})
    monkeypatch.setenv(SST2.reference_env, str(tmp_path / "generic"))
    task = GlueSST2()
    task.load(context())
    with pytest.raises(LabelOrderUnknown, match="BENCH_GLUE_SST2_LABELS"):
        task.reference_weights(context())
    monkeypatch.setenv(SST2.labels_env, "positive,negative")
    swapped = task.reference_weights(context())
    monkeypatch.setenv(SST2.labels_env, "negative,positive")
    straight = task.reference_weights(context())
    key = "classifier.weight"
    torch.testing.assert_close(swapped.state[key], straight.state[key].flip(0))
    assert swapped.sha256 != straight.sha256
    monkeypatch.setenv(SST2.labels_env, "negative,neutral")
    with pytest.raises(LabelOrderUnknown, match="permutation|each of"):
        task.reference_weights(context())


# ---- measurement --------------------------------------------------------------------------------------------

def test_evaluation_fidelity_workload_and_student(env):
    task = GlueSST2()
    task.load(context())
    ref = task.subject_from_state(task.reference_weights(context()).state, context())
    ev = task.evaluate(ref, context(batch_size=4))
    n = len(SST2_ROWS)
    with torch.no_grad():
        pred = ref.model(**task.encode(task.tokenizer, 0, n)).logits.argmax(-1).numpy()
    np.testing.assert_array_equal(ev.outputs, pred)  # batches of 4 + 2 give the one-batch predictions
    np.testing.assert_array_equal(ev.per_example, (pred == task.labels).astype(float))
    assert ev.value == pytest.approx(ev.per_example.mean())
    flipped = type(ev)(ev.value, ev.per_example, 1 - ev.outputs)
    assert task.fidelity(ev, ev) == ("prediction_agreement", 1.0) and task.fidelity(ev, flipped)[1] == 0.0
    fn, items, unit = task.workload(ref, context(batch_size=4))
    assert items == 4 and fn().shape == (4, 2) and "examples" in unit
    student = task.build_student()
    assert student.config.num_hidden_layers == 1 and student.config.num_labels == 2


@pytest.mark.parametrize("name", ["glue-sst2", "glue-mnli"])
def test_none_runs_on_glue(env, results_root, name):
    from bench.runner import run
    from bench.store import load_result

    out = run(name, "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    rows = SST2_ROWS if name == "glue-sst2" else MNLI_ROWS
    assert r.status == "ok" and r.task.tier == "full" and r.task.modality == "text-classification"
    assert not r.task.reference_canonical and len(r.task.reference_sha256) == 64
    assert r.quality.metric == "accuracy" and r.quality.n == len(rows) and r.quality.delta == 0
    assert r.fidelity.metric == "prediction_agreement" and r.fidelity.value == 1.0
    assert r.speed.items_per_call == min(32, len(rows)) and r.speed.speedup > 0
