"""The `arith` data: grade-school arithmetic word problems in GSM8K's format, generated from a seed.

Each problem is a dict with GSM8K's two fields, `question` and `answer`, where the answer is worked steps
with GSM8K's calculator annotations, one step a line, and a last line `#### <number>`:

    question: "Mia has 14 shells. She finds 9 more shells. How many shells does Mia have now?"
    answer:   "Mia has 14 + 9 = <<14+9=23>>23 shells now.\\n#### 23"

Problems take one to three operations (+, -, x and exact division), from ten scenario families with several
phrasings each, 40 names and 30 kinds of objects. Operands are small (a product is a times-table fact up
to 12 x 12, or a number up to 50 times 2, 3 or 4; every result is below 300), so a model
of a few million parameters trained for minutes on a CPU learns the arithmetic: version 1 used numbers up to
10,000 and a 2.7M-parameter model reached only 20% exact match, nearly all of its errors wrong results of
correctly copied operands. The splits are fixed by `SEED`: `TEST_SIZE` test problems, then `TRAIN_SIZE` training problems whose questions never occur in the
test split (disjoint by question text). Pure Python (`random.Random`), so the same seed gives the same bytes
on every machine and Python version that keeps `random`'s documented generator.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Callable

SEED = 0
TRAIN_SIZE = 20_000
TEST_SIZE = 500
GENERATOR_VERSION = "2"  # bump with any change to what the generator emits

NAMES = [("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Omar", "he"),
         ("Zoe", "she"), ("Ethan", "he"), ("Lily", "she"), ("Lucas", "he"), ("Chloe", "she"), ("Mason", "he"),
         ("Sofia", "she"), ("Leo", "he"), ("Grace", "she"), ("Jack", "he"), ("Hana", "she"), ("Ravi", "he"),
         ("Nora", "she"), ("Ben", "he"), ("Ella", "she"), ("Sam", "he"), ("Ruby", "she"), ("Max", "he"),
         ("Ivy", "she"), ("Owen", "he"), ("Aria", "she"), ("Kai", "he"), ("Maya", "she"), ("Finn", "he"),
         ("Lena", "she"), ("Theo", "he"), ("Alice", "she"), ("Tom", "he"), ("Rosa", "she"), ("Diego", "he"),
         ("Jade", "she"), ("Felix", "he"), ("Nina", "she"), ("Hugo", "he")]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "shells", "cookies", "stamps", "crayons", "books",
           "cards", "buttons", "balloons", "candies", "coins", "rocks", "beads", "toys", "flowers", "eggs",
           "cupcakes", "feathers", "ribbons", "blocks", "oranges", "muffins", "puzzles", "leaves", "pebbles",
           "bottles", "kites"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
         ("shirt", "shirts"), ("lamp", "lamps"), ("mug", "mugs"), ("plant", "plants"), ("game", "games"),
         ("hat", "hats"), ("scarf", "scarves"), ("ball", "balls"), ("candle", "candles"), ("pie", "pies")]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "crates", "packs"]
PLACES = ["garden", "shop", "classroom", "library", "bakery", "farm"]


class Step:
    """One worked step: `lead a op b = <<a op b=r>>r tail`, GSM8K's calculator annotation in the middle."""

    SYMBOL = {"+": "+", "-": "-", "*": "x", "/": "/"}

    def __init__(self, a: int, op: str, b: int):
        if op == "-" and b > a:
            raise ValueError("negative result")
        if op == "/" and (b == 0 or a % b):
            raise ValueError("inexact division")
        self.a, self.op, self.b = a, op, b
        self.r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]

    def text(self, lead: str, tail: str) -> str:
        a, b, r = self.a, self.b, self.r
        return f"{lead} {a} {self.SYMBOL[self.op]} {b} = <<{a}{self.op}{b}={r}>>{r}{tail}"


def _answer(lines: list[str], value: int) -> str:
    return "\n".join(lines + [f"#### {value}"])


