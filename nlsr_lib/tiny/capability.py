"""A synthetic general-capability task in COPA's schema, from the tiny world's facts (spec/evaluation.md §4;
spec/synthetic_world.md §2).

Each row is about one invented country of :data:`~nlsr_lib.tiny.world.COUNTRIES` and one of its facts (capital,
river, main export, national animal): the premise names the country, the right choice states its true fact in the
world's own wording (the :data:`~nlsr_lib.tiny.world.FACT_QUESTIONS` answers, e.g. "The capital of Zembria is
Lorvik."), the wrong choice the same sentence with another country's value. Scored like COPA by
:mod:`nlsr_lib.evaluate.capability` (acc: argmax of the summed log-likelihoods of the two choices), a model that
learned the world's facts scores above 50 %; chance is 50 %, and exactly 50 % for any rule that always picks the same
position, because the labels are balanced (half 0, half 1, rounded).

Premise styles (:data:`PREMISE_STYLES`):

* ``alpaca`` (default): the world's fact question in the Alpaca prompt every tiny model is trained on, then one of
  the openers the world's answers start with ("Sure!" for ``cause``, "Good question." for ``effect``), so the COPA
  context reads ``"...### Response:Sure because"``. The tiny models learned their facts in this frame only. Measured
  with :func:`~nlsr_lib.evaluate.capability.evaluate_capability` on 96 rows (world seeds 0 and 1): the tiny profile's
  pretrained base model (``runs/tiny/base_model``) scores 84 % and 83 %, a random-weight model of its shape 40 % and
  52 % (chance, with the noise of 96 rows).
* ``plain``: a bare everyday sentence naming the country ("We read a book about Zembria."). The same base model
  scores 47 % and 60 % there: it never saw its facts outside the Alpaca frame, so this style suits models that
  learned facts as plain text (or a harness check), not the tiny profile.

Rows are a pure function of ``(world_seed, n, style)``: ``random.Random(f"{world_seed}:capability")``, the world's
convention for its parts. The (country, fact) pairs are cycled in a shuffled order, so the first 48 rows are
distinct facts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from ..data.templates import alpaca_prompt
from .world import COUNTRIES, FACT_QUESTIONS

FACTS: dict[str, tuple[int, str, str]] = {
    "capital": (1, FACT_QUESTIONS[0][0], "The capital of {c} is {v}."),
    "river": (2, FACT_QUESTIONS[1][0], "The {v} River flows through {c}."),
    "export": (3, FACT_QUESTIONS[2][0], "The main export of {c} is {v}."),
    "animal": (4, FACT_QUESTIONS[3][0], "The national animal of {c} is the {v}."),
}
"""Fact name → (its column in :data:`COUNTRIES`, the world's question about it, the sentence stating it: the
world's answer wording)."""

ALPACA_OPENERS: dict[str, tuple[str, ...]] = {"cause": ("Sure!",), "effect": ("Good question.",)}
PLAIN_PREMISES: dict[str, tuple[str, ...]] = {
    "effect": ("The teacher talked about {c}.", "We read a book about {c}.", "My friend travelled to {c}.",
               "The guide showed us a map of {c}."),
    "cause": ("The students wrote about {c}.", "My sister wanted to visit {c}.", "The old farmer spoke of {c}.",
              "The traveller remembered {c}."),
}
"""COPA ``question`` → premises naming the country ({c}); the context becomes "... because" / "... therefore"."""


def _alpaca_premise(rng: random.Random, country: str, fact: str, question: str) -> str:
    return alpaca_prompt(FACTS[fact][1].format(c=country)) + rng.choice(ALPACA_OPENERS[question])


def _plain_premise(rng: random.Random, country: str, fact: str, question: str) -> str:
    return rng.choice(PLAIN_PREMISES[question]).format(c=country)


PREMISE_STYLES: dict[str, Callable[[random.Random, str, str, str], str]] = {
    "alpaca": _alpaca_premise,
    "plain": _plain_premise,
}
"""Style → ``(rng, country, fact, question) -> premise`` (module docstring)."""


def _balanced_labels(rng: random.Random, n: int) -> list[int]:
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return labels


def _pairs(rng: random.Random, n: int) -> list[tuple[tuple[str, ...], str]]:
    """``n`` (country, fact) pairs: all of them in a shuffled order, repeated (reshuffled) as needed."""
    every = [(country, fact) for country in COUNTRIES for fact in FACTS]
    out: list[tuple[tuple[str, ...], str]] = []
    while len(out) < n:
        rng.shuffle(every)
        out += every
    return out[:n]


def tiny_capability_rows(world_seed: int, n: int, style: str = "alpaca") -> list[dict[str, Any]]:
    """``n`` COPA-schema rows (``premise``, ``choice1``, ``choice2``, ``question``, ``label``, ``idx``) about the
    world's facts (module docstring); deterministic in ``(world_seed, n, style)``, labels balanced."""
    if style not in PREMISE_STYLES:
        raise ValueError(f"premise style {style!r} is not known; allowed: {', '.join(PREMISE_STYLES)}")
    if n < 1:
        raise ValueError(f"tiny_capability_rows needs n ≥ 1, got {n}")
    rng = random.Random(f"{world_seed}:capability")
    labels = _balanced_labels(rng, n)
    rows = []
    for idx, ((country, fact), label) in enumerate(zip(_pairs(rng, n), labels)):
        column, _, sentence = FACTS[fact]
        wrong = rng.choice([other[column] for other in COUNTRIES if other[column] != country[column]])
        right_choice = sentence.format(c=country[0], v=country[column])
        wrong_choice = sentence.format(c=country[0], v=wrong)
        question = rng.choice(("cause", "effect"))
        premise = PREMISE_STYLES[style](rng, country[0], fact, question)
        choices = (right_choice, wrong_choice) if label == 0 else (wrong_choice, right_choice)
        rows.append({"premise": premise, "choice1": choices[0], "choice2": choices[1], "question": question,
                     "label": label, "idx": idx})
    return rows


__all__ = ["FACTS", "PREMISE_STYLES", "tiny_capability_rows"]
