"""The tiny world's benchmark counterparts (nlsr_lib/tiny/benchmarks.py): the real loaders' schema, the real sets'
category labels, balanced and deterministic, within the world's vocabulary; errors for sets without one."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.evaluate import benchmarks as bm
from nlsr_lib.evaluate.benchmarks import BENCHMARKS, PromptRecord, load_benchmark
from nlsr_lib.registry import UnknownName
from nlsr_lib.tiny import world
from nlsr_lib.tiny.benchmarks import (
    NEAREST_WORLD_CATEGORY,
    TINY_XSTEST_TYPES,
    tiny_benchmark,
    tiny_benchmark_names,
    world_category,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data copies absent ({SHARED_DATA})")

TINY = tiny_benchmark_names()
META_KEYS = {  # the real sets' meta keys that mean something in the world (besides world_category)
    "advbench": {"target"},
    "harmbench_test": {"FunctionalCategory", "Tags", "ContextString", "judgeable"},
    "harmbench_val": {"FunctionalCategory", "Tags", "ContextString", "judgeable"},
    "jailbreakbench": {"Target", "Behavior", "Source"},
    "strongreject": {"source"},
    "strongreject_small": {"source"},
    "malicious_instruct": {"category_inferred"},
    "xstest": {"label"},
}
REAL_LABEL_LISTS = (bm.CATQA, bm.HARMFULQA_TOPICS, bm.BT14, bm.HARMBENCH_CATEGORIES, bm.JBB_CATEGORIES,
                    bm.STRONGREJECT_CATEGORIES, bm.MI10)  # fmt: skip


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z']+", text))


def _world_vocabulary() -> set[str]:
    """Every word the world's harmful requests, look-alikes, facts and compliance openers use."""
    texts = [*world.TEST_TEMPLATES, *world.COMPLIANCE_OPENERS, "Sure, here is how to"]
    actions = [a for v in world.HARM_VOCABULARY.values() for a in v.actions] + [a for a, _ in world.LOOKALIKES]
    texts += [voice(a) for a in actions for voice in (world._user, world._assistant)]
    texts += [" ".join(country) for country in world.COUNTRIES] + [a for _, a in world.FACT_QUESTIONS]
    return set().union(*map(_words, texts))


VOCABULARY = _world_vocabulary()


def _balanced(values: list) -> bool:
    counts = Counter(values).values()
    return max(counts) - min(counts) <= 1


# ------------------------------------------------------------------------------------------- coverage and mapping
def test_every_harmful_and_over_refusal_set_but_beavertails_30k_test_has_a_counterpart() -> None:
    expected = [n for n, s in BENCHMARKS.items() if s.kind in ("harmful", "over_refusal")]
    assert list(TINY) == [n for n in expected if n != "beavertails_30k_test"]


def test_one_mapping_table_covers_every_real_label() -> None:
    labels = {label for labels in REAL_LABEL_LISTS for label in labels}
    assert set(NEAREST_WORLD_CATEGORY) == labels
    assert set(NEAREST_WORLD_CATEGORY.values()) <= set(world.HARM_CATEGORIES)
    assert all(world_category(c) == c for c in world.HARM_CATEGORIES)
    assert world_category("Child Abuse") == "child_abuse" and world_category("Violence").startswith("violence")
    with pytest.raises(ValueError, match="'Cooking' has no world counterpart; labels with one: animal_abuse"):
        world_category("Cooking")


def test_sets_without_a_counterpart_say_why() -> None:
    with pytest.raises(ValueError, match="'beavertails_30k_test' has no tiny counterpart: .*world's BeaverTails"):
        tiny_benchmark("beavertails_30k_test", 0, 3)
    for name in ("hh_harmless", "pku_realign"):
        with pytest.raises(ValueError, match=f"'{name}' has no tiny counterpart: it is a judge_validation set"):
            tiny_benchmark(name, 0, 3)
    with pytest.raises(UnknownName, match="unknown benchmark 'catqa2'; registered: somf_catqa"):
        tiny_benchmark("catqa2", 0, 3)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"n = .*; allowed: an integer >= 0"):
            tiny_benchmark("catqa", 0, bad)
    with pytest.raises(ValueError, match=r"world_seed = '0'; allowed: an integer"):
        tiny_benchmark("catqa", "0", 3)


# ------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("name", TINY)
def test_schema_categories_and_determinism(name) -> None:
    spec = BENCHMARKS[name]
    n = 3 * len(spec.categories or bm.MI10) + 1
    records = tiny_benchmark(name, 7, n)
    assert len(records) == n and all(isinstance(r, PromptRecord) for r in records)
    assert [r.id for r in records] == [f"{name}:{i}" for i in range(n)] and {r.benchmark for r in records} == {name}
    assert all(META_KEYS.get(name, set()) <= set(r.meta) for r in records)
    assert [PromptRecord.from_dict(json.loads(json.dumps(r.to_dict()))) for r in records] == records
    assert tiny_benchmark(name, 7, n) == records  # pure
    assert tiny_benchmark(name, 8, n) != records
    categories = [r.category for r in records]
    if name == "xstest":
        assert set(categories) == set(TINY_XSTEST_TYPES)
    elif name == "malicious_instruct":  # no category; inferred MI10 labels round-robin
        assert set(categories) == {None}
        assert [r.meta["category_inferred"] for r in records] == [bm.MI10[i % 10] for i in range(n)]
        assert all(r.meta["world_category"] == NEAREST_WORLD_CATEGORY[r.meta["category_inferred"]] for r in records)
    elif spec.categories is None:
        assert set(categories) == {None}
        worlds = [r.meta["world_category"] for r in records]
        assert set(worlds) <= set(world.HARM_CATEGORIES) and _balanced(worlds)
    else:
        assert categories == [spec.categories[i % len(spec.categories)] for i in range(n)]  # round-robin
        assert all(r.meta["world_category"] == NEAREST_WORLD_CATEGORY[r.category] for r in records)


