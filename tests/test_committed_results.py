"""The committed tiny results (issue 18): every table carries its seeds and an interval, the headline tables hold
at least three training seeds, and the findings the README states for every seed hold at every seed.

These read ``results/tiny/`` only (no model is run); ``make test-slow`` checks a fresh run against them."""

from __future__ import annotations

import json

import pytest

from nlsr_lib.config import load_params
from nlsr_lib.intervals import size_field
from nlsr_lib.paths import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "results" / "tiny"
TINY = load_params("params/tiny.yaml")
TABLES = ("01_alignment", "01_benchmarks", "02_before_attack", "02_harmful_finetuning", "03_safety_reference",
          "03_expo_chosen", "04_safety_regions", "04_overlap", "05_restoration", "06_model_fusion", "06_benchmarks",
          "07_restoration_ablation")
METRICS = {"01_alignment": "harmful_score", "01_benchmarks": "harmful_score", "06_benchmarks": "harmful_score", "02_before_attack": "accuracy", "02_harmful_finetuning": "harmful_score",
           "03_safety_reference": "val_harmful_score", "03_expo_chosen": "expo", "04_safety_regions": "density",
           "04_overlap": "jaccard", "05_restoration": "harmful_score", "06_model_fusion": "harmful_score",
           "07_restoration_ablation": "harmful_score"}


def table(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def seeds_of(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}_seeds.json").read_text())


def values(records: list[dict], metric: str, **where) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in records if all(r.get(k) == v for k, v in where.items())}


@pytest.mark.parametrize("name", TABLES)
def test_every_table_carries_its_seeds_and_an_interval(name):
    rows, per_seed = table(name), seeds_of(name)
    metric = METRICS[name]
    assert rows and per_seed
    assert all(r["seed"] in TINY.seeds for r in per_seed)
    for row in rows:
        assert row["n_seeds"] == len(row["seeds"]) >= 1 and set(row["seeds"]) <= set(TINY.seeds)
        if row.get(metric) is None:
            continue
        measured = row.get(f"{metric}_n_seeds", row["n_seeds"])
        # over seeds: mean ± sd; at one seed: a bootstrap interval over prompts (where the metric is a rate)
        assert f"{metric}_sd" in row if measured > 1 else (f"{metric}_lo" in row or size_field(metric) is None), row
    assert (RESULTS / f"{name}.md").read_text().splitlines()[0].endswith("n_seeds |")


@pytest.mark.parametrize("name", TABLES)
def test_every_row_holds_every_training_seed(name):
    """``seed_scope: all``: every row of every table at every training seed (≥ 3)."""
    assert TINY.seed_scope == "all" and len(TINY.seeds) >= 3
    assert all(r["n_seeds"] == len(TINY.seeds) for r in table(name)), name


# ------------------------------------------------------------------------------------------- findings at every seed
def test_every_alignment_method_is_safer_than_the_base_at_every_seed():
    records = seeds_of("01_alignment")
    base = values(records, "harmful_score", method="base", judge="moderation")
    for method in TINY.alignment.methods:
        for seed, score in values(records, "harmful_score", method=method, judge="moderation").items():
            assert score < base[seed] - 20, (method, seed, score)


def test_harm_rises_with_the_ratio_and_the_attack_beats_clean_finetuning_at_every_seed():
    records = seeds_of("02_harmful_finetuning")
    for seed in TINY.seeds:
        curve = [values(records, "harmful_score", method="dpo", task="sst2", n=TINY.attack.n, variant="poisoned",
                        poison_ratio=p)[seed] for p in sorted(TINY.attack.poison_ratios)]
        assert all(a <= b for a, b in zip(curve, curve[1:])), (seed, curve)
        for task in TINY.attack.tasks:
            where = dict(method="dpo", task=task, n=TINY.attack.n, poison_ratio=TINY.attack.size_sweep_ratio)
            attacked = values(records, "harmful_score", variant="poisoned", **where)[seed]
            clean = values(records, "harmful_score", variant="clean", **where)[seed]
            assert attacked > clean + 12.8 - 1e-9, (seed, task, attacked, clean)  # the README's smallest gap


def test_expo_lowers_every_methods_harmful_score_at_every_seed():
    records = seeds_of("03_expo_chosen")
    for method in TINY.expo.methods:
        for seed in TINY.seeds:
            (row,) = [r for r in records if r["method"] == method and r["seed"] == seed]
            assert row["expo"] < row["aligned"], row


def test_nlsr_beats_no_defence_and_the_random_control_on_every_attack_at_every_seed():
    records = [r for r in seeds_of("05_restoration") if r["benchmark"] == "beavertails_30k_test"]  # the primary set
    attacks = {(r["task"], r["poison_ratio"]) for r in records if r["method"] == "dpo"}
    assert len(attacks) == len(TINY.attack.poison_ratios) * len(TINY.attack.tasks)
    for task, p in attacks:
        for seed in TINY.seeds:
            h = {d: values(records, "harmful_score", method="dpo", task=task, poison_ratio=p, defense=d)[seed]
                 for d in ("aligned", "none", "nlsr", "random_mask")}
            assert h["nlsr"] < h["random_mask"] and h["nlsr"] < h["none"], (task, p, seed, h)
            if p == 0.1:  # the paper's setting: at least half of the attack's rise undone
                assert h["none"] - h["nlsr"] >= 0.5 * (h["none"] - h["aligned"]), (task, seed, h)


