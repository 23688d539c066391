"""Training seeds as a params axis (issue 18): replicates, per-seed caching, which tables run at which seeds."""

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from nlsr_lib.config import ParamsError, load_params
from nlsr_lib.runs import Run
from nlsr_lib.seeds import replicates, seeds_for, training_seeds, with_training_seed
from nlsr_lib.stages import notebooks
from nlsr_lib.stages.attack import attack_points, headline_points

TINY = load_params("params/tiny.yaml")


def test_tiny_runs_three_training_seeds_and_its_first_replicate_is_the_profile_itself():
    assert len(TINY.seeds) >= 3
    assert with_training_seed(TINY, TINY.seeds[0]) == TINY  # adding seeds kept the first seed's cache
    assert set(training_seeds(TINY)) >= {"alignment.sft", "alignment.dpo", "attack.train", "fusion.learned_mask"}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31))
def test_a_replicate_changes_every_training_seed_and_nothing_else(seed):
    replica = with_training_seed(TINY, seed)
    assert set(training_seeds(replica).values()) == {seed}
    # the data seed, the world, the scorers' and restoration's random draws, the judge stay fixed
    assert (replica.seed, replica.world, replica.regions, replica.restore, replica.judges, replica.data) == \
        (TINY.seed, TINY.world, TINY.regions, TINY.restore, TINY.judges, TINY.data)
    # every other field equal: blank out the training seeds on both sides and compare
    assert with_training_seed(replica, 0) == with_training_seed(TINY, 0)


def test_bad_seeds_are_named_errors():
    with pytest.raises(ParamsError, match="at least one training seed"):
        load_params("params/tiny.yaml", {"seeds": []})
    with pytest.raises(ParamsError, match="distinct non-negative"):
        load_params("params/tiny.yaml", {"seeds": [1, 1]})
    with pytest.raises(ParamsError, match="distinct non-negative"):
        load_params("params/tiny.yaml", {"seeds": [-3]})
    with pytest.raises(ParamsError, match="seed_scope"):
        load_params("params/tiny.yaml", {"seed_scope": "some"})
    with pytest.raises(ValueError, match="non-negative"):
        with_training_seed(TINY, -1)


def test_headline_tables_run_at_every_seed_the_rest_at_the_first():
    headline = dataclasses.replace(TINY, seed_scope="headline")
    assert seeds_for(headline, headline=True) == TINY.seeds
    assert seeds_for(headline, headline=False) == TINY.seeds[:1]
    assert TINY.seed_scope == "all" and seeds_for(TINY, headline=False) == TINY.seeds  # the tiny profile
    assert [s for s, _ in replicates(headline)] == list(TINY.seeds)


def test_headline_attacks_are_dpo_on_sst2_over_ratios_and_every_task_at_p_0_1():
    points = headline_points(TINY)
    assert set(points) <= set(attack_points(TINY))
    a = TINY.attack
    assert {(p.task, p.p) for p in points if p.variant == "poisoned"} == \
        {("sst2", r) for r in a.poison_ratios} | {(t, a.size_sweep_ratio) for t in a.tasks}
    assert {p.method for p in points} == {"dpo"} and {p.n for p in points} == {a.n}


def _plan(params, notebook):
    run = Run(params.profile, planning=True)
    notebooks.NOTEBOOK_STAGES[notebook](params, run)
    return run.nodes


def test_every_seed_has_its_own_training_stages_and_shares_the_untrained_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("NLSR_HOME", str(tmp_path))
    nodes = _plan(TINY, "01")
    by_kind = {}
    for node in nodes.values():
        by_kind.setdefault(node.kind, []).append(node)
    n_seeds, n_methods = len(TINY.seeds), len(TINY.alignment.methods)
    assert len(by_kind["align"]) == n_seeds * n_methods  # one artifact per (method, seed)
    assert len(by_kind["base_model"]) == 1 and len(by_kind["moderation"]) == 1  # fixed across seeds
    # the base model's generations are requested at every seed but are one stage
    assert sum(n.stage == "generations/base/test" for n in nodes.values()) == 1
    single = _plan(dataclasses.replace(TINY, seeds=TINY.seeds[:1]), "01")
    assert {n.kind for n in single.values()} == set(by_kind)
    e = TINY.evaluation  # the suite: each benchmark × wrapper's generations and verdicts, XSTest, capability
    suite = len(e.benchmarks) * len(e.wrappers) * (1 + len(e.judges)) + 2 * bool(e.over_refusal) + len(e.capability)
    # an alignment, its generations, one verdict per judge, and the suite of the aligned model
    per_seed = n_methods * (2 + len(TINY.judges.enabled) + suite)
    assert len(nodes) - len(single) == (n_seeds - 1) * per_seed


def test_single_seed_tables_plan_only_the_first_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("NLSR_HOME", str(tmp_path))
    headline = dataclasses.replace(TINY, seed_scope="headline")
    one = _plan(dataclasses.replace(headline, seeds=TINY.seeds[:1]), "07")
    assert set(_plan(headline, "07")) == set(one)
