"""Safety-data mixing (spec/defences.md §6): count test values, modes, harmful rows untouched, seeds, errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from nlsr_lib.config import WorldConfig
from nlsr_lib.data.mixing import beavertails_pool, count, poisoned_mixture
from nlsr_lib.data.safety_mixing import mix_safety, mixture_counts, safe_row_count
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.tiny.world import generate_world

POOL = [{"instruction": f"safe question {i}", "input": "", "output": "I can't help with that."} for i in range(3000)]


def _mixture(n: int, p: float, seed: int = 0) -> list[dict]:
    """A shuffled stand-in mixture with the flags of poisoned_mixture: ⌊n·p⌋ unsafe rows, the rest finetune."""
    k = count(n, p)
    rows = [{"instruction": f"harmful {i}", "input": "", "output": "bad", "flag": "unsafe"} for i in range(k)]
    rows += [{"instruction": f"task {i}", "input": "", "output": "ok", "flag": "finetune"} for i in range(n - k)]
    random.Random(seed).shuffle(rows)
    return rows


def _counts(**kw) -> tuple[int, int, int, int]:
    rows, c = mix_safety(_mixture(kw.pop("n"), kw.pop("p")), POOL, **kw)
    assert c == mixture_counts(rows)
    return c["harmful"], c["safe"], c["benign"], len(rows)


def test_spec_count_values():
    assert _counts(n=1000, p=0.1, fraction=0.1) == (100, 100, 800, 1000)  # replace (NLSR default)
    assert _counts(n=1000, p=0.1, mode="append", count=100) == (100, 100, 900, 1100)  # Vaccine, g = 100
    assert _counts(n=1000, p=0.1, mode="append") == (100, 100, 900, 1100)  # append with ⌊n·g⌋
    assert _counts(n=1000, p=0.1, mode="count", count=100) == (100, 100, 800, 1000)  # Lisa, g = 100
    assert _counts(n=5000, p=0.2, fraction=0.1) == (1000, 500, 3500, 5000)


def test_bianchi_append_share():
    rows, c = mix_safety(_mixture(20000, 0.0), POOL, mode="append", count=500)
    assert c == {"harmful": 0, "safe": 500, "benign": 20000} and round(100 * 500 / len(rows), 2) == 2.44


def test_safe_rows_are_the_first_pool_rows_in_the_mixture_format():
    rows, _ = mix_safety(_mixture(100, 0.1), POOL, fraction=0.05)
    safe = sorted((r for r in rows if r["flag"] == "safe"), key=lambda r: r["instruction"])
    assert safe == sorted(({"instruction": alpaca_prompt(f"safe question {i}", ""), "input": "",
                            "output": "I can't help with that.", "flag": "safe"} for i in range(5)),
                          key=lambda r: r["instruction"])
    raw, _ = mix_safety(_mixture(100, 0.1), POOL, fraction=0.05, alpaca_format=False)
    assert {r["instruction"] for r in raw if r["flag"] == "safe"} == {f"safe question {i}" for i in range(5)}


def test_replaced_rows_are_the_last_benign_rows_in_the_given_order():
    user = [{"instruction": f"task {i}", "input": "", "output": "ok", "flag": "finetune"} for i in range(10)]
    rows, _ = mix_safety(user, POOL, fraction=0.3)
    assert {r["instruction"] for r in rows if r["flag"] == "finetune"} == {f"task {i}" for i in range(7)}


def test_seeded_and_deterministic():
    user = _mixture(300, 0.1)
    assert mix_safety(user, POOL, seed=1) == mix_safety(user, POOL, seed=1)
    a, b = mix_safety(user, POOL, seed=1)[0], mix_safety(user, POOL, seed=2)[0]
    assert a != b and sorted(map(str, a)) == sorted(map(str, b))
    assert user == _mixture(300, 0.1)  # the input is not modified


# ----------------------------------------------------------------------------------------- real mixtures
WORLD = generate_world(WorldConfig(beavertails_train=800, sst2_train=300, ag_news_train=300, gsm8k_train=300))
BEAVER = WORLD["PKU-Alignment/BeaverTails"]["30k_train"].to_list()
SST2 = WORLD["sst2"]["train"].to_list()
SAFE_POOL = beavertails_pool(BEAVER, safe=True)[50:]


def _harmful(rows) -> list[str]:
    return sorted(r["instruction"] + r["output"] for r in rows if r["flag"] == "unsafe")


@pytest.mark.parametrize("mode, kw", [("replace", {}), ("append", {"count": 20}), ("count", {"count": 20})])
def test_harmful_rows_identical_to_the_unmixed_mixture_and_nested(mode, kw):
    mixed = {}
    for p in (0.05, 0.1, 0.2):
        user = poisoned_mixture(SST2, BEAVER, "sst2", n=200, p=p, seed=3)
        rows, c = mix_safety(user, SAFE_POOL, mode=mode, seed=3, **kw)
        assert _harmful(rows) == _harmful(user) and c["harmful"] == count(200, p)
        assert sorted(str(r) for r in rows if r["flag"] == "unsafe") == sorted(str(r) for r in user
                                                                             if r["flag"] == "unsafe")
        benign = {r["instruction"] for r in user if r["flag"] == "finetune"}
        assert {r["instruction"] for r in rows if r["flag"] == "finetune"} <= benign
        mixed[p] = set(_harmful(rows))
    assert mixed[0.05] <= mixed[0.1] <= mixed[0.2]


@pytest.mark.parametrize("kw, match", [
    ({"fraction": -0.1}, r"\[0, 1\)"), ({"fraction": 1.0}, r"\[0, 1\)"), ({"fraction": 1.5}, r"\[0, 1\)"),
    ({"fraction": True}, r"\[0, 1\)"), ({"mode": "mixup"}, "allowed: replace, append, count"),
    ({"mode": "joint_loss"}, "not a data mix"), ({"mode": "count"}, "needs count"),
    ({"mode": "count", "count": -1}, "integer >= 0"), ({"mode": "append", "count": 2.5}, "integer >= 0"),
    ({"count": 10}, "use mode='count'"),
])
def test_parameter_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        mix_safety(_mixture(100, 0.1), POOL, **kw)


def test_data_errors():
    with pytest.raises(ValueError, match="safe pool has only 5"):
        mix_safety(_mixture(100, 0.1), POOL[:5], fraction=0.1)
    with pytest.raises(ValueError, match="safe pool has only 5"):
        mix_safety(_mixture(100, 0.1), POOL[:5], mode="append", count=6)
    with pytest.raises(ValueError, match="only 2 benign rows"):
        mix_safety(_mixture(10, 0.8), POOL, fraction=0.3)
    with pytest.raises(ValueError, match="only 2 benign rows"):
        mix_safety(_mixture(10, 0.8), POOL, mode="count", count=3)
    assert mix_safety(_mixture(10, 0.8), POOL, mode="append", count=3)[1] == {"harmful": 8, "safe": 3, "benign": 2}
    with pytest.raises(ValueError, match="flag 'poison'"):
        mix_safety([{"instruction": "x", "output": "y", "flag": "poison"}], POOL)
    with pytest.raises(ValueError, match="non-empty"):
        mix_safety([], POOL)
    with pytest.raises(ValueError, match="safe pool row 0"):
        mix_safety(_mixture(100, 0.1), [{"prompt": "x"}] * 20, fraction=0.1)


def test_zero_fraction_is_a_seeded_reshuffle():
    user = _mixture(50, 0.2)
    rows, c = mix_safety(user, [], fraction=0.0)
    assert c == {"harmful": 10, "safe": 0, "benign": 40} and sorted(map(str, rows)) == sorted(map(str, user))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), p=st.sampled_from((0.0, 0.01, 0.05, 0.1, 0.2, 0.3)),
       g=st.sampled_from((0.0, 0.01, 0.05, 0.1, 0.2)), mode=st.sampled_from(("replace", "append")),
       seed=st.integers(0, 5))
def test_property_counts(n, p, g, mode, seed):
    user = _mixture(n, p, seed)
    k = safe_row_count(n, mode=mode, fraction=g)
    assert k == count(n, g)
    rows, c = mix_safety(user, POOL, mode=mode, fraction=g, seed=seed)
    total = n if mode == "replace" else n + k
    assert len(rows) == total and c == {"harmful": count(n, p), "safe": k, "benign": total - count(n, p) - k}
