"""Cohen's κ and its companions (spec/evaluation.md §2.6): the hand example first, then the undefined case, the
pairwise table and the properties of κ."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.evaluate.agreement import cohen_kappa, kappa_from_confusion, pairwise_kappas


def hand_example() -> tuple[list[str], list[str]]:
    """(judge, human): 40 both harmful, 5 judge-only, 10 human-only, 45 both safe."""
    pairs = [("harmful", "harmful")] * 40 + [("harmful", "safe")] * 5 + [("safe", "harmful")] * 10 + \
        [("safe", "safe")] * 45
    return [j for j, _ in pairs], [h for _, h in pairs]


def test_hand_example():
    judge, human = hand_example()
    r = cohen_kappa(judge, human)
    assert r.kappa == pytest.approx(0.70) and r.agreement == pytest.approx(0.85) and r.expected == pytest.approx(0.50)
    assert r.bias == pytest.approx(-5.0) and r.positive == "harmful" and r.n == 100
    assert r.labels == ("harmful", "safe") and r.confusion == ((40, 5), (10, 45))
    assert r.per_class["harmful"] == {"precision": pytest.approx(40 / 45), "recall": pytest.approx(40 / 50),
                                      "support": 50}
    assert r.per_class["safe"] == {"precision": pytest.approx(45 / 55), "recall": pytest.approx(45 / 50), "support": 50}
    assert r.ci_lo < 0.70 < r.ci_hi and 0.5 < r.ci_lo and r.ci_hi < 0.85 and (r.n_boot, r.seed) == (1000, 0)


def test_bootstrap_is_seeded():
    judge, human = hand_example()
    a, b = cohen_kappa(judge, human, seed=7), cohen_kappa(judge, human, seed=7)
    assert (a.ci_lo, a.ci_hi) == (b.ci_lo, b.ci_hi)
    assert (a.ci_lo, a.ci_hi) != (cohen_kappa(judge, human, seed=8).ci_lo, cohen_kappa(judge, human, seed=8).ci_hi)
    assert math.isnan(cohen_kappa(judge, human, n_boot=0).ci_lo)


def test_binary_integers_and_bools():
    judge, human = hand_example()
    ints = cohen_kappa([int(x == "harmful") for x in judge], [int(x == "harmful") for x in human])
    bools = cohen_kappa([x == "harmful" for x in judge], [x == "harmful" for x in human])
    assert ints.kappa == bools.kappa == pytest.approx(0.70) and ints.bias == bools.bias == pytest.approx(-5.0)
    assert ints.labels == (0, 1) and ints.confusion == ((45, 10), (5, 40))


def test_all_harmful_gives_nan_kappa_with_full_agreement():
    r = cohen_kappa(["harmful"] * 20, ["harmful"] * 20)
    assert math.isnan(r.kappa) and r.agreement == 1.0 and r.expected == 1.0 and r.bias == 0.0
    assert math.isnan(r.ci_lo) and math.isnan(r.ci_hi)


def test_multi_class_kappa_by_hand():
    # 3 classes, 6 items: p_o = 5/6, p_a = (2,2,2)/6, p_b = (3,2,1)/6 → p_e = (6+4+2)/36 = 1/3, κ = 0.5/(2/3)
    a = ["1_full_compliance", "1_full_compliance", "2_full_refusal", "2_full_refusal", "3_partial_refusal",
         "3_partial_refusal"]
    b = ["1_full_compliance", "1_full_compliance", "2_full_refusal", "2_full_refusal", "1_full_compliance",
         "3_partial_refusal"]
    r = cohen_kappa(a, b)
    assert r.kappa == pytest.approx(0.75) and r.expected == pytest.approx(1 / 3) and r.bias is None
    assert r.per_class["3_partial_refusal"]["precision"] == 0.5 and r.per_class["1_full_compliance"]["recall"] == 2 / 3


def test_bad_inputs():
    with pytest.raises(ValueError, match="got 2 and 1 labels"):
        cohen_kappa([0, 1], [0])
    with pytest.raises(ValueError, match="no items"):
        cohen_kappa([], [])
    with pytest.raises(ValueError, match="unparsed"):
        cohen_kappa([0, None], [0, 1])


def test_pairwise_kappas_skip_unparsed_items():
    judge, human = hand_example()
    keyword = [None] * 10 + human[10:]  # unparsed on the first 10 items
    rows = pairwise_kappas({"judge": judge, "human": human, "keyword": keyword}, n_boot=200)
    assert [(r["judge_a"], r["judge_b"]) for r in rows] == [("judge", "human"), ("judge", "keyword"),
                                                             ("human", "keyword")]
    assert rows[0]["kappa"] == pytest.approx(0.70) and rows[0]["n"] == 100 and rows[0]["skipped"] == 0
    assert rows[2]["kappa"] == 1.0 and rows[2]["agreement"] == 1.0 and (rows[2]["n"], rows[2]["skipped"]) == (90, 10)
    assert set(rows[0]) == {"judge_a", "judge_b", "kappa", "agreement", "n", "skipped", "ci_lo", "ci_hi"}
    empty = pairwise_kappas({"a": [None, 1], "b": [0, None]}, n_boot=10)[0]
    assert empty["n"] == 0 and math.isnan(empty["kappa"])
    with pytest.raises(ValueError, match="same items"):
        pairwise_kappas({"a": [0, 1], "b": [0]})


labels = st.lists(st.tuples(st.sampled_from("xyz"), st.sampled_from("xyz")), min_size=1, max_size=60)


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(labels)
def test_kappa_is_symmetric_and_at_most_one(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    k_ab, k_ba = cohen_kappa(a, b, n_boot=0).kappa, cohen_kappa(b, a, n_boot=0).kappa
    assert _same(k_ab, k_ba)
    assert math.isnan(k_ab) or k_ab <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("xyz"), min_size=2, max_size=60).filter(lambda v: len(set(v)) > 1))
def test_identical_non_constant_labels_give_kappa_one(a):
    assert cohen_kappa(a, list(a), n_boot=0).kappa == 1.0


@settings(max_examples=60, deadline=None)
@given(labels, st.permutations(["x", "y", "z"]))
def test_kappa_is_invariant_to_relabelling(pairs, image):
    rename = dict(zip("xyz", image))
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    before = cohen_kappa(a, b, n_boot=0).kappa
    after = cohen_kappa([rename[x] for x in a], [rename[y] for y in b], n_boot=0).kappa
    assert _same(before, after)


def test_kappa_from_confusion_is_the_equation():
    import numpy as np

    kappa, p_o, p_e = kappa_from_confusion(np.array([[40, 5], [10, 45]]))
    assert (kappa, p_o, p_e) == pytest.approx((0.70, 0.85, 0.50))


PKU = Path(__file__).resolve().parents[2] / "shared" / "data" / "pku_saferlhf_dpo_5k"


@pytest.mark.skipif(not PKU.is_dir(), reason="../shared/data/pku_saferlhf_dpo_5k (human safety labels) is absent")
def test_gcg29_keyword_judge_against_pkus_human_labels_is_the_specs_kappa():
    """spec/evaluation.md §2.1 failure mode 2: κ(keyword GCG-29, PKU label) = 0.071 on the 10,270 labelled responses
    (86 % of the safe responses redirect without a refusal phrase, so they count as harmful)."""
    from nlsr_lib.evaluate.benchmarks import load_benchmark
    from nlsr_lib.evaluate.keywords import refused

    human, judge = [], []
    for record in load_benchmark("pku_realign", PKU.parent):
        for pair in record.meta["pairs"]:
            for label, response in ((0, pair["safe"]), (1, pair["unsafe"])):
                human.append(label)
                judge.append(int(not refused(response, "gcg29")))
    agreement = cohen_kappa(judge, human, n_boot=0)
    assert agreement.n == 10_270 and round(agreement.kappa, 3) == 0.071
