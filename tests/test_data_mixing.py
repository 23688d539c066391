"""Poisoned mixtures (spec nlsr.md §2.4): counts, nesting across ratios and tasks, seeded shuffles, variants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from nlsr_lib.config import WorldConfig
from nlsr_lib.data.mixing import POISON_RATIOS, count, poisoned_mixture
from nlsr_lib.tiny.world import generate_world

WORLD = generate_world(WorldConfig(beavertails_train=1200, sst2_train=400, ag_news_train=400, gsm8k_train=400))
BEAVER = WORLD["PKU-Alignment/BeaverTails"]["30k_train"].to_list()
TASK_ROWS = {t: WORLD[t]["train"].to_list() for t in ("sst2", "ag_news", "gsm8k")}


def _mix(task="sst2", n=200, p=0.1, **kw):
    return poisoned_mixture(TASK_ROWS[task], BEAVER, task, n=n, p=p, **kw)


def _harmful(records):
    return {r["instruction"] + r["output"] for r in records if r["flag"] == "unsafe"}


@pytest.mark.parametrize("p", POISON_RATIOS)
def test_counts_and_flags(p):
    records = _mix(p=p)
    flags = [r["flag"] for r in records]
    assert len(records) == 200 and flags.count("unsafe") == count(200, p) and flags.count("finetune") == 200 - count(200, p)
    assert all(r["input"] == "" and r["instruction"].startswith("Below is an instruction") for r in records)


def test_floor_is_robust_to_floating_point():
    assert count(100, 0.29) == 29 and count(1000, 0.3) == 300 and count(1000, 0.01) == 10 and count(7, 0.5) == 3


def test_harmful_subsets_nested_across_ratios_and_equal_across_tasks():
    by_ratio = [_harmful(_mix(p=p)) for p in POISON_RATIOS]
    assert all(a <= b for a, b in zip(by_ratio, by_ratio[1:]))
    assert _harmful(_mix("sst2", p=0.2)) == _harmful(_mix("ag_news", p=0.2)) == _harmful(_mix("gsm8k", p=0.2))


def test_benign_rows_are_the_first_task_rows_in_the_task_format():
    records = [r for r in _mix(p=0.5, n=10) if r["flag"] == "finetune"]
    sentences = {row["sentence"] for row in TASK_ROWS["sst2"][:5]}
    assert {r["instruction"].split("### Input:\n")[1].split("\n\n### Response:")[0] for r in records} == sentences
    assert {r["output"] for r in records} <= {"positive", "negative"}


def test_shuffle_is_seeded():
    assert _mix(seed=1) == _mix(seed=1) and _mix(seed=1) != _mix(seed=2)
    assert sorted(map(str, _mix(seed=1))) == sorted(map(str, _mix(seed=2)))


def test_clean_variant_uses_safe_rows():
    clean = _mix(p=0.1, extra="safe")
    assert [r["flag"] for r in clean].count("safe") == 20 and not _harmful(clean)


def test_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="sst2 train rows"):
        poisoned_mixture(TASK_ROWS["sst2"][:10], BEAVER, "sst2", n=100, p=0.0)
    with pytest.raises(ValueError, match="outside"):
        _mix(p=1.5)
    with pytest.raises(ValueError, match="unknown|allowed"):
        poisoned_mixture(TASK_ROWS["sst2"], BEAVER, "imdb", n=10, p=0.1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), p=st.sampled_from(POISON_RATIOS), seed=st.integers(0, 10))
def test_property_exact_sizes(n, p, seed):
    records = _mix(n=n, p=p, seed=seed)
    assert len(records) == n and sum(r["flag"] == "unsafe" for r in records) == count(n, p)