def _person(rng: random.Random, avoid: str = "") -> tuple[str, str]:
    while True:
        name, pron = rng.choice(NAMES)
        if name != avoid:
            return name, pron


def _divisor(rng: random.Random, n: int) -> int | None:
    options = [k for k in range(2, 7) if n % k == 0 and n // k > 0]
    return rng.choice(options) if options else None


# ---- scenario families: each returns (question, answer lines, value) ---------------------------------------

def _change(rng: random.Random, n_ops: int):
    """A running count changed by 1-3 events (gain, loss, growth by a factor, equal split)."""
    name, pron = _person(rng)
    other, _ = _person(rng, name)
    obj = rng.choice(OBJECTS)
    total = rng.randint(5, 40)
    sentences = [rng.choice([f"{name} has {total} {obj}.", f"{name} starts with {total} {obj}.",
                             f"{name} collected {total} {obj}."])]
    lines = []
    kinds = ["gain", "lose", "times", "split"]
    for i in range(n_ops):
        kind = rng.choice(kinds if total <= 30 else ["gain", "lose", "split"])
        k = _divisor(rng, total) if kind == "split" else None
        if kind == "split" and k is None or kind == "lose" and total < 2:
            kind = "gain"
        p = pron.capitalize()
        if kind == "gain":
            b = rng.randint(2, 30)
            sentences.append(rng.choice([f"{p} finds {b} more {obj}.", f"{other} gives {name} {b} {obj}.",
                                         f"Then {pron} buys {b} more {obj}."]))
            s = Step(total, "+", b)
            lines.append(s.text(f"{name} has", f" {obj} after getting {b} more."))
        elif kind == "lose":
            b = rng.randint(1, total - 1)
            sentences.append(rng.choice([f"{p} gives {b} {obj} to {other}.", f"{p} loses {b} {obj}.",
                                         f"{p} uses {b} of the {obj}."]))
            s = Step(total, "-", b)
            lines.append(s.text(f"{name} has", f" {obj} left after losing {b}."))
        elif kind == "times":
            k = rng.randint(2, 3)
            word = {2: "doubles", 3: "triples", 4: "grows to 4 times its size"}[k]
            sentences.append(f"Then the number of {obj} {pron} has {word}.")
            s = Step(total, "*", k)
            lines.append(s.text(f"{name} now has", f" {obj}."))
        else:
            sentences.append(rng.choice([f"{p} splits the {obj} equally into {k} {rng.choice(CONTAINERS)} and "
                                         f"keeps one of them.", f"{p} keeps one share after sharing the {obj} "
                                         f"equally among {k} people, {pron}self included."]))
            s = Step(total, "/", k)
            lines.append(s.text(f"{name} keeps", f" {obj}."))
        total = s.r
    q = " ".join(sentences) + f" How many {obj} does {name} have now?"
    return q, lines, total


def _shopping(rng: random.Random, n_ops: int):
    name, pron = _person(rng)
    (s1, p1), (s2, p2) = rng.sample(ITEMS, 2)
    a, pa = rng.randint(2, 9), rng.randint(2, 12)
    cost_a = Step(a, "*", pa)
    lines = [cost_a.text(f"The {p1} cost", f" dollars.")]
    if n_ops == 1:
        q = f"{name} buys {a} {p1} for ${pa} each. How much does {pron} spend in dollars?"
        return q, lines, cost_a.r
    if n_ops == 2:
        paid = cost_a.r + rng.randint(1, 50)
        change = Step(paid, "-", cost_a.r)
        lines.append(change.text(f"{name} gets back", " dollars in change."))
        q = (f"{name} buys {a} {p1} that cost ${pa} each. {pron.capitalize()} pays with ${paid}. "
             f"How much change does {pron} get in dollars?")
        return q, lines, change.r
    b, pb = rng.randint(2, 9), rng.randint(2, 12)
    cost_b = Step(b, "*", pb)
    total = Step(cost_a.r, "+", cost_b.r)
    lines += [cost_b.text(f"The {p2} cost", " dollars."), total.text(f"{name} spends", " dollars in total.")]
    q = (f"{name} buys {a} {p1} at ${pa} each and {b} {p2} at ${pb} each. "
         f"How much does {pron} spend in total in dollars?")
    return q, lines, total.r


def _rate(rng: random.Random, n_ops: int):
    name, pron = _person(rng)
    unit, verb, what = rng.choice([("pages", "reads", "read"), ("miles", "runs", "run"),
                                   ("laps", "swims", "swim"), ("words", "writes", "write"),
                                   ("cups", "sells", "sell")])
    per, days = rng.randint(3, 12), rng.randint(2, 9)
    s = Step(per, "*", days)
    lines = [s.text(f"{name} {verb}", f" {unit} in {days} days.")]
    q = f"{name} {verb} {per} {unit} every day for {days} days."
    value = s.r
    if n_ops >= 2:
        extra = rng.randint(2, 40)
        t = Step(s.r, "+", extra)
        q += f" On the last day {pron} also {verb} {extra} extra {unit}."
        lines.append(t.text(f"{name} {verb}", f" {unit} in all."))
        value = t.r
    q += f" How many {unit} does {name} {what} in total?"
    return q, lines, value


def _rows(rng: random.Random, n_ops: int):
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    rows, per = rng.randint(2, 9), rng.randint(3, 12)
    s = Step(rows, "*", per)
    lines = [s.text("There are", f" {obj} in the {place}.")]
    q = f"The {place} has {rows} rows of {obj} with {per} {obj} in each row."
    value = s.r
    if n_ops >= 2:
        name, _ = _person(rng)
        taken = rng.randint(1, s.r - 1)
        t = Step(s.r, "-", taken)
        q += f" {name} takes away {taken} of them."
        lines.append(t.text("There are", f" {obj} left."))
        value = t.r
        q += f" How many {obj} are left in the {place}?"
    else:
        q += f" How many {obj} are in the {place}?"
    return q, lines, value


def _sharing(rng: random.Random, n_ops: int):
    name, pron = _person(rng)
    obj = rng.choice(OBJECTS)
    k = rng.randint(2, 9)
    if n_ops == 1:
        each = rng.randint(2, 12)
        total = k * each
        q = f"{name} shares {total} {obj} equally among {k} friends. How many {obj} does each friend get?"
        s = Step(total, "/", k)
        return q, [s.text("Each friend gets", f" {obj}.")], s.r
    has, each = rng.randint(3, 50), rng.randint(2, 12)
    total = k * each
    if total <= has:
        total = has + k - has % k
    buys = total - has
    s = Step(has, "+", buys)
    d = Step(s.r, "/", k)
    q = (f"{name} has {has} {obj} and buys {buys} more. {pron.capitalize()} shares all of them equally among "
         f"{k} friends. How many {obj} does each friend get?")
    return q, [s.text(f"{name} has", f" {obj} in all."), d.text("Each friend gets", f" {obj}.")], d.r


def _compare(rng: random.Random, n_ops: int):
    (n1, _), obj = _person(rng), rng.choice(OBJECTS)
    n2, _ = _person(rng, n1)
    a = rng.randint(4, 50)
    if rng.random() < 0.5:
        b = rng.randint(2, 40)
        s = Step(a, "+", b)
        q = f"{n1} has {a} {obj}. {n2} has {b} more {obj} than {n1}."
    else:
        k = rng.randint(2, 4)
        s = Step(a, "*", k)
        q = f"{n1} has {a} {obj}. {n2} has {k} times as many {obj} as {n1}."
    lines = [s.text(f"{n2} has", f" {obj}.")]
    if n_ops == 1:
        return q + f" How many {obj} does {n2} have?", lines, s.r
    t = Step(a, "+", s.r)
    lines.append(t.text("Together they have", f" {obj}."))
    q += f" How many {obj} do they have together?"
    if n_ops == 3:
        n3, _ = _person(rng, n1)
        while n3 == n2:
            n3, _ = _person(rng, n1)
        c = rng.randint(2, 30)
        u = Step(t.r, "+", c)
        q = q.replace(" How many", f" {n1} and {n2} get {c} more {obj} from {n3}. How many")
        lines.append(u.text("With the gift they have", f" {obj}."))
        t = u
    return q, lines, t.r


def _age(rng: random.Random, n_ops: int):
    (n1, _), a = _person(rng), rng.randint(3, 40)
    n2, _ = _person(rng, n1)
    b, c = rng.randint(2, 30), rng.randint(2, 20)
    older = Step(a, "+", b)
    lines = [older.text(f"{n2} is", " years old.")]
    q = f"{n1} is {a} years old. {n2} is {b} years older than {n1}."
    if n_ops == 1:
        return q + f" How old is {n2}?", lines, older.r
    later = Step(older.r, "+", c)
    lines.append(later.text(f"In {c} years {n2} will be", " years old."))
    return q + f" How old will {n2} be in {c} years?", lines, later.r


def _savings(rng: random.Random, n_ops: int):
    name, pron = _person(rng)
    per, weeks = rng.randint(3, 12), rng.randint(2, 9)
    s = Step(per, "*", weeks)
    lines = [s.text(f"{name} saves", " dollars.")]
    q = f"{name} saves ${per} every week for {weeks} weeks."
    value = s.r
    if n_ops >= 2:
        thing = rng.choice(ITEMS)[0]
        spent = rng.randint(1, s.r - 1)
        t = Step(s.r, "-", spent)
        q += f" Then {pron} spends ${spent} on a {thing}."
        lines.append(t.text(f"{name} has", " dollars left."))
        value = t.r
        if n_ops == 3:
            gift = rng.randint(2, 30)
            u = Step(t.r, "+", gift)
            q += f" {pron.capitalize()} gets ${gift} as a gift."
            lines.append(u.text(f"{name} then has", " dollars."))
            value = u.r
        q += f" How much money does {name} have now in dollars?"
    else:
        q += f" How much money does {name} save in dollars?"
    return q, lines, value


def _boxes(rng: random.Random, n_ops: int):
    name, pron = _person(rng)
    cont, obj = rng.choice(CONTAINERS), rng.choice(OBJECTS)
    n, per = rng.randint(2, 9), rng.randint(4, 12)
    s = Step(n, "*", per)
    lines = [s.text(f"The {cont} hold", f" {obj}.")]
    q = f"{name} has {n} {cont} with {per} {obj} in each."
    value = s.r
    if n_ops >= 2:
        loose = rng.randint(2, 30)
        t = Step(s.r, "+", loose)
        q += f" {pron.capitalize()} also has {loose} loose {obj}."
        lines.append(t.text(f"{name} has", f" {obj} in all."))
        value = t.r
        if n_ops == 3:
            k = _divisor(rng, t.r)
            if k is not None:
                u = Step(t.r, "/", k)
                q += f" {pron.capitalize()} puts all of them into {k} equal piles."
                lines.append(u.text("Each pile has", f" {obj}."))
                return q + f" How many {obj} are in each pile?", lines, u.r
    q += f" How many {obj} does {name} have?"
    return q, lines, value


def _distance(rng: random.Random, n_ops: int):
    name, pron = _person(rng)
    speed, hours = rng.randint(4, 12), rng.randint(2, 9)
    s = Step(speed, "*", hours)
    lines = [s.text(f"{name} drives", " miles first.")]
    q = f"{name} drives at {speed} miles per hour for {hours} hours."
    value = s.r
    if n_ops >= 2:
        more = rng.randint(3, 60)
        t = Step(s.r, "+", more)
        q += f" Then {pron} drives {more} more miles."
        lines.append(t.text(f"{name} drives", " miles in all."))
        value = t.r
    return q + f" How many miles does {name} drive?", lines, value


FAMILIES: dict[str, tuple[Callable, tuple[int, ...]]] = {  # family -> (generator, operation counts it makes)
    "change": (_change, (1, 2, 3)), "shopping": (_shopping, (1, 2, 3)), "rate": (_rate, (1, 2)),
    "rows": (_rows, (1, 2)), "sharing": (_sharing, (1, 2)), "compare": (_compare, (1, 2, 3)),
    "age": (_age, (1, 2)), "savings": (_savings, (1, 2, 3)), "boxes": (_boxes, (1, 2, 3)),
    "distance": (_distance, (1, 2)),
}


def problem(rng: random.Random) -> dict:
    """One problem: {"question", "answer"} in GSM8K's format."""
    n_ops = rng.choice((1, 2, 3))
    fn, _ = FAMILIES[rng.choice(sorted(f for f, (_, counts) in FAMILIES.items() if n_ops in counts))]
    q, lines, value = fn(rng, n_ops)
    return {"question": q, "answer": _answer(lines, value)}


def generate(seed: int = SEED, n_test: int = TEST_SIZE, n_train: int = TRAIN_SIZE) -> tuple[list[dict], list[dict]]:
    """(train, test): `n_test` distinct test problems, then `n_train` training problems whose questions are
    not in the test split. One `random.Random(seed)` stream, so both splits are fixed by the seed."""
    rng = random.Random(seed)
    test: list[dict] = []
    seen: set[str] = set()
    while len(test) < n_test:
        p = problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            test.append(p)
    train: list[dict] = []
    while len(train) < n_train:
        p = problem(rng)
        if p["question"] not in seen:  # also keeps the training split free of duplicates
            seen.add(p["question"])
            train.append(p)
    return train, test


SHIFTED_OPS = (4, 5, 6)  # events per shifted problem: every training and test problem has 1-3 operations
SHIFT = ("long chains: `change` problems of 4-6 events (gain, loss, doubling/tripling, equal split), where every "
         "training and test problem has 1-3 operations from ten scenario families")


def shifted(n: int, seed: int = SEED) -> list[dict]:
    """`n` problems from a distribution the arith models were not trained on (`SHIFT`): running counts changed
    by `SHIFTED_OPS` events, in GSM8K's format. A stream of its own (`random.Random(f"shifted-{seed}")`), so the
    train and test splits are untouched; none of these questions can occur in them (more operations)."""
    rng = random.Random(f"shifted-{seed}")
    out = []
    for _ in range(n):
        q, lines, value = _change(rng, rng.choice(SHIFTED_OPS))
        out.append({"question": q, "answer": _answer(lines, value)})
    return out


def drills(n_lines: int, seed: int = SEED, per_line: int = 10) -> list[str]:
    """Arithmetic drill lines for training: `per_line` calculator annotations (`<<48+24=72>>72`) separated by
    spaces, taken from the steps of fresh problems (so they follow the problems' own distribution of
    operations and operands), from a stream of their own. A step costs about 10 tokens here against about 45
    inside a word problem, so drills teach the arithmetic for a quarter of the compute."""
    rng = random.Random(f"drills-{seed}")
    steps: list[str] = []
    lines: list[str] = []
    while len(lines) < n_lines:
        steps += [m.group(0) + m.group(2) for m in ANNOTATION.finditer(problem(rng)["answer"])]
        if len(steps) >= per_line:
            lines.append(" ".join(steps[:per_line]))
            steps = steps[per_line:]
    return lines


FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval's gsm8k "strict-match" pattern
ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def final_answer(text: str) -> str | None:
    """The number after `#### ` (commas removed), or None."""
    m = FINAL.search(text)
    return m.group(1).replace(",", "") if m else None


def fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
