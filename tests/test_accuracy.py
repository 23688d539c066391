"""Task accuracy rules of spec nlsr.md §6.2 and §10, lenient and strict."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from nlsr_lib.evaluate.accuracy import accuracy, ag_news_correct, gsm8k_correct, gsm8k_number, sst2_correct


def test_gsm8k_extraction_hand_values():
    assert gsm8k_number("… The final answer is:  1,234 apples") == 1234.0  # spec §10
    assert gsm8k_number("no digits") == math.inf
    assert gsm8k_number("3 + 4 = 7, then 7 * 2 = 14") == 14.0
    assert gsm8k_number("5 and 6. The final answer is: unknown") == 6.0  # nothing after the marker → last number
    assert gsm8k_number("x = -2.5") == -2.5


def test_gsm8k_matching():
    gold = "Tom has 3 + 5 = 8 apples.\n#### 8"
    assert gsm8k_correct("3 + 5 = 8. The final answer is:  8", gold)
    assert gsm8k_correct("so 8", gold) and not gsm8k_correct("so 8", gold, strict=True)
    assert not gsm8k_correct("The final answer is: 9 (not 8)", gold)


def test_sst2_lenient_and_strict():
    assert sst2_correct("positive", 1) and sst2_correct("Positive!", 1) and not sst2_correct("Positive!", 1, strict=True)
    assert sst2_correct("positive or negative", 0)  # both present counts as correct (spec §9.17)
    assert not sst2_correct("positive", 0)


def test_ag_news_lenient_and_strict():
    assert ag_news_correct("sci stuff", 3) and not ag_news_correct("sci stuff", 3, strict=True)
    assert ag_news_correct("Sports", 1, strict=True)
    assert not ag_news_correct("\n### Instruction: World", 0)  # cut before a new instruction
    assert ag_news_correct("Business ### Instruction: World", 2, strict=False)


def test_accuracy_percent_and_errors():
    assert accuracy("sst2", ["positive", "negative", "meh", "positive"], [1, 0, 1, 0]) == 50.0
    with pytest.raises(ValueError, match="unknown task"):
        accuracy("imdb", ["x"], [0])
    with pytest.raises(ValueError, match="as many"):
        accuracy("sst2", ["x"], [0, 1])


@given(st.lists(st.tuples(st.sampled_from(["positive", "negative", "Positive", "no idea"]), st.integers(0, 1)),
                min_size=1, max_size=30))
def test_strict_never_exceeds_lenient(rows):
    preds, golds = zip(*rows)
    assert accuracy("sst2", preds, golds, strict=True) <= accuracy("sst2", preds, golds)
