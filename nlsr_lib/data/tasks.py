"""Downstream-task registry: hub sources, instruction formats and label words (spec nlsr.md §2.3, §6.2)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.registry import Registry

SST2_INSTRUCTION: str = "Analyze the sentiment of the input, and respond only positive or negative"
AG_NEWS_INSTRUCTION: str = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
GSM8K_SUFFIX: str = "\nFirst think step by step and then answer the final number.\n"
GSM8K_ANSWER_MARKER: str = "####"
GSM8K_FINAL_ANSWER: str = "The final answer is: "

SST2_LABELS: tuple[str, ...] = ("negative", "positive")
AG_NEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")

Record = dict[str, str]


def _label_word(task: str, labels: tuple[str, ...], label: Any) -> str:
    """Map an integer class id to its label word, refusing ids outside ``range(len(labels))``."""
    allowed = ", ".join(f"{i} ({w})" for i, w in enumerate(labels))
    try:
        index = None if isinstance(label, bool) else operator.index(label)
    except TypeError:
        index = None
    if index is None or not 0 <= index < len(labels):
        raise ValueError(f"{task}: label {label!r} is not a class id; allowed: {allowed}")
    return labels[index]


def sst2_record(row: Mapping[str, Any]) -> Record:
    """SST-2 row -> ``{instruction, input: sentence, output: negative|positive}`` (spec nlsr.md §2.3)."""
    return {
        "instruction": SST2_INSTRUCTION,
        "input": row["sentence"],
        "output": _label_word("sst2", SST2_LABELS, row["label"]),
    }


def ag_news_record(row: Mapping[str, Any]) -> Record:
    """AG News row -> ``{instruction, input: text, output: World|Sports|Business|Sci/Tech}`` (spec nlsr.md §2.3)."""
    return {
        "instruction": AG_NEWS_INSTRUCTION,
        "input": row["text"],
        "output": _label_word("ag_news", AG_NEWS_LABELS, row["label"]),
    }


def gsm8k_record(row: Mapping[str, Any]) -> Record:
    """GSM8K row -> record (spec nlsr.md §2.3).

    ``instruction = question + GSM8K_SUFFIX``, ``input = ""``, and ``output`` is the answer with the ``####``
    marker replaced by ``"The final answer is: "``; since the answer reads ``#### N`` this gives two spaces
    before the number (``"The final answer is:  N"``), exactly as the reference builder does.
    """
    return {
        "instruction": row["question"] + GSM8K_SUFFIX,
        "input": "",
        "output": row["answer"].replace(GSM8K_ANSWER_MARKER, GSM8K_FINAL_ANSWER),
    }


def alpaca_record(row: Mapping[str, Any]) -> Record:
    """Alpaca (or AlpacaEval) row -> ``{instruction, input, output}`` (AlpacaEval rows have no input)."""
    return {"instruction": row["instruction"], "input": row.get("input", "") or "", "output": row["output"]}


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task: where its data comes from and how a row becomes an Alpaca record (spec §2.3, §6.2).

    ``eval_source``: the source of its evaluation rows when not the task's own (Alpaca: AlpacaEval), from row
    ``eval_start``; ``in_corpus``: its training rows enter the tiny world's tokenizer text and pretraining corpus as
    task examples (Alpaca's are there already, as the Alpaca source)."""

    name: str
    hub_id: str
    hub_config: str | None
    train_split: str
    eval_split: str
    eval_size: int
    label_words: tuple[str, ...]
    converter: Callable[[Mapping[str, Any]], Record] = field(repr=False, compare=False)
    eval_source: str | None = None
    eval_start: int = 0
    in_corpus: bool = True

    @property
    def eval_source_name(self) -> str:
        return self.eval_source or self.name

    def to_record(self, row: Mapping[str, Any]) -> Record:
        """Convert one hub-schema row into ``{instruction, input, output}``."""
        return self.converter(row)


TASKS: Registry[TaskSpec] = Registry("task")
"""The three downstream tasks of spec nlsr.md §2.3 (eval sizes from §6.2; SST-2: all 872 validation rows) and
Alpaca, the instruction-following task of the Vaccine/Lisa/Booster/Antidote harness (spec/defences.md §7: evaluated
on AlpacaEval items 701–804, 104 prompts). This module imports nothing heavy: config.py validates ``attack.tasks``
and ``ablation.task`` against it."""
for _spec in (TaskSpec("sst2", "sst2", None, "train", "validation", 872, SST2_LABELS, sst2_record),
              TaskSpec("ag_news", "ag_news", None, "train", "test", 500, AG_NEWS_LABELS, ag_news_record),
              TaskSpec("gsm8k", "gsm8k", "main", "train", "test", 500, (), gsm8k_record),
              TaskSpec("alpaca", "tatsu-lab/alpaca", None, "train", "eval", 104, (), alpaca_record,
                       eval_source="alpaca_eval", eval_start=700, in_corpus=False)):
    TASKS.register(_spec.name, _spec)


def get_task(name: str) -> TaskSpec:
    """Look up a task by name; an unknown name is an :class:`~nlsr_lib.registry.UnknownName` listing the tasks."""
    return TASKS[name]


def task_record_to_prompt(record: Mapping[str, str]) -> str:
    """The inference prompt of a record: ``P_input`` if it has an input, else ``P_noinput`` (spec §2.2, §6.2)."""
    return alpaca_prompt(record["instruction"], record.get("input", ""))