def test_learned_mask_and_rank_region_fusion_are_safer_than_their_baselines_at_every_seed():
    records = seeds_of("06_model_fusion")
    for task in TINY.fusion.tasks:
        h = {f: values(records, "harmful_score", fusion=f, inputs=task)
             for f in ("learned_mask", "learned_mask_random", "region_rank_out", "task_arithmetic")}
        acc = {f: values(records, "accuracy", fusion=f, inputs=task) for f in ("region_rank_out", "task_arithmetic")}
        for seed in TINY.seeds:
            assert h["learned_mask"][seed] < h["learned_mask_random"][seed] - 10, (task, seed, h)
            assert h["region_rank_out"][seed] < h["task_arithmetic"][seed], (task, seed, h)
            assert acc["region_rank_out"][seed] >= acc["task_arithmetic"][seed] - 5, (task, seed, acc)


def test_the_field_defences_stand_where_the_readme_says_at_every_seed():
    """Issue 17: every defence of the field on every headline attack at every seed, with its family and cost; NLSR
    below Vaccine, Booster, constrained SFT and Antidote in every seed-paired comparison, Lisa and safety mixing
    below no defence in every one (the README's family table)."""
    from nlsr_lib.stages.attack import headline_points

    records = [r for r in seeds_of("05_restoration") if r["benchmark"] == "beavertails_30k_test"]
    attacks = {(pt.task, pt.p) for pt in headline_points(TINY) if pt.variant == "poisoned"}
    assert len(attacks) == 9
    for defence in TINY.defences.methods:
        rows = [r for r in records if r["defense"] == defence]
        assert {(r["task"], r["poison_ratio"], r["seed"]) for r in rows} == {
            (t, p, s) for t, p in attacks for s in TINY.seeds}, defence
        assert all(r["cost_s"] > 0 and r["family"] in ("alignment", "fine-tuning", "post-fine-tuning") for r in rows)
    for task, p in attacks:
        for seed in TINY.seeds:
            h = {d: values(records, "harmful_score", method="dpo", task=task, poison_ratio=p, defense=d)[seed]
                 for d in ("none", "nlsr", *TINY.defences.methods)}
            for weaker in ("vaccine", "booster", "constrained_sft", "antidote"):
                assert h["nlsr"] < h[weaker], (task, p, seed, weaker, h)
            assert h["lisa"] < h["none"] and h["safety_mixing"] < h["none"], (task, p, seed, h)
    assert (PROJECT_ROOT / "figures" / "tiny" / "05_defences_pareto.png").is_file()


# ------------------------------------------------------------------------------------------- the evaluation suite
def test_the_suite_covers_ten_benchmarks_and_both_judges_for_the_four_models_of_notebook_05():
    """Issue 16: rows for ≥ 10 benchmarks × {keyword, moderation} for aligned, attacked, NLSR and the random-mask
    control, with over-refusal."""
    suite = [r for r in table("05_restoration") if r["benchmark"] != "beavertails_30k_test"]
    cells = {(r["benchmark"], r["judge"], r["defense"]) for r in suite}
    benchmarks = {b for b, _, _ in cells}
    assert len(benchmarks) >= 10 and cells == {(b, j, d) for b in benchmarks for j in ("moderation", "keyword")
                                               for d in ("aligned", "none", "nlsr", "random_mask")}
    assert all(r["over_refusal"] is not None and r["n_seeds"] == 3 for r in suite)


def test_nlsr_beats_no_defence_and_the_random_mask_on_every_benchmark_and_judge_at_every_seed():
    records = [r for r in seeds_of("05_restoration") if r["benchmark"] != "beavertails_30k_test"]
    for benchmark, judge in {(r["benchmark"], r["judge"]) for r in records}:
        h = {d: values(records, "harmful_score", benchmark=benchmark, judge=judge, defense=d)
             for d in ("aligned", "none", "nlsr", "random_mask")}
        for seed in TINY.seeds:
            assert h["aligned"][seed] < h["none"][seed], (benchmark, judge, seed)
            assert h["nlsr"][seed] < min(h["none"][seed], h["random_mask"][seed]), (benchmark, judge, seed)


def test_the_judges_agree_as_the_readme_says():
    for name in ("01", "05", "06"):
        (row,) = table(f"{name}_judge_agreement")
        assert {row["judge_a"], row["judge_b"]} == {"moderation", "keyword"} and 0.9 < row["kappa"] <= 1
        assert row["ci_lo"] <= row["kappa"] <= row["ci_hi"]