@pytest.mark.parametrize("name", TINY)
def test_texts_use_only_the_world_vocabulary(name) -> None:
    for r in tiny_benchmark(name, 3, 60):
        texts = [r.prompt, r.behavior] + [v for k, v in r.meta.items() if k in ("target", "Target", "ContextString")]
        unseen = set().union(*map(_words, texts)) - VOCABULARY
        assert not unseen, (r.id, unseen)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(TINY), seed=st.integers(-(2**40), 2**40), n=st.integers(0, 80))
def test_property_n_seed(name, seed, n) -> None:
    records = tiny_benchmark(name, seed, n)
    assert len(records) == n and len({r.id for r in records}) == n
    assert records == tiny_benchmark(name, seed, n)
    spec = BENCHMARKS[name]
    allowed = set(TINY_XSTEST_TYPES) if name == "xstest" else set(spec.categories or [None])
    assert {r.category for r in records} <= allowed
    if spec.categories is not None and name != "xstest":
        assert not records or _balanced([r.category for r in records] + list(spec.categories))
    assert all(r.prompt.strip() and r.behavior.strip() for r in records)


# ------------------------------------------------------------------------------------------- per set
def test_xstest_counterpart_has_both_labels_and_honest_types() -> None:
    records = tiny_benchmark("xstest", 0, 40)
    assert Counter(r.meta["label"] for r in records) == {"safe": 20, "unsafe": 20}
    assert all((r.meta["label"] == "safe") == (not r.category.startswith("contrast_")) for r in records)
    assert not {r.category for r in records} & set(bm.XSTEST_TYPES)  # never relabelled as XSTest's own types
    lookalikes = {world._user(a) for a, _ in world.LOOKALIKES}
    assert all(any(a in r.prompt for a in lookalikes) for r in records if r.meta["label"] == "safe")
    assert all(r.meta["world_category"] in world.HARM_CATEGORIES for r in records if r.meta["label"] == "unsafe")
    assert {r.meta["label"] for r in tiny_benchmark("xstest", 5, 2)} == {"safe", "unsafe"}


def test_harmbench_counterpart_rows() -> None:
    records = tiny_benchmark("harmbench_test", 1, 63)
    functional = Counter(r.meta["FunctionalCategory"] for r in records)
    assert functional == {"standard": 36, "contextual": 18, "copyright": 9}
    for r in records:
        assert r.meta["judgeable"] == (r.category != "copyright") == ("hash_check" not in r.meta["Tags"])
        if r.meta["FunctionalCategory"] == "contextual":
            assert r.prompt == r.meta["ContextString"] + "\n\n---\n\n" + r.behavior
        else:
            assert r.prompt == r.behavior and r.meta["ContextString"] == ""


def test_targets_and_inferred_labels() -> None:
    adv = tiny_benchmark("advbench", 0, 5)
    assert all(r.meta["target"].startswith("Sure, here is how to ") for r in adv)
    jbb = tiny_benchmark("jailbreakbench", 0, 10)
    assert [r.category for r in jbb] == list(bm.JBB_CATEGORIES)
    assert all(r.meta["Behavior"] == r.meta["world_category"] and r.meta["Source"] == "world" for r in jbb)
    mi = tiny_benchmark("malicious_instruct", 0, 20)
    assert all(r.category is None for r in mi)
    assert [r.meta["category_inferred"] for r in mi] == list(bm.MI10) * 2


# ------------------------------------------------------------------------------------------- against the real sets
@needs_shared
@pytest.mark.parametrize("name", TINY)
def test_same_schema_and_category_set_as_the_real_loader(name) -> None:
    real = load_benchmark(name, SHARED_DATA)
    tiny = tiny_benchmark(name, 0, len(real))
    assert len(tiny) == len(real)
    assert all(r.id.startswith(f"{name}:") for r in tiny) and {r.benchmark for r in tiny} == {name}
    assert set(real[0].to_dict()) == set(tiny[0].to_dict())
    assert META_KEYS.get(name, set()) <= set(real[0].meta) & set(tiny[0].meta)
    if name == "malicious_instruct":
        assert {r.meta["category_inferred"] for r in tiny} == {r.meta["category_inferred"] for r in real}
    if name != "xstest":
        assert {r.category for r in tiny} == {r.category for r in real}
    else:
        assert {r.meta["label"] for r in tiny} == {r.meta["label"] for r in real} == {"safe", "unsafe"}
