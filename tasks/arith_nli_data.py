"""The `arith-nli` data: `arith`'s word problems as sentence pairs in GLUE's two-label NLI layout, and the
WordPiece tokenizer the task's encoders read them with.

Each `arith` problem gives two pairs with the same premise, its question, and the hypothesis
"The answer is N.": one with N = the problem's final answer (label 0, `entailment`) and one with a wrong N
(label 1, `not_entailment`), the label ids of GLUE's RTE and QNLI. Rows have GLUE's fields `premise`,
`hypothesis`, `label`, `idx` (MNLI's names for the two sentences, RTE's two labels).

The wrong N is a plausible distractor (`candidates`): a number written in the question (what copying a given
gives), the result of an earlier step (what stopping short gives), the last step with a different operation
(+, -, x or exact division of its operands), or another problem's answer (drawn from the split's true answers)
that is at least `FAR` away from this one's. Which candidate a problem gets is chosen so that the false
hypotheses' numbers follow the true ones' distribution: each problem takes the candidate whose value is the
most under-used so far (true answers with that value in the split minus distractors already given it), ties
broken by a seeded `random.Random`. So the hypothesis alone says nothing about the label (a per-number
majority vote learned on the training pairs scores about chance on the test pairs; see the tests), and
neither does the premise (every premise occurs once with each label): a model has to relate the number to
the problem, by at least estimating its answer.

Version 1 also offered the answer off by 1, 2, 3 or 10, and those made up most of its distractors (63%):
telling them apart takes the exact result of up to three chained operations, in one forward pass of the task's
two-layer encoder, and its reference never left chance (train loss stuck at ln 2 with every recipe tried).
Version 2 drops them for the other problems' answers, which a model that estimates the answer can reject.

Splits: `train` from arith's 20,000 training problems (40,000 pairs), `test` from its 500 test problems
(1,000 pairs), pairs of a problem adjacent, in arith's order. Pure Python, deterministic.
"""

from __future__ import annotations

import collections
import random
import re
from typing import TYPE_CHECKING, Iterable

from tasks import arith_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

LABELS = ("entailment", "not_entailment")  # label ids 0 and 1, as in GLUE's RTE and QNLI
HYPOTHESIS = "The answer is {n}."
VERSION = "2"  # bump with any change to the pairs this module emits
OTHERS = 8  # other problems' answers drawn as candidate distractors for each problem
FAR = (5, 0.25)  # ...of which those at least max(5, 25% of the answer) from the answer are kept
MAX_VALUE = 300  # arith's results are all below this; no distractor goes beyond it either
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_EXPR = re.compile(r"(\d+)([-+*/])(\d+)")
_NUMBER = re.compile(r"\d+")


def candidates(problem: dict, others: Iterable[int] = ()) -> tuple[int, dict[str, list[int]]]:
    """(the final answer, {"question": ..., "step": ..., "op": ..., "other": ...}): the problem's plausible wrong
    answers, `other` being those of `others` (other problems' answers) far enough from this one's (`FAR`)."""
    value = int(arith_data.final_answer(problem["answer"]))
    steps = [(m.group(1), int(m.group(2))) for m in arith_data.ANNOTATION.finditer(problem["answer"])]
    a, _, b = _EXPR.fullmatch(steps[-1][0]).groups()
    a, b = int(a), int(b)
    ok = lambda c: 1 <= c < MAX_VALUE and c != value  # noqa: E731
    return value, {
        "question": sorted({int(n) for n in _NUMBER.findall(problem["question"]) if ok(int(n))}),
        "step": sorted({r for _, r in steps[:-1] if ok(r)}),
        "op": sorted({c for c in (a + b, a - b, a * b, a // b if a % b == 0 else 0) if ok(c)}),
        "other": sorted({c for c in others if ok(c) and abs(c - value) >= max(FAR[0], FAR[1] * value)}),
    }


def pairs(problems: list[dict], split: str, seed: int = arith_data.SEED) -> list[dict]:
    """Two GLUE-style rows per problem (true and false hypothesis, in an order drawn from the seed)."""
    rng = random.Random(f"arith-nli-{split}-{seed}")
    answers = [int(arith_data.final_answer(p["answer"])) for p in problems]
    need = collections.Counter(answers)
    rows: list[dict] = []
    for p in problems:
        value, cands = candidates(p, [rng.choice(answers) for _ in range(OTHERS)])
        pool = sorted({c for kind in cands.values() for c in kind})
        best = max(need[c] for c in pool)
        wrong = rng.choice([c for c in pool if need[c] == best])
        need[wrong] -= 1
        two = [(value, 0), (wrong, 1)]
        if rng.random() < 0.5:
            two.reverse()
        for n, label in two:
            rows.append({"premise": p["question"], "hypothesis": HYPOTHESIS.format(n=n), "label": label,
                         "idx": len(rows)})
    return rows


def generate() -> tuple[list[dict], list[dict]]:
    """(train, test) pairs from arith's fixed splits."""
    train, test = arith_data.generate()
    return pairs(train, "train"), pairs(test, "test")


def number_of(hypothesis: str) -> int:
    return int(re.fullmatch(HYPOTHESIS.format(n=r"(\d+)").replace(".", r"\."), hypothesis).group(1))


# ---- tokenizer ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str]) -> "PreTrainedTokenizerFast":
    """BERT-style WordPiece (cased; BERT's normaliser and pre-tokeniser) with every digit its own token, so
    numbers are spelled digit by digit; [CLS] A [SEP] B [SEP] with segment ids 0/1, as BERT reads pairs.

    The vocabulary: the special tokens, every word of `texts` (after normalisation and pre-tokenisation,
    most frequent first, ties by spelling), then every character alone and as a continuation piece (`##c`),
    so an unseen word is spelled in pieces rather than lost. Not tokenizers' `WordPieceTrainer`: it breaks
    ties between equally frequent merges in hash-map order, and gave a different vocabulary on each run here.
    This one is the same, byte for byte, for the same texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=False)
    pre = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Digits(individual_digits=True)])
    words = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    ordered = [*SPECIAL, *sorted(words, key=lambda w: (-words[w], w)), *chars, *(f"##{c}" for c in chars)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(ordered))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok) -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=256,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def load_tokenizer(path) -> "PreTrainedTokenizerFast":
    from tokenizers import Tokenizer

    return wrap_tokenizer(Tokenizer.from_file(str(path)))


def tokenizer_json(tok: "PreTrainedTokenizerFast") -> str:
    """The canonical serialisation that is hashed and published."""
    return tok.backend_tokenizer.to_str(pretty=True) + "\n"


def tokenizer_texts(rows: list[dict]) -> list[str]:
    """What the tokenizer is trained on: each distinct premise and hypothesis of the training pairs."""
    return list(dict.fromkeys(t for r in rows for t in (r["premise"], r["hypothesis"])))
