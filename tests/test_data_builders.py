"""Alignment-data builders and evaluation-prompt selection (spec nlsr.md §2.1, §6.1), on hand-made fixtures."""

from __future__ import annotations

import types
from typing import Any

import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.data.builders import (
    build_kto,
    build_preference_pairs,
    build_safe_sft,
    moderation_examples,
    safety_eval_prompts,
)
from nlsr_lib.tiny.world import BEAVERTAILS, HARM_CATEGORIES, SAFERLHF, SCHEMAS, generate_world


def _flags(*on: str) -> dict[str, bool]:
    return {name: name in on for name in HARM_CATEGORIES}


def _bt(prompt: str, response: str, is_safe: bool, *cats: str) -> dict[str, Any]:
    return {"prompt": prompt, "response": response, "category": _flags(*cats), "is_safe": is_safe}


BEAVERTAILS_ROWS = [
    _bt("p0", "comply0", False, "animal_abuse"),
    _bt("p1", "refuse1", True),
    _bt("p2", "comply2", False, "self_harm", "privacy_violation"),
    _bt("p3", "refuse3", True),
    _bt("p4", "comply4", False, "child_abuse"),
    _bt("p5", "help5", True),
]


def _rlhf(prompt: str, safe0: bool, safe1: bool, better: int = 0, safer: int = 0) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "response_0": f"{prompt}-r0",
        "response_1": f"{prompt}-r1",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "better_response_id": better,
        "safer_response_id": safer,
    }


# safer_response_id deliberately wrong on q0 and q4: the builders must use the flags only.
RLHF_ROWS = [
    _rlhf("q0", True, False, better=1, safer=1),
    _rlhf("q1", True, True),
    _rlhf("q2", True, False),
    _rlhf("q3", True, True),
    _rlhf("q4", False, True, better=0, safer=0),
    _rlhf("q5", False, False),
]


def _as_dataset(rows: list[dict[str, Any]], hub_id: str) -> Dataset:
    return Dataset.from_list(rows, features=SCHEMAS[hub_id])


@pytest.fixture(params=["list", "dataset"])
def as_input(request):
    def convert(rows: list[dict[str, Any]], hub_id: str):
        return rows if request.param == "list" else _as_dataset(rows, hub_id)

    return convert


# ------------------------------------------------------------------------------------------- SFT
def test_safe_sft_takes_the_first_safe_rows_in_order(as_input) -> None:
    data = as_input(BEAVERTAILS_ROWS, BEAVERTAILS)
    assert build_safe_sft(data, n=2) == [
        {"instruction": "p1", "input": "", "output": "refuse1"},
        {"instruction": "p3", "input": "", "output": "refuse3"},
    ]
    assert [r["instruction"] for r in build_safe_sft(data, n=3)] == ["p1", "p3", "p5"]
    assert build_safe_sft(data, n=0) == []


def test_safe_sft_strict_error_names_the_filter_and_counts() -> None:
    with pytest.raises(ValueError, match=r"only 3 rows pass the filter is_safe == True, but n = 4"):
        build_safe_sft(BEAVERTAILS_ROWS, n=4)
    assert len(build_safe_sft(BEAVERTAILS_ROWS, n=4, strict=False)) == 3


# ------------------------------------------------------------------------------------------- preference
def test_preference_pairs_use_the_safety_flags_only(as_input) -> None:
    pairs = build_preference_pairs(as_input(RLHF_ROWS, SAFERLHF), n=2)
    assert pairs == [
        {"instruction": "q0", "input": "", "chosen": "q0-r0", "rejected": "q0-r1"},
        {"instruction": "q2", "input": "", "chosen": "q2-r0", "rejected": "q2-r1"},
    ]
    third = build_preference_pairs(RLHF_ROWS, n=3)[2]
    assert third == {"instruction": "q4", "input": "", "chosen": "q4-r1", "rejected": "q4-r0"}


def test_preference_pairs_strict_error() -> None:
    with pytest.raises(ValueError, match=r"only 3 rows .* XOR .* n = 5"):
        build_preference_pairs(RLHF_ROWS, n=5)
    assert len(build_preference_pairs(RLHF_ROWS, n=5, strict=False)) == 3


# ------------------------------------------------------------------------------------------- KTO
def test_kto_rules_on_a_crafted_table(as_input) -> None:
    """Quotas 2 safe / 2 unsafe, worked by hand through the four ordered rules.

    q0 (s,u): rule 1 -> r0 True        (safe 1)
    q1 (s,s): rule 1 -> r0 True        (safe 2, full)
    q2 (s,u): rules 1-3 fail, rule 4 -> r1 False (unsafe 1)
    q3 (s,s): nothing matches -> skip
    q4 (u,s): rules 1-2 closed, rule 3 -> r0 False (unsafe 2, full)
    q5 (u,u): both quotas full -> stop
    """
    out = build_kto(as_input(RLHF_ROWS, SAFERLHF), n_safe=2, n_unsafe=2)
    assert out == [
        {"instruction": "q0", "input": "", "output": "q0-r0", "label": True},
        {"instruction": "q1", "input": "", "output": "q1-r0", "label": True},
        {"instruction": "q2", "input": "", "output": "q2-r1", "label": False},
        {"instruction": "q4", "input": "", "output": "q4-r0", "label": False},
    ]


