"""The field's defences as stages (issue 17; spec/defences.md): the registry by family, what each serves in the stage
graph, the fingerprints they leave alone, Antidote's calibration rows, the trainer variants' errors, the cost column
and the Pareto front of notebook 05's figure. The update rules themselves are tested in test_vaccine, test_booster,
test_lisa, test_constrained_sft, test_antidote and test_safety_mixing; the smoke notebook test runs every defence."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.config import ParamsError, load_params
from nlsr_lib.errors import UsageError
from nlsr_lib.names import FIELD_DEFENCES as NAMES
from nlsr_lib.plots import pareto_front
from nlsr_lib.runs import Run
from nlsr_lib.stages.estimate import is_field_defence_stage
from nlsr_lib.stages.field_defences import FAMILIES, FIELD_DEFENCES, antidote_calibration, served_model
from nlsr_lib.stages.plan import collect

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


def test_every_defence_of_the_spec_is_registered_in_its_family():
    assert {name: FIELD_DEFENCES[name].family for name in NAMES.names()} == {
        "vaccine": "alignment", "booster": "alignment", "lisa": "fine-tuning", "safety_mixing": "fine-tuning",
        "constrained_sft": "fine-tuning", "antidote": "post-fine-tuning"}
    assert {d.family for d in FIELD_DEFENCES.values()} == set(FAMILIES)


def _served(tmp_path, name: str):
    params = load_params(SMOKE)
    run = Run(params.profile, root=tmp_path / "runs", planning=True)
    return served_model(params, run, name, "dpo", "sst2", 0.1), run


@pytest.mark.parametrize("name, stage, kind", [
    ("vaccine", "attack/dpo+vaccine/sst2/n40_p0.1", "attack"),
    ("booster", "attack/dpo+booster/sst2/n40_p0.1", "attack"),
    ("lisa", "attack/dpo+lisa/sst2/n40_p0.1", "attack"),
    ("constrained_sft", "attack/dpo+constrained_sft/sst2/n40_p0.1", "attack"),
    ("safety_mixing", "attack/dpo/sst2/n40_p0.1_safety_mixing", "attack"),
    ("antidote", "restore/antidote/dpo/sst2/n40_p0.1", "antidote"),
])
def test_each_defence_serves_its_own_stage(tmp_path, name, stage, kind):
    ref, run = _served(tmp_path, name)
    assert ref.tag == stage and ref.artifact.stage == stage
    assert is_field_defence_stage(stage) and not is_field_defence_stage("attack/dpo/sst2/n40_p0.1")


def test_alignment_stage_defences_continue_their_own_aligned_adapter_and_the_others_the_plain_one(tmp_path):
    params = load_params(SMOKE)
    plan = collect(params, ["05"], root=tmp_path / "runs")
    nodes = {n.stage: n for n in plan.nodes}
    by_fp = {n.fingerprint: n.stage for n in plan.nodes}
    plain = {by_fp[fp] for fp in nodes["attack/dpo/sst2/n40_p0.1"].upstream}
    assert "align/dpo" in plain
    for name in ("vaccine", "booster"):
        upstream = {by_fp[fp] for fp in nodes[f"attack/dpo+{name}/sst2/n40_p0.1"].upstream}
        assert f"align/dpo+{name}" in upstream and "align/dpo" not in upstream
        assert nodes[f"align/dpo+{name}"].kind == "defended_align"
    for name in ("lisa", "constrained_sft"):
        assert "align/dpo" in {by_fp[fp] for fp in nodes[f"attack/dpo+{name}/sst2/n40_p0.1"].upstream}
    antidote = {by_fp[fp] for fp in nodes["restore/antidote/dpo/sst2/n40_p0.1"].upstream}
    assert "attack/dpo/sst2/n40_p0.1" in antidote


def test_the_field_defences_leave_every_other_stage_keyed_as_before(tmp_path):
    """Adding the defences (or changing their hyperparameters) rebuilds their own stages only: the undefended
    attacks and the rest of the study keep their fingerprints."""
    without = collect(load_params(SMOKE, {"defences.methods": []}), ["05"], root=tmp_path / "runs")
    with_all = collect(load_params(SMOKE), ["05"], root=tmp_path / "runs")
    assert set(without.run.nodes) < set(with_all.run.nodes)
    added = [n for fp, n in with_all.run.nodes.items() if fp not in without.run.nodes]
    assert added and all(is_field_defence_stage(n.stage) for n in added)
    changed = collect(load_params(SMOKE, {"defences.lisa.rho": 0.5, "defences.antidote.dense_ratio": 0.2}), ["05"],
                      root=tmp_path / "runs")
    moved = {n.stage for fp, n in changed.run.nodes.items() if fp not in with_all.run.nodes}
    assert moved and all("+lisa" in s or "antidote" in s for s in moved)
    assert not any(s.startswith("attack/dpo/") for s in moved)


def test_antidote_calibration_rows_are_the_unsafe_rows_after_every_attack():
    params = load_params(SMOKE, {"defences.antidote.calibration_start": 10, "defences.antidote.calibration_size": 3})
    train = [{"prompt": f"q{i}", "response": f"r{i}", "is_safe": i % 2 == 0} for i in range(40)]
    rows = antidote_calibration(params, train)
    assert [r["instruction"] for r in rows] == ["q21", "q23", "q25"]  # unsafe rows 10, 11, 12 (odd indices)
    # the smoke attacks use at most ⌊40·0.1⌋ = 4 harmful rows: a start below that overlaps them
    with pytest.raises(ParamsError, match="calibration_start: 3 overlaps the attacks' harmful rows .* >= 4"):
        antidote_calibration(load_params(SMOKE, {"defences.antidote.calibration_start": 3}), train)
    with pytest.raises(ParamsError, match="the source has 20; lower calibration_start or calibration_size"):
        antidote_calibration(load_params(SMOKE, {"defences.antidote.calibration_size": 11}), train)


@pytest.mark.parametrize("override, message", [
    ({"defences.methods": ["vaccine", "fedavg"]}, "unknown field defence 'fedavg'"),
    ({"defences.constrained_sft.beta": 0.0}, "defences.constrained_sft.beta: 0.0; allowed: a number > 0"),
    ({"defences.constrained_sft.min_weight": 2.0}, "min_weight: 2.0; allowed: 0 <= min_weight < 2"),
    ({"defences.lisa.k_align": 0, "defences.lisa.k_user": 0}, "k_align \\+ k_user = 0"),
    ({"defences.lisa.prox_warmup_frac": 1.0}, "prox_warmup_frac: 1.0; allowed: 0 <= x < 1"),
    ({"defences.vaccine.site": "mlp"}, "defences.vaccine.site"),
    ({"defences.vaccine.rho": -1.0}, "defences.vaccine.rho"),
    ({"defences.booster.lam": -1.0}, "defences.booster.lam"),
    ({"defences.antidote.dense_ratio": 1.0}, "defences.antidote.dense_ratio"),
    ({"defences.antidote.group": "column"}, "defences.antidote.group"),
])
def test_bad_defence_hyperparameters_are_refused_when_the_params_load(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params(SMOKE, override)


def test_the_trainer_variants_refuse_what_they_cannot_train():
    from nlsr_lib.train.defended import (booster_method, booster_rows, constrained_sft_method, lisa_method,
                                         vaccine_method)

    with pytest.raises(UsageError, match="method 'kto' has no Vaccine trainer; allowed: sft, dpo"):
        vaccine_method("kto", 2.0, "attention")
    with pytest.raises(UsageError, match="allowed: dpo, orpo, simpo"):
        booster_method("sft", [], 5.0, 0.1)
    with pytest.raises(UsageError, match="lack chosen, rejected"):
        booster_rows([{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match="Lisa: k_align = -1"):
        lisa_method([], k_align=-1)
    with pytest.raises(ValueError, match="constrained SFT: bias_length = 0"):
        constrained_sft_method(bias_length=0)
    align, harmful = booster_rows([{"prompt": "p", "chosen": "no", "rejected": "sure"}])
    assert align == [{"prompt": "p", "completion": "no"}] and harmful == [{"prompt": "p", "completion": "sure"}]
    assert vaccine_method("dpo", 2.0, "attention").name == "dpo+vaccine"
    assert booster_method("dpo", harmful, 5.0, 0.1).on_sft_base


def test_an_unknown_attack_defence_is_refused(tmp_path):
    from nlsr_lib.stages.attack import attack_stage

    params = load_params(SMOKE)
    with pytest.raises(UsageError, match="defence 'antidote' is not allowed; allowed: vaccine, booster, lisa"):
        attack_stage(params, Run(params.profile, root=tmp_path, planning=True), "dpo", "sst2", 0.1,
                     defence="antidote")


def test_pareto_front_of_hand_worked_points():
    assert pareto_front([(10, 90), (20, 95), (15, 80), (30, 94), (5, 70)]) == [(5, 70), (10, 90), (20, 95)]
    assert pareto_front([(1, 1), (1, 2)]) == [(1, 2)]  # equal harm: the more accurate one
    assert pareto_front([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=30))
def test_pareto_front_is_exactly_the_undominated_points(points):
    front = pareto_front(points)

    def dominated(p):
        return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)

    assert all(not dominated(p) for p in front)
    assert {p for p in points if not dominated(p)} == set(front)
