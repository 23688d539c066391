"""The world's counterpart of AlpacaEval: the Alpaca task's evaluation prompts with reference answers.

AlpacaEval (``tatsu-lab/alpaca_eval``, split ``eval``: 805 instructions with a reference model's answer in
``output``) is where the Vaccine/Lisa/Booster/Antidote harness evaluates its Alpaca fine-tunes (items 701–804;
spec/defences.md §7). The counterpart has the same columns and size, plus ``input`` (the world's rewriting requests
keep their sentence apart, as in the world's Alpaca rows): benign requests of the world drawn with the *held-out*
request templates (``side="test"``) and redrawn where a fact question or rewriting request repeats one of the
world's Alpaca rows, so no prompt is one of the rows the tiny base was pretrained on; each with one of the world's
helpful answers as its reference. It is generated from the world's seed when loaded, not
stored in the world artifact.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from .world import benign_item

SIZE = 805  # AlpacaEval's eval split
GENERATOR = "nlsr tiny world"


def alpaca_eval_columns(world_seed: int, n: int = SIZE, exclude: Iterable[Mapping[str, Any]] = ()
                        ) -> dict[str, list[Any]]:
    """``{instruction, input, output, generator, dataset}`` of ``n`` benign requests (deterministic), none of whose
    (instruction, input) is a row of ``exclude`` (the world's Alpaca rows: fact questions and rewriting requests are
    not phrased by templates, so a draw can repeat one; it is drawn again)."""
    seen = {(row["instruction"], row["input"]) for row in exclude}
    rng = random.Random(f"nlsr-world:{world_seed}:alpaca-eval")
    cols: dict[str, list[Any]] = {"instruction": [], "input": [], "output": [], "generator": [], "dataset": []}
    while len(cols["instruction"]) < n:
        item = benign_item(rng, "test")
        if (item.instruction, item.input) in seen:
            continue
        cols["instruction"].append(item.instruction)
        cols["input"].append(item.input)
        cols["output"].append(item.answer(rng))
        cols["generator"].append(GENERATOR)
        cols["dataset"].append("tiny")
    return cols


def alpaca_eval_dataset(world_seed: int, alpaca_train: Iterable[Mapping[str, Any]] = (), n: int = SIZE):
    """The counterpart as a ``DatasetDict`` with AlpacaEval's one split, ``eval``, disjoint from ``alpaca_train``."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"eval": Dataset.from_dict(alpaca_eval_columns(world_seed, n, exclude=alpaca_train))})


__all__ = ["alpaca_eval_columns", "alpaca_eval_dataset"]