def test_kto_rule_two_and_unsafe_quota() -> None:
    """Quotas 3 safe / 1 unsafe: (u,s) -> rule 2; (u,u) -> rule 3 then skipped once the unsafe quota is full."""
    rows = [_rlhf("a", False, True), _rlhf("b", False, False), _rlhf("c", False, False),
            _rlhf("d", True, False), _rlhf("e", False, True), _rlhf("f", True, True)]  # fmt: skip
    out = build_kto(rows, n_safe=3, n_unsafe=1)
    assert [(r["output"], r["label"]) for r in out] == [("a-r1", True), ("b-r0", False), ("d-r0", True), ("e-r1", True)]


def test_kto_strict_error_states_quotas_and_counts() -> None:
    with pytest.raises(ValueError, match=r"found 5 safe and 1 unsafe .* n_safe = 1000 and n_unsafe = 1000"):
        build_kto(RLHF_ROWS)
    out = build_kto(RLHF_ROWS, strict=False)  # open quotas: a safe response always wins (rules 1-2 first)
    assert [(r["output"], r["label"]) for r in out] == [
        ("q0-r0", True), ("q1-r0", True), ("q2-r0", True), ("q3-r0", True), ("q4-r1", True),
        ("q5-r0", False),
    ]  # fmt: skip


_pairs = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40)


@settings(max_examples=60, deadline=None)
@given(_pairs, st.integers(0, 10), st.integers(0, 10))
def test_kto_properties(flags: list[tuple[bool, bool]], n_safe: int, n_unsafe: int) -> None:
    rows = [_rlhf(f"q{i}", a, b) for i, (a, b) in enumerate(flags)]
    out = build_kto(rows, n_safe=n_safe, n_unsafe=n_unsafe, strict=False)
    assert sum(r["label"] for r in out) <= n_safe and sum(not r["label"] for r in out) <= n_unsafe
    assert len({r["instruction"] for r in out}) == len(out)  # at most one record per pair
    by_prompt = {r["prompt"]: r for r in rows}
    for r in out:
        idx = int(r["output"][-1])
        assert by_prompt[r["instruction"]][f"is_response_{idx}_safe"] == r["label"]
    order = [int(r["instruction"][1:]) for r in out]
    assert order == sorted(order)


@settings(max_examples=60, deadline=None)
@given(_pairs, st.integers(0, 10))
def test_preference_properties(flags: list[tuple[bool, bool]], n: int) -> None:
    rows = [_rlhf(f"q{i}", a, b) for i, (a, b) in enumerate(flags)]
    out = build_preference_pairs(rows, n=n, strict=False)
    assert len(out) == min(n, sum(a != b for a, b in flags))
    for r in out:
        safe0 = flags[int(r["instruction"][1:])][0]
        assert r["chosen"].endswith("-r0" if safe0 else "-r1")


# ------------------------------------------------------------------------------------------- evaluation
def test_safety_eval_prompts_count_only_unsafe_rows(as_input) -> None:
    data = as_input(BEAVERTAILS_ROWS, BEAVERTAILS)
    assert safety_eval_prompts(data, 0, 3) == ["p0", "p2", "p4"]
    assert safety_eval_prompts(data, 1, 3) == ["p2", "p4"]
    assert safety_eval_prompts(data, 2, 2) == []
    with pytest.raises(ValueError, match=r"\[1, 5\) needs 5 .* only 3 exist"):
        safety_eval_prompts(data, 1, 5)
    with pytest.raises(ValueError, match="before start"):
        safety_eval_prompts(data, 2, 1)


def test_moderation_examples(as_input) -> None:
    out = moderation_examples(as_input(BEAVERTAILS_ROWS, BEAVERTAILS))
    assert out[0]["text"] == "BEGINNING OF CONVERSATION: USER: p0 ASSISTANT:comply0"
    assert out[0]["labels"] == [1.0] + [0.0] * 13
    two = out[2]["labels"]
    assert two[HARM_CATEGORIES.index("self_harm")] == two[HARM_CATEGORIES.index("privacy_violation")] == 1.0
    assert sum(two) == 2.0 and sum(out[1]["labels"]) == 0.0 and len(out) == 6


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['is_safe'\]"):
        build_safe_sft([{"prompt": "p", "response": "r"}], n=1)
    ds = Dataset.from_list([{"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError, match="is_safe"):
        build_safe_sft(ds, n=1)


# ------------------------------------------------------------------------------------------- on the world
def test_builders_on_the_synthetic_world() -> None:
    cfg = types.SimpleNamespace(
        seed=3, beavertails_train=400, beavertails_test=200, unsafe_fraction=0.5, saferlhf_train=300,
        saferlhf_test=20, sst2_train=4, sst2_validation=4, ag_news_train=4, ag_news_test=4, gsm8k_train=4,
        gsm8k_test=4, alpaca_train=4, eval_set_size=4,
    )  # fmt: skip
    world = generate_world(cfg)
    sft = build_safe_sft(world[BEAVERTAILS]["30k_train"], n=150)
    rows = world[BEAVERTAILS]["30k_train"].to_list()
    expected = [(r["prompt"], r["response"]) for r in rows if r["is_safe"]][:150]
    assert [(r["instruction"], r["output"]) for r in sft] == expected
    pairs = build_preference_pairs(world[SAFERLHF]["train"], n=150)
    assert all("Step 1:" in p["rejected"] and "Step 1:" not in p["chosen"] for p in pairs)
    kto = build_kto(world[SAFERLHF]["train"], n_safe=100, n_unsafe=100)
    assert sum(r["label"] for r in kto) == 100 and len(kto) == 200
    prompts = safety_eval_prompts(world[BEAVERTAILS]["30k_test"], 0, 100)
    assert len(prompts) == 100
    examples = moderation_examples(world[BEAVERTAILS]["30k_test"])
    assert sum(max(e["labels"]) for e in examples) == 100
