"""Intervals over training seeds and prompts (issue 18): hand-worked values and properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nlsr_lib.intervals import (aggregate, bootstrap_interval, format_cell, mean_sd, prediction_interval, size_field,
                                t_quantile)
from nlsr_lib.results import markdown_table, read_results, write_seeded_results


def test_mean_sd_hand_values():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample sd (ddof = 1): sqrt(((1)² + 0 + (1)²) / 2)
    assert mean_sd([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_sd([])


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_prediction_interval_hand_value():
    # k = 3 seeds at 30, 33, 36: mean 33, sd 3; half-width t(0.975, 2) · 3 · √(4/3) = 4.3027 · 3 · 1.1547 = 14.905
    lo, hi = prediction_interval([30.0, 33.0, 36.0])
    assert (lo, hi) == pytest.approx((33 - 14.905, 33 + 14.905), abs=1e-3)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        prediction_interval([1.0])


def test_bootstrap_of_one_seed_is_the_binomial_interval():
    # one seed, 50 % of 500 prompts: the percentile interval ≈ 50 ± 1.96·√(0.25/500)·100 = 50 ± 4.38
    lo, hi = bootstrap_interval([50.0], [500], n_boot=20_000)
    assert lo == pytest.approx(45.62, abs=0.5) and hi == pytest.approx(54.38, abs=0.5)


def test_identical_seeds_get_the_interval_of_one_seed():
    """The prompts are shared by the seeds: an untrained model measured at three seeds is one measurement."""
    assert bootstrap_interval([40.0] * 3, [500] * 3) == pytest.approx(bootstrap_interval([40.0], [500]), abs=0.5)


def test_bootstrap_is_deterministic_and_degenerate_rates_have_no_width():
    assert bootstrap_interval([30.0, 40.0], [100, 100]) == bootstrap_interval([30.0, 40.0], [100, 100])
    assert bootstrap_interval([0.0, 0.0, 0.0], [50, 50, 50]) == (0.0, 0.0)
    assert bootstrap_interval([100.0], [7]) == (100.0, 100.0)


def test_bootstrap_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 rates and 1 sizes"):
        bootstrap_interval([1.0, 2.0], [10])
    with pytest.raises(ValueError, match="positive count"):
        bootstrap_interval([1.0], [0])
    with pytest.raises(ValueError, match="0 < level < 1"):
        bootstrap_interval([1.0], [10], level=1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=5), st.integers(20, 2000))
def test_bootstrap_interval_is_ordered_and_contains_the_mean(rates, n):
    lo, hi = bootstrap_interval(rates, [n] * len(rates), n_boot=4000)
    mean = sum(rates) / len(rates)
    assert 0.0 <= lo <= hi <= 100.0
    assert lo - 1e-9 <= mean <= hi + 1e-9 or hi - lo < 100.0 / n  # a mean between two attainable values


@settings(max_examples=20, deadline=None)
@given(st.floats(10.0, 90.0), st.floats(2.0, 9.0))
def test_spread_between_seeds_widens_the_interval(mean, spread):
    """Seeds that disagree give a wider interval than seeds that agree on the same mean (seed resampling)."""
    agree = bootstrap_interval([mean] * 3, [500] * 3)
    disagree = bootstrap_interval([mean - spread, mean, mean + spread], [500] * 3)
    assert disagree[1] - disagree[0] > agree[1] - agree[0]


@settings(max_examples=20, deadline=None)
@given(st.floats(5.0, 95.0))
def test_more_prompts_narrow_the_interval(rate):
    small = bootstrap_interval([rate], [100])
    large = bootstrap_interval([rate], [2000])
    assert large[1] - large[0] < small[1] - small[0]


def test_size_fields():
    assert size_field("harmful_score") == "n_prompts" and size_field("empty") == "n_prompts"
    assert size_field("accuracy") == "n_task" and size_field("accuracy_strict") == "n_task"
    assert size_field("accuracy_sst2") == "n_task_sst2"
    assert size_field("val_harmful_score") is None


RECORDS = [
    {"method": "dpo", "judge": "moderation", "seed": 42, "harmful_score": 30.0, "n_prompts": 500, "slice": "test"},
    {"method": "dpo", "judge": "moderation", "seed": 43, "harmful_score": 33.0, "n_prompts": 500, "slice": "test"},
    {"method": "dpo", "judge": "moderation", "seed": 44, "harmful_score": 36.0, "n_prompts": 500, "slice": "test"},
    {"method": "sft", "judge": "moderation", "seed": 42, "harmful_score": 40.0, "n_prompts": 500, "slice": "val"},
]


def test_aggregate_groups_in_order_with_mean_sd_and_interval():
    rows = aggregate(RECORDS, by=["method", "judge"], metrics=["harmful_score"])
    assert [r["method"] for r in rows] == ["dpo", "sft"]
    dpo, sft = rows
    assert dpo["harmful_score"] == 33.0 and dpo["harmful_score_sd"] == 3.0
    assert dpo["seeds"] == [42, 43, 44] and dpo["n_seeds"] == 3 and dpo["slice"] == "test" and dpo["n_prompts"] == 500
    assert dpo["harmful_score_lo"] < 30.0 and dpo["harmful_score_hi"] > 36.0  # seeds and prompts both resampled
    assert sft["n_seeds"] == 1 and sft["harmful_score_sd"] == 0.0 and sft["harmful_score_lo"] < 40.0


def test_aggregate_lists_fields_that_vary_and_counts_partial_metrics():
    records = [{"method": "dpo", "seed": 42, "alpha": 0.3, "expo": 10.0, "test": 5.0},
               {"method": "dpo", "seed": 43, "alpha": 0.5, "expo": 12.0}]
    (row,) = aggregate(records, by=["method"], metrics=["expo", "test"])
    assert row["alpha"] == [0.3, 0.5]  # the α chosen at each seed
    assert row["expo"] == 11.0 and "expo_n_seeds" not in row
    assert row["test"] == 5.0 and row["test_n_seeds"] == 1
    assert "expo_lo" not in row  # no prompt count for a derived number: sd only


def test_aggregate_refuses_records_without_a_seed_or_with_a_repeated_seed():
    with pytest.raises(ValueError, match="without a 'seed'"):
        aggregate([{"method": "dpo", "harmful_score": 1.0}], by=["method"], metrics=["harmful_score"])
    with pytest.raises(ValueError, match="one record per seed"):
        aggregate([RECORDS[0], RECORDS[0]], by=["method"], metrics=["harmful_score"])


def test_cells_show_mean_sd_over_seeds_and_the_interval_of_one_seed():
    dpo, sft = aggregate(RECORDS, by=["method", "judge"], metrics=["harmful_score"])
    assert format_cell(dpo, "harmful_score") == "33.00 ± 3.00"
    assert format_cell(sft, "harmful_score") == f"40.00 [{sft['harmful_score_lo']:.1f}, {sft['harmful_score_hi']:.1f}]"
    assert format_cell(dpo, "method") is None and format_cell(dpo, "n_seeds") is None
    partial = {"x": 2.0, "x_sd": 0.0, "x_n_seeds": 1, "n_seeds": 3}
    assert format_cell(partial, "x") is None  # measured at one seed, no prompt count: a plain number
    table = markdown_table([dpo, sft], ["method", "harmful_score", "n_seeds"])
    assert "| dpo | 33.00 ± 3.00 | 3 |" in table


def test_write_seeded_results_writes_the_aggregate_and_the_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv("NLSR_HOME", str(tmp_path))
    rows = write_seeded_results(RECORDS, "01_test", "unit", by=["method", "judge"], metrics=["harmful_score"],
                                columns=["method", "judge", "harmful_score"])
    assert read_results("01_test", "unit") == rows
    assert read_results("01_test_seeds", "unit") == RECORDS
    md = (tmp_path / "results" / "unit" / "01_test.md").read_text()
    assert md.splitlines()[0] == "| method | judge | harmful_score | n_seeds |"
    assert all(math.isfinite(r["harmful_score_sd"]) for r in rows)
    assert np.isclose(rows[0]["harmful_score"], 33.0)
