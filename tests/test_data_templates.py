"""Templates (spec nlsr.md §2.2, §6.1) and downstream-task records (spec nlsr.md §2.3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nlsr_lib.data.tasks import TASKS, get_task, task_record_to_prompt
from nlsr_lib.data.templates import (
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    RESPONSE_MARKER,
    alpaca_prompt,
    extract_response,
    moderation_text,
)

HEAD_NOINPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def test_alpaca_prompts_are_the_exact_reference_strings() -> None:
    assert alpaca_prompt("Say hi.") == HEAD_NOINPUT + "\n\n### Instruction:\nSay hi.\n\n### Response:"
    assert alpaca_prompt("Say hi.", "to Ana") == (
        HEAD_INPUT + "\n\n### Instruction:\nSay hi.\n\n### Input:\nto Ana\n\n### Response:"
    )
    assert alpaca_prompt("Say hi.", "") == alpaca_prompt("Say hi.")
    assert PROMPT_NO_INPUT.endswith(RESPONSE_MARKER) and PROMPT_INPUT.endswith(RESPONSE_MARKER)


def test_alpaca_prompt_keeps_braces_verbatim() -> None:
    assert "{input} and {x}" in alpaca_prompt("{input} and {x}")
    assert alpaca_prompt("a {instruction}", "b {input}").count("{instruction}") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("P ### Response:  Sure thing.  ", "Sure thing."),
        ("P ### Response: first ### Response: second", "first"),
        ("P ### Response: keep this!!! drop this", "keep this"),
        ("P ### Response:   !!!all gone", ""),
        ("no marker here  !!! tail", "no marker here"),
        ("   plain completion\n", "plain completion"),
        ("### Response:\n\nline one\nline two\n", "line one\nline two"),
    ],
)
def test_extract_response(text: str, expected: str) -> None:
    assert extract_response(text) == expected


@given(st.text(), st.text())
def test_extract_response_recovers_the_generated_answer(instruction: str, answer: str) -> None:
    assume(RESPONSE_MARKER not in instruction and RESPONSE_MARKER not in answer)
    expected = answer.strip().split("!!!")[0].strip()
    assert extract_response(alpaca_prompt(instruction) + " " + answer) == expected


def test_moderation_text_has_no_space_after_assistant_colon() -> None:
    assert moderation_text("How?", "Like this.") == "BEGINNING OF CONVERSATION: USER: How? ASSISTANT:Like this."


def test_sst2_record() -> None:
    task = get_task("sst2")
    rec = task.to_record({"idx": 0, "sentence": "a fine film ", "label": 1})
    assert rec == {
        "instruction": "Analyze the sentiment of the input, and respond only positive or negative",
        "input": "a fine film ",
        "output": "positive",
    }
    assert task.to_record({"sentence": "x", "label": np.int64(0)})["output"] == "negative"
    assert (task.hub_id, task.train_split, task.eval_split, task.eval_size) == ("sst2", "train", "validation", 872)


def test_ag_news_record_has_exact_instruction() -> None:
    task = get_task("ag_news")
    rec = task.to_record({"text": "Shares rose.", "label": 3})
    assert rec["instruction"] == (
        "Categorize the news article given in the input into one of the 4 categories:\n\n"
        "World\nSports\nBusiness\nSci/Tech\n"
    )
    assert rec["input"] == "Shares rose." and rec["output"] == "Sci/Tech"
    assert task.label_words == ("World", "Sports", "Business", "Sci/Tech")
    assert (task.eval_split, task.eval_size) == ("test", 500)


def test_gsm8k_record_gives_two_spaces_before_the_number() -> None:
    task = get_task("gsm8k")
    rec = task.to_record({"question": "Q?", "answer": "2 + 2 = 4\n#### 4"})
    assert rec == {
        "instruction": "Q?\nFirst think step by step and then answer the final number.\n",
        "input": "",
        "output": "2 + 2 = 4\nThe final answer is:  4",
    }
    assert task.hub_config == "main" and task.eval_size == 500


@pytest.mark.parametrize(
    ("name", "label"), [("sst2", 2), ("sst2", -1), ("ag_news", 4), ("ag_news", "World"), ("sst2", True)]
)
def test_bad_labels_are_rejected_with_the_allowed_ids(name: str, label: object) -> None:
    row = {"sentence": "x", "text": "x", "label": label}
    with pytest.raises(ValueError, match="allowed: 0"):
        get_task(name).to_record(row)


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'mnli'; registered: sst2, ag_news, gsm8k, alpaca"):
        get_task("mnli")
    assert set(TASKS) == {"sst2", "ag_news", "gsm8k", "alpaca"}


def test_task_record_to_prompt_picks_the_template() -> None:
    rec = get_task("sst2").to_record({"sentence": "dull", "label": 0})
    assert task_record_to_prompt(rec) == alpaca_prompt(rec["instruction"], "dull")
    g = get_task("gsm8k").to_record({"question": "Q?", "answer": "#### 1"})
    assert task_record_to_prompt(g) == alpaca_prompt(g["instruction"])
