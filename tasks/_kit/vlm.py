"""What the vision-language tasks share (`digits-vlm`, `textvqa`): one question answered through the subject's
`generate` hook or LLaVA's own `generate` (`answer_ids`), and the VQA accuracy metric with its answer
normalisation (`vqa_accuracy`, `normalize_answer`).

Module scope is torch-free.

VQA accuracy (Antol et al. 2015; the VQA and TextVQA evaluation servers, and LLaVA's `m4c_evaluator`): a question
has ten human answers; a prediction that matches k of them scores min(k / 3, 1), averaged over the ten ways of
leaving one annotator out,

    acc(a) = 1/10 sum_{i=1..10} min( #{ j != i : a_j == a } / 3, 1 ),

after both the prediction and every human answer are normalised by `normalize_answer`. Written by hand: no
installed package has it (lm-eval has no VQA task; the reference implementation is the EvalAI answer processor
of facebookresearch/mmf, `pythia/tasks/processors.py`, which lmms-eval and LLaVA's evaluation copy). Its
behaviour is kept exactly, quirks included, so that scores agree with the published ones:

- the answer is lower-cased, "," and "?" are deleted, "'s" is split off as " 's", newlines and tabs become spaces;
- each punctuation mark in `_PUNCTUATION` is deleted when it touches a space or when the text has a digit-comma-
  digit group, else replaced by a space;
- a "." not followed by a digit is deleted, at most 32 times (the reference passes `re.UNICODE`, 32, as the
  `count` of `re.sub`; its look-behind is mistyped as the look-ahead `(?!<=\\d)`, which we keep);
- number words zero..ten (and "none") become digits, the articles a/an/the are dropped, and the contractions of
  `_CONTRACTIONS` get their apostrophes back ("dont" -> "don't").
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bench.api import Subject


def answer_ids(subject: "Subject", input_ids: "torch.Tensor", pixel_values: "torch.Tensor",
               max_new_tokens: int) -> "torch.Tensor":
    """Greedy answer to one question (batch 1), prompt included, cut by the subject's stop rule. A method's
    `extra["generate"](subject, input_ids, pixel_values, max_new_tokens)` replaces LLaVA's `generate`."""
    rule = subject.extra["stop"]
    tok = subject.extra["tokenizer"]
    hook = subject.extra.get("generate")
    if hook is not None:
        out = hook(subject, input_ids, pixel_values, max_new_tokens)
    else:
        import torch

        out = subject.model.generate(input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                                     do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(rule.eos_ids),
                                     pad_token_id=tok.pad_token_id, stopping_criteria=rule.criteria(input_ids.shape[1]))
    return rule.cut_output(out, input_ids.shape[1], tok.pad_token_id)


# ---- VQA accuracy ---------------------------------------------------------------------------------------------

# the reference's table, as (written without apostrophes, restored) pairs; "somebody'd" -> "somebodyd" is its own
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've""".split())
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the reference's count argument (see the module docstring)


def normalize_answer(text: str) -> str:
    """The EvalAI/VQA normalisation of one answer (see the module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers (ten in VQAv2 and TextVQA): the mean over the
    annotators left out in turn of min(#matching others / 3, 1), all answers normalised."""
    if not answers:
        raise ValueError("VQA accuracy needs the question's human answers; got none (a test split hides them: "
                         "evaluate on the validation split)")
    pred = normalize_answer(prediction)
    gt = [normalize_answer(a) for a in answers]
    scores = [min(1.0, sum(1 for j, a in enumerate(gt) if j != i and a == pred) / 3) for i in range(len(gt))]
    return sum(scores) / len(scores)
