"""Downstream task accuracy (spec nlsr.md §6.2), each with the paper's lenient rule and a strict rule beside it.

* SST-2, lenient: correct iff the gold word appears as a substring (``positive``/``Positive`` for label 1,
  ``negative``/``Negative`` for label 0) — a prediction containing both words counts as correct (§9.17).
  Strict: the stripped prediction is exactly the gold word.
* AG News, lenient: the prediction is first cut before any ``"### Instruction:"``; correct iff it contains
  ``World|world``, ``Sports|sports``, ``Business|business`` or ``Sci/Tech|sci`` for the gold class.
  Strict: the cut, stripped prediction is exactly the gold label word.
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


MATCHERS: Registry[Callable[[str, object, bool], bool]] = Registry("task")  # task -> its accuracy rule
MATCHERS.register("sst2", sst2_correct)
MATCHERS.register("ag_news", ag_news_correct)
MATCHERS.register("gsm8k", gsm8k_correct)


def gold(task: str, row: dict) -> object:
    """The gold field each matcher compares against: the label id, or the GSM8K answer text."""
    return row["answer"] if task == "gsm8k" else row["label"]


def accuracy(task: str, predictions: Sequence[str], golds: Sequence[object], strict: bool = False) -> float:
    """Accuracy × 100 of ``predictions`` under the task's rule."""
    match = MATCHERS[task]
    if len(predictions) != len(golds) or not predictions:
        raise ValueError(f"accuracy needs as many predictions as golds (>0); got {len(predictions)} and {len(golds)}")
    return round(100.0 * sum(match(p, g, strict) for p, g in zip(predictions, golds)) / len(predictions), 2)
