"""Downstream task accuracy (spec nlsr.md §6.2), each with the paper's lenient rule and a strict rule beside it.

* SST-2, lenient: correct iff the gold word appears as a substring (``positive``/``Positive`` for label 1,
  ``negative``/``Negative`` for label 0) — a prediction containing both words counts as correct (§9.17).
  Strict: the stripped prediction is exactly the gold word.
* AG News, lenient: the prediction is first cut before any ``"### Instruction:"``; correct iff it contains
  ``World|world``, ``Sports|sports``, ``Business|business`` or ``Sci/Tech|sci`` for the gold class.
  Strict: the cut, stripped prediction is exactly the gold label word.
* Alpaca (the instruction-following task of spec/defences.md §7, whose harness scores AlpacaEval win rates with an
  external judge): a reference-based helpfulness score instead, needing no API — ROUGE-L F1 of the answer against
  the reference answer (:func:`alpaca_score`), averaged; strict: the share with F1 ≥ 0.5. With an LLM judge
  configured, the win rate against the aligned model's answers is measured beside it.
* GSM8K: :func:`gsm8k_number` extracts the answer of both gold and prediction (commas removed; no number →
  +inf; after ``"The final answer is: "`` the first number there, else the last number overall); correct iff
  the floats are equal. Strict: the prediction must contain the marker and the first number after it must equal
  the gold number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from nlsr_lib.data.tasks import AG_NEWS_LABELS, GSM8K_FINAL_ANSWER, SST2_LABELS
from nlsr_lib.registry import Registry

NUMBER = re.compile(r"-?\d+\.?\d*")
AG_NEWS_LENIENT: tuple[tuple[str, ...], ...] = (("World", "world"), ("Sports", "sports"),
                                                ("Business", "business"), ("Sci/Tech", "sci"))
SST2_LENIENT: tuple[tuple[str, ...], ...] = (("negative", "Negative"), ("positive", "Positive"))


def gsm8k_number(text: str) -> float:
    """The GSM8K answer extraction of ``gsm8k_eval.py`` (spec §6.2)."""
    text = text.replace(",", "")
    numbers = NUMBER.findall(text)
    if not numbers:
        return math.inf
    if GSM8K_FINAL_ANSWER in text:
        after = NUMBER.findall(text.split(GSM8K_FINAL_ANSWER, 1)[1])
        if after:
            return float(after[0])
    return float(numbers[-1])


def _cut_instruction(prediction: str) -> str:
    return prediction.split("### Instruction:", 1)[0]


def sst2_correct(prediction: str, label: int, strict: bool = False) -> bool:
    if strict:
        return prediction.strip() == SST2_LABELS[label]
    return any(word in prediction for word in SST2_LENIENT[label])


def ag_news_correct(prediction: str, label: int, strict: bool = False) -> bool:
    prediction = _cut_instruction(prediction)
    if strict:
        return prediction.strip() == AG_NEWS_LABELS[label]
    return any(word in prediction for word in AG_NEWS_LENIENT[label])


def gsm8k_correct(prediction: str, answer: str, strict: bool = False) -> bool:
    gold = gsm8k_number(answer)
    if strict:
        if GSM8K_FINAL_ANSWER not in prediction:
            return False
        after = NUMBER.findall(prediction.replace(",", "").split(GSM8K_FINAL_ANSWER, 1)[1])
        return bool(after) and float(after[0]) == gold
    return gsm8k_number(prediction) == gold


WORD = re.compile(r"\w+")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, O(|a|·|b|))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, β = 1) over lower-cased word tokens: P = LCS/|pred|, R = LCS/|ref|, F1 = 2PR/(P+R);
    0 when either side has no word.

    >>> rouge_l_f1("First, mix the flour. Then bake it.", "First mix the flour, then bake the bread.")  # 2·6/(7+8)
    0.8
    """
    pred, ref = WORD.findall(prediction.lower()), WORD.findall(reference.lower())
    lcs = lcs_length(pred, ref) if pred and ref else 0
    return 0.0 if lcs == 0 else 2 * lcs / (len(pred) + len(ref))


ALPACA_STRICT_F1 = 0.5


def alpaca_score(prediction: str, reference: str, strict: bool = False) -> float:
    """The Alpaca task's reference-based helpfulness: ROUGE-L F1 of the answer (cut before any
    ``"### Instruction:"``) against the reference answer; strict: 1 iff that F1 is at least 0.5."""
    f1 = rouge_l_f1(_cut_instruction(prediction), reference)
    return float(f1 >= ALPACA_STRICT_F1) if strict else f1


MATCHERS: Registry[Callable[[str, object, bool], float]] = Registry("task")
"""task -> its per-answer score in [0, 1] under the lenient or strict rule: 1/0 for the exact rules of SST-2, AG News
and GSM8K, ROUGE-L F1 against the reference for Alpaca."""
MATCHERS.register("sst2", sst2_correct)
MATCHERS.register("ag_news", ag_news_correct)
MATCHERS.register("gsm8k", gsm8k_correct)
MATCHERS.register("alpaca", alpaca_score)

GOLD_FIELDS = {"sst2": "label", "ag_news": "label", "gsm8k": "answer", "alpaca": "output"}


def gold(task: str, row: dict) -> object:
    """The gold field each matcher compares against: the label id, the GSM8K answer text, the reference answer."""
    return row[GOLD_FIELDS[task]]


def accuracy(task: str, predictions: Sequence[str], golds: Sequence[object], strict: bool = False) -> float:
    """Accuracy × 100 of ``predictions`` under the task's rule: the mean per-answer score of :data:`MATCHERS`
    (Alpaca: the mean ROUGE-L F1 × 100, a reference-based helpfulness score)."""
    match = MATCHERS[task]
    if len(predictions) != len(golds) or not predictions:
        raise ValueError(f"accuracy needs as many predictions as golds (>0); got {len(predictions)} and {len(golds)}")
    return round(100.0 * sum(match(p, g, strict) for p, g in zip(predictions, golds)) / len(predictions), 2)
