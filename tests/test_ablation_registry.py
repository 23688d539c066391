"""Notebook 07's ablation registry and notebook 06's fusion registry: what each point changes, clear errors."""

from __future__ import annotations

import pytest

from nlsr_lib.stages import ablation
from nlsr_lib.stages import fusion as model_fusion
from nlsr_lib.config import ParamsError, load_params

TINY = "params/tiny.yaml"


@pytest.fixture(scope="module")
def params():
    return load_params(TINY)


@pytest.mark.parametrize("name, value, path, expected", [
    ("mask_sparsity", 0.9, ("regions", "mask_sparsity"), 0.9),
    ("rank_keep_ratio", 0.5, ("regions", "rank_keep_ratio"), 0.5),
    ("prune_rate", 0.3, ("restore", "prune_rate"), 0.3),
    ("epsilon", 0.1, ("restore", "epsilon"), 0.1),
    ("tau", 0.4, ("restore", "tau"), 0.4),
    ("seed", 44, ("restore", "seed"), 44),
    ("favor", "high_similarity", ("restore", "favor"), "high_similarity"),
    ("correction", "module", ("restore", "correction"), "module"),
    ("strategy", "all", ("restore", "strategy"), "all"),
])
def test_each_ablation_changes_exactly_its_parameter(params, name, value, path, expected):
    point = ablation.get_ablation(name).fn(params, value)
    section, key = path
    assert getattr(getattr(point.params, section), key) == expected
    changed = {s for s in ("regions", "restore") if getattr(point.params, s) != getattr(params, s)}
    assert changed == {section}
    if name == "tau":
        assert point.params.restore.strategy == "threshold"
    untouched = point.params.restore if section == "regions" else point.params.regions
    assert untouched == (params.restore if section == "regions" else params.regions)


def test_reference_scorer_and_rank_keep_points(params):
    assert ablation.get_ablation("reference").fn(params, "plain").reference == "plain"
    assert ablation.get_ablation("scorer").fn(params, "wanda").scorer == "wanda"


def test_points_cover_every_ablation_with_controls_where_declared(params):
    points = ablation.ablation_points(params)
    assert {n for n, _, _ in points} == set(ablation.ABLATIONS)
    controls = {n for n, _, d in points if d == "random_mask"}
    assert controls == {"mask_sparsity", "seed"}
    assert len({p for p in points}) == len(points)
    a = params.ablation
    assert sum(1 for n, _, d in points if n == "prune_rate") == len(a.prune_rate)


def test_unknown_names_are_errors(params):
    with pytest.raises(ValueError, match="unknown ablation 'rho'; registered: mask_sparsity"):
        ablation.get_ablation("rho")
    with pytest.raises(ValueError, match="unknown fusion 'slerp'; registered: weight_averaging.*learned_mask"):
        model_fusion.get_fusion("slerp")


def test_ablation_params_are_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    root = __import__("nlsr_lib.paths").paths.PROJECT_ROOT
    bad.write_text(f"extends: {root / TINY}\nablation: {{scorers: [wanda, magic]}}\n")
    with pytest.raises(ParamsError, match=r"ablation.scorers\[1\]: unknown region scorer 'magic'; registered: wanda"):
        load_params(bad)
    bad.write_text(f"extends: {root / TINY}\nablation: {{mask_sparsity: [0.5, 1.0]}}\n")
    with pytest.raises(ParamsError, match="ablation.mask_sparsity: 1.0 is outside"):
        load_params(bad)


def test_fusion_names_follow_the_registry(params):
    names = model_fusion.fusion_names(params)
    assert names[: len(params.fusion.operators)] == list(params.fusion.operators)
    assert names[-2:] == ["learned_mask", "learned_mask_random"]
    assert {"region_neuron_outside", "region_rank_out", "region_heads_outside"} <= set(names)
    assert all(model_fusion.get_fusion(n).uses_region == n.startswith("region_") for n in names[:-2])
