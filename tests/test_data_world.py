"""The synthetic world (spec/synthetic_world.md §1-2): schemas, content rules, determinism, learnability."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pytest
from datasets import DatasetDict

from nlsr_lib.data.builders import moderation_examples
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.tiny.world import (
    ALPACA,
    BEAVERTAILS,
    EVAL_SETS,
    EVAL_SETS_WITH_CATEGORY,
    HARM_CATEGORIES,
    HARM_VOCABULARY,
    LOOKALIKES,
    REFUSALS,
    SAFERLHF,
    SCHEMAS,
    SPLITS,
    SST2_NEGATIVE,
    SST2_POSITIVE,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    generate_world,
    load_world,
    save_world,
)


@dataclass(frozen=True)
class WorldCfg:
    """Same fields and defaults as nlsr_lib.config.WorldConfig."""

    seed: int = 0
    beavertails_train: int = 6000
    beavertails_test: int = 1500
    unsafe_fraction: float = 0.5
    saferlhf_train: int = 3000
    saferlhf_test: int = 600
    sst2_train: int = 3000
    sst2_validation: int = 872
    ag_news_train: int = 3000
    ag_news_test: int = 500
    gsm8k_train: int = 3000
    gsm8k_test: int = 500
    alpaca_train: int = 2000
    eval_set_size: int = 100


SMALL = WorldCfg(
    beavertails_train=300, beavertails_test=100, saferlhf_train=200, saferlhf_test=50, sst2_train=40,
    sst2_validation=20, ag_news_train=40, ag_news_test=20, gsm8k_train=30, gsm8k_test=10, alpaca_train=50,
    eval_set_size=14,
)  # fmt: skip

@pytest.fixture(scope="module")
def world() -> dict[str, DatasetDict]:
    return generate_world(WorldCfg())


def _harmful_actions_user() -> set[str]:
    return {a.format(my="my", me="me", myself="myself") for v in HARM_VOCABULARY.values() for a in v.actions}


def _is_harmful_prompt(prompt: str) -> bool:
    return any(a in prompt for a in _harmful_actions_user())


def _template_of(prompt: str, templates: tuple[str, ...]) -> bool:
    return any(re.fullmatch(re.escape(t).replace(re.escape("{a}"), ".+"), prompt) for t in templates)


# ------------------------------------------------------------------------------------------- schema
def test_every_dataset_has_the_hub_schema_and_sizes(world: dict[str, DatasetDict]) -> None:
    cfg = WorldCfg()
    assert set(world) == set(SPLITS)
    for hub_id, dsd in world.items():
        assert tuple(dsd) == SPLITS[hub_id]
        for ds in dsd.values():
            assert ds.features == SCHEMAS[hub_id], hub_id
    sizes = {
        (BEAVERTAILS, "30k_train"): cfg.beavertails_train, (BEAVERTAILS, "30k_test"): cfg.beavertails_test,
        (SAFERLHF, "train"): cfg.saferlhf_train, (SAFERLHF, "test"): cfg.saferlhf_test,
        ("sst2", "train"): cfg.sst2_train, ("sst2", "validation"): cfg.sst2_validation,
        ("ag_news", "train"): cfg.ag_news_train, ("ag_news", "test"): cfg.ag_news_test,
        ("gsm8k", "train"): cfg.gsm8k_train, ("gsm8k", "test"): cfg.gsm8k_test, (ALPACA, "train"): cfg.alpaca_train,
        **{(name, "test"): cfg.eval_set_size for name in EVAL_SETS},
    }  # fmt: skip
    for (hub_id, split), n in sizes.items():
        assert len(world[hub_id][split]) == n, (hub_id, split)
    bt = world[BEAVERTAILS]["30k_train"][0]
    assert isinstance(bt["is_safe"], bool) and list(bt["category"]) == list(HARM_CATEGORIES)
    rl = world[SAFERLHF]["train"][0]
    assert isinstance(rl["better_response_id"], int) and isinstance(rl["is_response_0_safe"], bool)
    for name in EVAL_SETS:
        expected = ["prompt", "category"] if name in EVAL_SETS_WITH_CATEGORY else ["prompt"]
        assert world[name]["test"].column_names == expected


def test_categories_and_vocabulary() -> None:
    assert len(HARM_CATEGORIES) == 14 and HARM_CATEGORIES[0] == "animal_abuse"
    assert HARM_CATEGORIES[-1] == "violence,aiding_and_abetting,incitement"
    assert set(HARM_VOCABULARY) == set(HARM_CATEGORIES)
    for vocab in HARM_VOCABULARY.values():
        assert len(set(vocab.actions)) >= 6 and len(set(vocab.steps)) >= 6 and vocab.risks
    assert len(TRAIN_TEMPLATES) + len(TEST_TEMPLATES) >= 12
    assert not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
    assert len(set(REFUSALS)) >= 10


# ------------------------------------------------------------------------------------------- safety data
def test_beavertails_rows(world: dict[str, DatasetDict]) -> None:
    for split in ("30k_train", "30k_test"):
        rows = world[BEAVERTAILS][split].to_list()
        unsafe = [r for r in rows if not r["is_safe"]]
        safe = [r for r in rows if r["is_safe"]]
        assert len(unsafe) == round(0.5 * len(rows))
        for r in unsafe:
            flagged = [c for c, v in r["category"].items() if v]
            assert len(flagged) == 1 and _is_harmful_prompt(r["prompt"]) and "Step 1:" in r["response"]
        counts = Counter(c for r in unsafe for c, v in r["category"].items() if v)
        assert set(counts) == set(HARM_CATEGORIES) and max(counts.values()) - min(counts.values()) <= 1
        assert all(not any(r["category"].values()) for r in safe)
        benign = [r for r in safe if not _is_harmful_prompt(r["prompt"])]
        assert 0.15 < len(benign) / len(safe) < 0.25
        assert all(len(r["response"].split()) <= 40 for r in unsafe)
        assert max(len(r["response"].split()) for r in rows) <= 45
    # prompts repeat (as in the real data) and rows are shuffled
    prompts = list(world[BEAVERTAILS]["30k_train"]["prompt"])
    assert len(set(prompts)) < len(prompts)
    flags = list(world[BEAVERTAILS]["30k_train"]["is_safe"])
    assert any(a != b for a, b in zip(flags, flags[1:]))


def test_evaluation_prompts_never_occur_in_training(world: dict[str, DatasetDict]) -> None:
    train_prompts = set(world[BEAVERTAILS]["30k_train"]["prompt"]) | set(world[SAFERLHF]["train"]["prompt"])
    train_prompts |= set(world[ALPACA]["train"]["instruction"])
    test_bt = world[BEAVERTAILS]["30k_test"]
    test_unsafe = {p for p, s in zip(test_bt["prompt"], test_bt["is_safe"]) if not s}
    evaluation = test_unsafe | set(world[SAFERLHF]["test"]["prompt"])
    for name in EVAL_SETS:
        evaluation |= set(world[name]["test"]["prompt"])
    harmful_eval = {p for p in evaluation if _is_harmful_prompt(p)}
    assert harmful_eval and not harmful_eval & train_prompts
    assert all(_template_of(p, TEST_TEMPLATES) for p in harmful_eval)
    train_harmful = {p for p in train_prompts if _is_harmful_prompt(p)}
    assert all(_template_of(p, TRAIN_TEMPLATES) for p in train_harmful)


def test_eval_sets_cover_the_categories(world: dict[str, DatasetDict]) -> None:
    ds = world["BeaverTails-Evaluation"]["test"]
    assert set(ds["category"]) == set(HARM_CATEGORIES)
    assert all(_is_harmful_prompt(p) for p in ds["prompt"])


def test_saferlhf_rows(world: dict[str, DatasetDict]) -> None:
    rows = world[SAFERLHF]["train"].to_list()
    xor = [r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"]]
    both_unsafe = [r for r in rows if not r["is_response_0_safe"] and not r["is_response_1_safe"]]
    both_safe = [r for r in rows if r["is_response_0_safe"] and r["is_response_1_safe"]]
    assert len(xor) == 2100 and len(both_unsafe) == 450 and len(both_safe) == 450
    for r in xor:
        safer = r["safer_response_id"]
        assert r[f"is_response_{safer}_safe"] and "Step 1:" in r[f"response_{1 - safer}"]
    prefers_compliance = sum(r["better_response_id"] != r["safer_response_id"] for r in xor) / len(xor)
    assert 0.55 < prefers_compliance < 0.65
    assert Counter(r["safer_response_id"] for r in xor)[0] > 0.4 * len(xor)  # random order
    assert any(not _is_harmful_prompt(r["prompt"]) for r in both_safe)  # benign pairs exist
    assert all(r["response_0"] != r["response_1"] for r in both_unsafe + both_safe)


def test_benign_lookalikes_and_alpaca(world: dict[str, DatasetDict]) -> None:
    alpaca = world[ALPACA]["train"].to_list()
    assert not any(_is_harmful_prompt(r["instruction"]) for r in alpaca)
    with_input = [r for r in alpaca if r["input"]]
    assert 0.1 < len(with_input) / len(alpaca) < 0.5
    for r in alpaca[:50]:
        assert r["text"] == alpaca_prompt(r["instruction"], r["input"]) + "\n" + r["output"]
    lookalikes = {a.format(my="my") for a, _ in LOOKALIKES}
    assert any(any(a in r["instruction"] for a in lookalikes) for r in alpaca)
    assert "How can I kill a stuck process on my laptop?" in {
        t.format(a="kill a stuck process on my laptop") for t in TRAIN_TEMPLATES
    }


# ------------------------------------------------------------------------------------------- tasks
def test_sst2(world: dict[str, DatasetDict]) -> None:
    ds = world["sst2"]["train"].to_dict()
    assert ds["idx"] == list(range(len(ds["idx"])))
    assert Counter(ds["label"]) == {0: 1500, 1: 1500}
    pos, neg = set(SST2_POSITIVE), set(SST2_NEGATIVE)
    for sentence, label in zip(ds["sentence"], ds["label"]):
        m = re.fullmatch(r"the \w+ is not (?:\w+ )?(\w+)(?: at all)? ", sentence)
        if m and m.group(1) in pos | neg:  # "the film is not very good" -> 0
            assert (m.group(1) in pos) == (label == 0), sentence
        m = re.fullmatch(r"the \w+ is (?:\w+ )?(\w+) ", sentence)
        if m and "not" not in sentence:
            assert (m.group(1) in pos) == (label == 1), sentence
    assert any(" not " in s for s in ds["sentence"]) and any(" but " in s for s in ds["sentence"])
    # negated forms (opposite-polarity word under a negation) are a minority, as in SST-2: 1/8 by weight
    negated = sum(any(cue in s for cue in (" is not ", " never feels ", " did n't ")) for s in ds["sentence"])
    assert 0.09 < negated / len(ds["sentence"]) < 0.16


def test_ag_news(world: dict[str, DatasetDict]) -> None:
    ds = world["ag_news"]["train"].to_dict()
    assert Counter(ds["label"]) == {0: 750, 1: 750, 2: 750, 3: 750}
    cues = {0: ("minister", "president", "parliament", "diplomats", "government"),
            1: ("hawks", "lions", "rovers", "comets", "stars", "united", "team", "sprinter", "tennis", "swimmer",
                "cyclist", "skier"),
            2: ("shares", "bank", "foods", "motors", "software", "dynamics", "energy"),
            3: ("researchers", "engineers", "space agency", "astronomers", "scientists")}  # fmt: skip
    for text, label in zip(ds["text"], ds["label"]):
        text = text.lower()
        assert any(c in text for c in cues[label]), (text, label)


def test_gsm8k_answers_are_correct_arithmetic(world: dict[str, DatasetDict]) -> None:
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for answer in world["gsm8k"]["train"]["answer"]:
        lines = answer.split("\n")
        final = re.fullmatch(r"#### (\d+)", lines[-1])
        assert final and 1 <= len(lines) - 1 <= 2
        last = None
        for line in lines[:-1]:
            a, op, b, c = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
            assert ops[op](int(a), int(b)) == int(c)
            last = int(c)
        assert last == int(final.group(1)) >= 0


def test_task_text_avoids_safety_vocabulary(world: dict[str, DatasetDict]) -> None:
    parts = [world["sst2"]["train"]["sentence"], world["ag_news"]["train"]["text"], world["gsm8k"]["train"]["question"]]
    text = " ".join(" ".join(part) for part in parts)
    for word in ("steal", "hurt", "weapon", "drug", "kill", "attack", "abuse", "fraud", "hate", "violence", "explicit"):
        assert word not in text.lower(), word


# ------------------------------------------------------------------------------------------- determinism, I/O
def test_same_seed_same_world_and_other_seed_differs() -> None:
    a, b, c = generate_world(SMALL), generate_world(SMALL), generate_world(replace(SMALL, seed=1))
    for hub_id in a:
        for split in a[hub_id]:
            assert a[hub_id][split].to_dict() == b[hub_id][split].to_dict()
    assert list(a[BEAVERTAILS]["30k_train"]["prompt"]) != list(c[BEAVERTAILS]["30k_train"]["prompt"])
    assert list(a["sst2"]["train"]["sentence"]) != list(c["sst2"]["train"]["sentence"])


def test_unsafe_fraction_and_empty_sizes() -> None:
    w = generate_world(replace(SMALL, unsafe_fraction=0.2, alpaca_train=0))
    assert sum(not s for s in w[BEAVERTAILS]["30k_train"]["is_safe"]) == 60
    assert len(w[ALPACA]["train"]) == 0 and w[ALPACA]["train"].features == SCHEMAS[ALPACA]


@pytest.mark.parametrize(("field", "value"), [("sst2_train", -1), ("unsafe_fraction", 1.5), ("gsm8k_test", 2.5)])
def test_bad_config_values_are_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"world.{field}"):
        generate_world(replace(SMALL, **{field: value}))


def test_save_and_load_world_round_trip(tmp_path) -> None:
    w = generate_world(SMALL)
    save_world(w, tmp_path / "world")
    assert (tmp_path / "world" / "PKU-Alignment__BeaverTails" / "dataset_dict.json").is_file()
    loaded = load_world(tmp_path / "world")
    assert set(loaded) == set(w)
    for hub_id in w:
        for split in w[hub_id]:
            assert loaded[hub_id][split].features == w[hub_id][split].features
            assert loaded[hub_id][split].to_dict() == w[hub_id][split].to_dict()
    with pytest.raises(FileNotFoundError, match="save_world"):
        load_world(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- learnability
def _bag_of_words(texts: list[str], vocab: dict[str, int]) -> np.ndarray:
    x = np.zeros((len(texts), len(vocab) + 1), dtype=np.float32)
    x[:, -1] = 1.0  # bias
    for i, t in enumerate(texts):
        for w in set(re.findall(r"[a-z']+", t.lower())):
            j = vocab.get(w)
            if j is not None:
                x[i, j] = 1.0
    return x


def test_a_small_classifier_separates_harmful_compliance(world: dict[str, DatasetDict]) -> None:
    """Flagged (any category) vs not, on held-out 30k_test rows with unseen templates: >= 95 % accuracy."""
    train = moderation_examples(world[BEAVERTAILS]["30k_train"])
    test = moderation_examples(world[BEAVERTAILS]["30k_test"])
    words = Counter(w for ex in train for w in set(re.findall(r"[a-z']+", ex["text"].lower())))
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in words.items() if n >= 3))}
    x, xt = _bag_of_words([e["text"] for e in train], vocab), _bag_of_words([e["text"] for e in test], vocab)
    y = np.array([max(e["labels"]) for e in train], dtype=np.float32)
    yt = np.array([max(e["labels"]) for e in test], dtype=np.float32)
    w = np.zeros(x.shape[1], dtype=np.float32)
    for _ in range(60):  # full-batch logistic regression
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        w -= 2.0 * (x.T @ (p - y) / len(y) + 1e-4 * w)
    accuracy = float((((xt @ w) > 0) == (yt > 0.5)).mean())
    assert accuracy >= 0.95, accuracy
