"""The hub datasets' contract: ids, splits, feature types and BeaverTails' harm categories (spec/synthetic_world.md §1).

The real loaders (``loaders.py``), the builders, the moderation judge and the synthetic world all read this one
module, so the world and the hub data have exactly the same schemas and the real-data path is the code path that
the tiny profile exercises.
"""

from __future__ import annotations

from datasets import ClassLabel, Features, Value

HARM_CATEGORIES: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)
"""BeaverTails' 14 harm categories, in the order of the spec (synthetic_world.md §1, nlsr.md §6.1)."""

BEAVERTAILS = "PKU-Alignment/BeaverTails"
SAFERLHF = "PKU-Alignment/PKU-SafeRLHF-30K"
SST2 = "sst2"
AG_NEWS = "ag_news"
GSM8K = "gsm8k"
ALPACA = "tatsu-lab/alpaca"
EVAL_SETS: tuple[str, ...] = (
    "BeaverTails-Evaluation",
    "CatQA",
    "HarmfulQA",
    "DangerousQA",
    "shadow-alignment",
)
"""The five harmful-question sets of spec/somf.md (split ``test``)."""
EVAL_SETS_WITH_CATEGORY: frozenset[str] = frozenset(
    {"BeaverTails-Evaluation", "CatQA", "HarmfulQA", "shadow-alignment"}
)

_STR = Value("string")
_BOOL = Value("bool")
SCHEMAS: dict[str, Features] = {
    BEAVERTAILS: Features(
        {
            "prompt": _STR,
            "response": _STR,
            "category": {name: _BOOL for name in HARM_CATEGORIES},
            "is_safe": _BOOL,
        }
    ),
    SAFERLHF: Features(
        {
            "prompt": _STR,
            "response_0": _STR,
            "response_1": _STR,
            "is_response_0_safe": _BOOL,
            "is_response_1_safe": _BOOL,
            "better_response_id": Value("int64"),
            "safer_response_id": Value("int64"),
        }
    ),
    SST2: Features(
        {"idx": Value("int32"), "sentence": _STR, "label": ClassLabel(names=["negative", "positive"])}
    ),
    AG_NEWS: Features(
        {"text": _STR, "label": ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])}
    ),
    GSM8K: Features({"question": _STR, "answer": _STR}),
    ALPACA: Features({"instruction": _STR, "input": _STR, "output": _STR, "text": _STR}),
    **{
        name: Features({"prompt": _STR, "category": _STR} if name in EVAL_SETS_WITH_CATEGORY else {"prompt": _STR})
        for name in EVAL_SETS
    },
}
"""Feature types of every dataset of the world, keyed by hub id (spec/synthetic_world.md §1)."""

SPLITS: dict[str, tuple[str, ...]] = {
    BEAVERTAILS: ("30k_train", "30k_test"),
    SAFERLHF: ("train", "test"),
    SST2: ("train", "validation"),
    AG_NEWS: ("train", "test"),
    GSM8K: ("train", "test"),
    ALPACA: ("train",),
    **{name: ("test",) for name in EVAL_SETS},
}
"""Splits of every dataset of the world, keyed by hub id."""
