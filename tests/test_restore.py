"""NLSR restoration and training-free baselines (spec nlsr.md §5, §7, §10; DESIGN.md §5-6).

Hand-worked values first, then properties, then the baselines' defining properties, errors, files and the
benchmark at a tiny shape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nlsr_lib import names
from nlsr_lib.config import ParamsError, load_params
from nlsr_lib.models import lora_scaling, read_adapter, write_adapter
from nlsr_lib.restore import (
    CORRECTIONS, DEFENCES, SELECTION_FILE, STRATEGIES, Adapter, RestoreError, adaptive_probabilities,
    defence_params, defend, defend_adapter, explicit_similarity, gram_similarity, lora_modules, realign,
    realign_state, resta_config, resta_state, safelora_module, safelora_state, select_modules, transplant,
)
from nlsr_lib.restore.baselines import random_mask_like, random_mask_of_density

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (4, 8), "self_attn.v_proj": (4, 8),
          "self_attn.o_proj": (8, 8), "mlp.gate_proj": (12, 8), "mlp.up_proj": (12, 8), "mlp.down_proj": (8, 12)}
CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          "bias": "none", "use_rslora": False}


def make_state(seed: int = 0, layers: int = 2, r: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for name, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=g).to(dtype)
            state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=g).to(dtype)
    return state


def make_mask(state, density: float = 0.3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) < density for k, v in state.items()}


def delta(state, name, scaling=1.0):
    return scaling * state[f"{name}.lora_B.weight"].double() @ state[f"{name}.lora_A.weight"].double()


def same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- hand values (§10)
def test_adaptive_probabilities_hand_values():
    sims = torch.tensor([0.9, 0.2, 0.5, 0.7])
    code = adaptive_probabilities(sims, 0.5, 0.2, "high_similarity")
    torch.testing.assert_close(code, torch.tensor([0.7, 0.3, 0.4 + 1 / 30, 0.6 - 1 / 30], dtype=torch.float64))
    # The default restores the less similar modules more often: the same numbers, reversed by rank.
    torch.testing.assert_close(adaptive_probabilities(sims, 0.5, 0.2),
                               torch.tensor([0.3, 0.7, 0.6 - 1 / 30, 0.4 + 1 / 30], dtype=torch.float64))
    clipped = adaptive_probabilities(sims, 0.9, 0.2, "high_similarity")
    assert clipped[0].item() == 1.0 and clipped.max().item() == 1.0
    assert adaptive_probabilities(torch.tensor([0.3]), 0.5, 0.2).tolist() == [0.5]


def test_transplant_hand_value():
    out = transplant(torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, 20.0]]), torch.tensor([[True, False]]))
    assert out.tolist() == [[10.0, 2.0]]


def test_similarity_invariances():
    g = torch.Generator().manual_seed(3)
    a, b, ar, br = (torch.randn(s, generator=g) for s in ((3, 7), (5, 3), (3, 7), (5, 3)))
    ma, mb = torch.rand(3, 7, generator=g) < 0.5, torch.rand(5, 3, generator=g) < 0.5
    sim = gram_similarity(a, b, ar, br, ma, mb)
    for c in (0.1, 1.8, 1000.0):
        assert gram_similarity(a, b, c * ar, br, ma, mb) == pytest.approx(sim, abs=1e-6)
        assert gram_similarity(a, b, ar, c * br, ma, mb) == pytest.approx(sim, abs=1e-6)
    f = ((b * mb).double() @ (a * ma).double()).flatten()
    r = ((br * mb).double() @ (ar * ma).double()).flatten()
    assert sim == pytest.approx(float(f @ r / (f.norm() * r.norm())), abs=1e-6)
    assert gram_similarity(a, b, ar, br, torch.zeros_like(ma), mb) == 0.0  # zero update: similarity 0


def test_similarity_of_identical_and_opposite_updates_is_clipped_to_one():
    """The fp32 cosine of ~10⁵-element identical updates rounds above 1 (1.000003 here, 1.000175 at 8B shapes):
    both paths return a cosine in [−1, 1] and agree."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(8, 512, generator=g), torch.randn(512, 8, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            same_sim = explicit_similarity(a, b, a, b, dtype=dtype)
            assert -1.0 <= same_sim <= 1.0 and same_sim == pytest.approx(1.0, abs=1e-2)
            opposite = explicit_similarity(a, b, -a, b, dtype=dtype)
            assert -1.0 <= opposite <= 1.0 and opposite == pytest.approx(-1.0, abs=1e-2)
        assert gram_similarity(a, b, a, b) <= 1.0 and gram_similarity(a, b, -a, b) >= -1.0
        assert explicit_similarity(a, b, a, b) == pytest.approx(gram_similarity(a, b, a, b), abs=1e-5)
        assert explicit_similarity(a, b, -a, b) == pytest.approx(gram_similarity(a, b, -a, b), abs=1e-5)
    nan_a = a.clone()
    nan_a[0, 0] = float("nan")
    for fn in (gram_similarity, explicit_similarity):  # the clip does not turn a NaN into ±1
        assert math.isnan(fn(nan_a, b, a, b))


# --------------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 5), d_out=st.integers(1, 9), d_in=st.integers(1, 9), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000))
def test_gram_similarity_equals_explicit_cosine(r, d_out, d_in, density, seed):
    g = torch.Generator().manual_seed(seed)
    a, ar = torch.randn(r, d_in, generator=g), torch.randn(r, d_in, generator=g)
    b, br = torch.randn(d_out, r, generator=g), torch.randn(d_out, r, generator=g)
    ma, mb = torch.rand(r, d_in, generator=g) < density, torch.rand(d_out, r, generator=g) < density
    expected = explicit_similarity(a, b, ar, br, ma, mb, dtype=torch.float64)
    assert gram_similarity(a, b, ar, br, ma, mb) == pytest.approx(expected, abs=1e-5)
    assert explicit_similarity(a, b, ar, br, ma, mb) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("strategy,params", [("adaptive", {"seed": 5}), ("threshold", {"tau": 2.0}), ("all", {}),
                                             ("layers", {"layers": (0, 2)})])
def test_all_false_mask_is_the_identity(strategy, params):
    ft, ref = make_state(0), make_state(1)
    out, records = realign_state(ft, ref, {k: torch.zeros_like(v, dtype=torch.bool) for k, v in ft.items()},
                                 strategy=strategy, **params)
    assert same(out, ft) and len(records) == 14


def test_all_true_mask_with_every_module_selected_gives_the_reference():
    ft, ref = make_state(0), make_state(1)
    for mask in (None, {k: torch.ones_like(v, dtype=torch.bool) for k, v in ft.items()}):
        out, records = realign_state(ft, ref, mask, strategy="all")
        assert same(out, ref) and all(r["selected"] for r in records)
    out, _ = realign_state(ft, ref, make_mask(ft), strategy="all", correction="module")
    assert same(out, ref)


def test_neuron_correction_touches_masked_entries_of_selected_modules_only():
    ft, ref, mask = make_state(0), make_state(1), make_mask(make_state(0))
    out, records = realign_state(ft, ref, mask, strategy="adaptive", seed=3)
    assert 0 < sum(r["selected"] for r in records) < len(records)
    for rec in records:
        for f in ("A", "B"):
            key = f"{rec['name']}.lora_{f}.weight"
            expected = torch.where(mask[key], ref[key], ft[key]) if rec["selected"] else ft[key]
            assert torch.equal(out[key], expected)


def test_selection_is_deterministic_by_seed():
    sims = torch.linspace(-1, 1, 224, dtype=torch.float64)
    modules = lora_modules(make_state(0, layers=32))
    draws = {s: select_modules("adaptive", sims, modules, seed=s).selected for s in (42, 42, 7)}
    first = select_modules("adaptive", sims, modules, seed=42).selected
    assert torch.equal(first, draws[42]) and not torch.equal(first, draws[7])
    assert 0.35 * 224 < int(first.sum()) < 0.65 * 224  # expected rho * L = 112


def test_adaptive_favor_moves_restorations_towards_low_similarity():
    sims = torch.linspace(-1, 1, 224, dtype=torch.float64)
    modules = lora_modules(make_state(0, layers=32))
    low = sum(select_modules("adaptive", sims, modules, seed=s, epsilon=0.5).selected[:112].sum() for s in range(20))
    high = sum(select_modules("adaptive", sims, modules, seed=s, epsilon=0.5, favor="high_similarity").selected[:112]
               .sum() for s in range(20))
    assert low > high  # the first half holds the least similar modules


def test_threshold_layers_and_order():
    modules = lora_modules(make_state(0, layers=3))
    assert [m.module_type for m in modules[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]
    assert [m.layer for m in modules] == [0] * 7 + [1] * 7 + [2] * 7
    sims = torch.linspace(0, 1, 21, dtype=torch.float64)
    sel = select_modules("threshold", sims, modules, tau=0.5)
    assert torch.equal(sel.selected, sims < 0.5) and torch.equal(sel.probability, (sims < 0.5).double())
    sel = select_modules("layers", sims, modules, layers=(1, 3))
    assert sel.selected.tolist() == [False] * 7 + [True] * 14
    with pytest.raises(TypeError, match="tau"):
        select_modules("threshold", sims, modules, tau=0.5, seed=1)
    with pytest.raises(ValueError, match="adaptive, threshold"):
        select_modules("random", sims, modules)
    with pytest.raises(ValueError, match="a < b"):
        select_modules("layers", sims, modules, layers=(2, 2))


def test_explicit_similarity_gives_the_same_realignment():
    ft, ref, mask = make_state(0), make_state(1), make_mask(make_state(0))
    gram = realign_state(ft, ref, mask, strategy="adaptive", seed=9)
    explicit = realign_state(ft, ref, mask, strategy="adaptive", seed=9, similarity="explicit")
    assert same(gram[0], explicit[0])
    assert [r["similarity"] for r in gram[1]] == pytest.approx([r["similarity"] for r in explicit[1]], abs=1e-5)


def test_output_keeps_the_finetuned_dtype():
    ft, ref = make_state(0, dtype=torch.bfloat16), make_state(1)
    out, _ = realign_state(ft, ref, None, strategy="all")
    assert all(v.dtype == torch.bfloat16 for v in out.values())


# --------------------------------------------------------------------------------------------- errors
def test_mismatched_module_sets_name_the_missing_keys():
    ft, ref = make_state(0), make_state(1, layers=1)
    with pytest.raises(RestoreError, match=r"missing from the reference adapter: .*layers\.1\."):
        realign_state(ft, ref)
    mask = make_mask(ft)
    del mask["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    with pytest.raises(RestoreError, match=r"keys missing from the mask: .*layers\.1\.mlp\.up_proj\.lora_B"):
        realign_state(ft, make_state(1), mask)
    partner = dict(ft)
    del partner["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    with pytest.raises(RestoreError, match="no partner factor"):
        realign_state(partner, partner)
    with pytest.raises(RestoreError, match="not a LoRA factor"):
        realign_state({**ft, "lm_head.weight": torch.ones(2, 2)}, ft)


def test_shape_rank_nan_and_mask_errors():
    ft, ref = make_state(0), make_state(1)
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"
    with pytest.raises(RestoreError, match=r"mlp\.gate_proj: shape mismatch .* \(12, 2\).* \(13, 2\)"):
        realign_state(ft, {**ref, key: torch.ones(13, 2)})
    with pytest.raises(RestoreError, match=r"different LoRA ranks.* r=2.* r=3"):
        realign_state(ft, make_state(1, r=3))
    bad = dict(ft)
    bad[key] = ft[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(RestoreError, match="NaN or inf"):
        realign_state(bad, ref)
    with pytest.raises(RestoreError, match="expected a bool tensor"):
        realign_state(ft, ref, {k: torch.ones_like(v) for k, v in ft.items()})
    mask = make_mask(ft)
    mask[key] = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(RestoreError, match=r"shape \(2, 12\) does not match .* \(12, 2\)"):
        realign_state(ft, ref, mask)


def test_reference_code_mask_keys_are_accepted():
    ft, ref = make_state(0), make_state(1)
    mask = {k.replace(".weight", ".default"): v for k, v in make_mask(ft).items()}
    out, _ = realign_state(ft, ref, mask, strategy="all")
    assert not same(out, ft)


# --------------------------------------------------------------------------------------------- baselines
def test_resta_gamma_zero_is_the_identity_and_weight_space_is_exact():
    ft, ref = make_state(0), make_state(1)
    assert same(resta_state(ft, ref, gamma=0.0, space="factor"), ft)
    out = resta_state(ft, ref, gamma=0.3, space="weight", scaling_ratio=1.5)
    config = resta_config(CONFIG, "weight")
    assert config["r"] == 4 and config["lora_alpha"] / config["r"] == CONFIG["lora_alpha"] / CONFIG["r"]
    for m in lora_modules(ft):
        torch.testing.assert_close(delta(out, m.name), delta(ft, m.name) + 0.3 * 1.5 * delta(ref, m.name))
        torch.testing.assert_close(delta(resta_state(ft, ref, gamma=0.0), m.name), delta(ft, m.name))
    factor = resta_state(ft, ref, gamma=0.2, space="factor")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.testing.assert_close(factor[key], ft[key] + 0.2 * ref[key])


def test_safelora_tau_below_every_cosine_is_the_identity():
    ft, ref = make_state(0), make_state(1)
    for variant in ("published", "nlsr_code"):
        out, records = safelora_state(ft, ref, tau=-1.5, variant=variant, reference_scaling=2.0)
        assert same(out, ft) and not any(r["selected"] for r in records)
        out, records = safelora_state(ft, ref, tau=1.5, variant=variant, reference_scaling=2.0)
        assert all(r["selected"] for r in records) and not same(out, ft)


def _explicit_projection(a_ref, b_ref, kappa, exact):
    v = kappa * b_ref.double() @ a_ref.double()
    return v @ torch.linalg.pinv(v) if exact else v @ v.T / v.norm()  # projector onto col V | SafeLoRA's approx


@pytest.mark.parametrize("projection", ["approx", "exact"])
def test_safelora_published_matches_the_explicit_projection(projection):
    g = torch.Generator().manual_seed(0)
    a, b, ar, br = (torch.randn(s, generator=g) for s in ((3, 9), (7, 3), (3, 9), (7, 3)))
    cos, a_new, b_new = safelora_module(a, b, ar, br, projection=projection, reference_scaling=2.0)
    c = _explicit_projection(ar, br, 2.0, projection == "exact")
    dw = b.double() @ a.double()
    torch.testing.assert_close(b_new.double() @ a_new.double(), c @ dw, atol=1e-4, rtol=1e-4)  # κ(CB)A = C·ΔW
    assert torch.equal(a_new, a)
    expected = float((c @ dw).flatten() @ dw.flatten() / ((c @ dw).norm() * dw.norm()))
    assert cos == pytest.approx(expected, abs=1e-5)


def test_safelora_exact_projection_is_idempotent_and_nlsr_code_matches_its_formula():
    g = torch.Generator().manual_seed(1)
    a, b, ar, br = (torch.randn(s, generator=g) for s in ((2, 9), (7, 2), (2, 9), (7, 2)))
    cos, _, b_new = safelora_module(a, b, ar, br, projection="exact")
    _, _, b_twice = safelora_module(a, b_new, ar, br, projection="exact")
    torch.testing.assert_close(b_twice, b_new, atol=1e-5, rtol=1e-5)
    cos, a_new, b_same = safelora_module(a, b, ar, br, variant="nlsr_code")
    v = ar.double().T @ br.double().T
    c = v @ v.T / v.norm()
    torch.testing.assert_close(a_new.double(), (c @ a.double().T).T, atol=1e-4, rtol=1e-4)
    d = a.double().T @ b.double().T
    assert torch.equal(b_same, b)
    assert cos == pytest.approx(float((c @ d).flatten() @ d.flatten() / ((c @ d).norm() * d.norm())), abs=1e-5)


@pytest.mark.parametrize("projection", ["approx", "exact"])
@pytest.mark.parametrize("tau", [-1.5, 1.5])
def test_safelora_on_the_finetuning_delta_matches_the_dense_formula(projection, tau):
    """Projected modules become κ̂B̂Â + C(κBA − κ̂B̂Â), the others keep κBA; the result is a rank-2r adapter."""
    from nlsr_lib.restore.baselines import safelora_delta_state

    ft, ref = make_state(0), make_state(1)
    out, records = safelora_delta_state(ft, ref, reference_scaling=2.0, scaling=2.0, tau=tau, projection=projection)
    assert all(r["selected"] == (tau > 0) for r in records)
    for m in lora_modules(ft):
        a, b, ar, br = (t.double() for t in (ft[m.key_a], ft[m.key_b], ref[m.key_a], ref[m.key_b]))
        assert out[m.key_a].shape == (2 * a.shape[0], a.shape[1]) and out[m.key_b].shape == (b.shape[0], 2 * b.shape[1])
        c = _explicit_projection(ref[m.key_a], ref[m.key_b], 2.0, projection == "exact")
        dw = 2.0 * (b @ a - br @ ar)
        expected = 2.0 * br @ ar + c @ dw if tau > 0 else 2.0 * b @ a
        torch.testing.assert_close(2.0 * out[m.key_b].double() @ out[m.key_a].double(), expected, atol=1e-4,
                                   rtol=1e-4)
        cos = float((c @ dw).flatten() @ dw.flatten() / ((c @ dw).norm() * dw.norm()))
        assert records[lora_modules(ft).index(m)]["similarity"] == pytest.approx(cos, abs=1e-5)


def test_safelora_delta_defence_doubles_the_rank_and_refuses_the_code_variant():
    ft, ref = Adapter(make_state(0), CONFIG), Adapter(make_state(1), CONFIG)
    out, _ = defend_adapter("safelora", ft, ref, None, update="finetuning_delta", tau=0.6)
    assert out.config["r"] == 2 * CONFIG["r"] and lora_scaling(out.config) == lora_scaling(CONFIG)
    with pytest.raises(RestoreError, match="needs variant 'published'"):
        defend_adapter("safelora", ft, ref, None, update="finetuning_delta", variant="nlsr_code")
    with pytest.raises(ParamsError, match="restore.safelora.update"):
        load_params(REPO / "params" / "tiny.yaml", {"restore.safelora.variant": "nlsr_code",
                                                    "restore.safelora.update": "finetuning_delta"})


def test_masked_safelora_uses_the_mask_and_refuses_to_run_without_one():
    ft, ref = Adapter(make_state(0), CONFIG), Adapter(make_state(1), CONFIG)
    mask = make_mask(ft.state, 0.5)
    plain, _ = defend_adapter("safelora", ft, ref, mask, masked=False, tau=1.5)
    masked_out, _ = defend_adapter("safelora", ft, ref, mask, masked=True, tau=1.5)
    expected, _ = safelora_state(ft.state, ref.state, mask, reference_scaling=ref.scaling, tau=1.5)
    assert same(masked_out.state, expected) and not same(masked_out.state, plain.state)
    for update in ("adapter", "finetuning_delta"):
        with pytest.raises(RestoreError, match="masked=True.*needs a mask"):
            defend_adapter("safelora", ft, ref, None, masked=True, update=update)


def test_defence_stage_gives_safelora_the_nlsr_mask_only_when_masked(tmp_path, monkeypatch):
    """``restore.safelora.masked: true`` used to be ignored by the defence stage (no mask was passed). With it the
    mask of NLSR's safety reference is an input and reaches SafeLoRA; ``masked: false`` keeps the stage's config
    and inputs exactly as before (a warm cache stays valid)."""
    from nlsr_lib.runs import Artifact, Run
    from nlsr_lib.stages import regions as safety_regions
    from nlsr_lib.stages import restore as restoration
    from nlsr_lib.stages.graph import ModelRef

    ft, ref = make_state(0), make_state(1)
    write_adapter(tmp_path / "ft", ft, CONFIG)
    write_adapter(tmp_path / "ref", ref, CONFIG)
    mask = make_mask(ft, 0.5)
    (tmp_path / "mask").mkdir()
    from safetensors.torch import save_file
    save_file(mask, str(tmp_path / "mask" / safety_regions.MASK_FILE))

    def artifact(name):
        return Artifact(name, tmp_path / name, f"fp-{name}", cached=True)

    attacked = ModelRef("attack/dpo/sst2", "base", str(tmp_path / "ft"), artifact("ft"))
    aligned = ModelRef("dpo", "base", str(tmp_path / "ref"), artifact("ref"))
    expo_ref = ModelRef("expo/dpo", "base", str(tmp_path / "expo"), artifact("expo"))
    mask_refs = []
    monkeypatch.setattr(restoration, "aligned_adapter_ref", lambda params, run, method: aligned)
    monkeypatch.setattr(restoration, "reference_for", lambda params, run, method, reference="expo": expo_ref)
    monkeypatch.setattr(restoration, "mask_stage",
                        lambda params, run, r, scorer, sparsity=None: mask_refs.append(r) or artifact("mask"))
    run = Run("tiny", root=tmp_path / "runs", quiet=True)
    seen = {}
    real_stage = run.stage

    def stage(tag, config, build, inputs=None, **kwargs):
        seen[config["values"]["params"]["masked"]] = (config, dict(inputs))
        return real_stage(tag, config, build, inputs=inputs, **kwargs)

    monkeypatch.setattr(run, "stage", stage)
    params = load_params(REPO / "params" / "tiny.yaml")
    out = {}
    for masked in (False, True):
        defended = restoration.defence_stage(params, run, attacked, "dpo", "safelora",
                                             overrides={"masked": masked, "tau": 1.5})
        out[masked] = read_adapter(defended.adapter)[0]
    config, inputs = seen[False]
    assert config["args"] == {"defence": "safelora", "method": "dpo", "scorer": None, "mask_sparsity": None}
    assert list(inputs) == ["attacked", "reference"]
    config, inputs = seen[True]
    assert config["args"]["scorer"] == "low_rank" and inputs["mask"].fingerprint == "fp-mask" and mask_refs == [expo_ref]
    with_mask, _ = safelora_state(ft, ref, mask, reference_scaling=lora_scaling(CONFIG), tau=1.5,
                                  **{k: v for k, v in config["values"]["params"].items()
                                     if k in ("variant", "projection")})
    without, _ = safelora_state(ft, ref, None, reference_scaling=lora_scaling(CONFIG), tau=1.5,
                                **{k: v for k, v in config["values"]["params"].items()
                                   if k in ("variant", "projection")})
    assert same(out[True], with_mask) and same(out[False], without) and not same(out[True], out[False])


def test_defence_registry_properties():
    ft, ref = Adapter(make_state(0), CONFIG), Adapter(make_state(1), CONFIG)
    mask = make_mask(ft.state)
    assert DEFENCES.names() == names.DEFENCES.names()
    assert set(DEFENCES) == set(load_params(REPO / "params" / "tiny.yaml").restore.defences)
    out, records = defend_adapter("none", ft, None)
    assert out is ft and not any(r["selected"] for r in records)
    out, records = defend_adapter("aligned_adapter", ft, ref)
    assert same(out.state, ref.state) and out.config == ref.config and all(r["selected"] for r in records)
    out, _ = defend_adapter("resta", ft, ref, gamma=0.0, space="factor")
    assert same(out.state, ft.state)
    out, records = defend_adapter("nlsr", ft, ref, mask, strategy="threshold", tau=2.0)
    assert all(r["selected"] for r in records) and not same(out.state, ft.state)
    with pytest.raises(RestoreError, match="different LoRA scalings"):
        defend_adapter("nlsr", ft, Adapter(ref.state, {**CONFIG, "lora_alpha": 8}), mask)


def test_random_mask_control_keeps_per_tensor_counts_and_is_seeded():
    state = make_state(0)
    mask = make_mask(state, 0.2)
    rand = random_mask_like(mask, seed=4)
    assert all(int(rand[k].sum()) == int(mask[k].sum()) and rand[k].dtype == torch.bool for k in mask)
    assert same(rand, random_mask_like(mask, seed=4)) and not same(rand, mask)
    dense = random_mask_of_density(state, 0.5, seed=1)
    assert all(int(dense[k].sum()) == round(0.5 * v.numel()) for k, v in state.items())
    ft, ref = Adapter(state, CONFIG), Adapter(make_state(1), CONFIG)
    out, _ = defend_adapter("random_mask", ft, ref, mask, seed=4, strategy="all")
    expected, _ = realign_state(ft.state, ref.state, rand, strategy="all")
    assert same(out.state, expected)


# --------------------------------------------------------------------------------------------- config
def test_config_defaults_registries_and_checks():
    p = load_params(REPO / "params" / "tiny.yaml")
    r = p.restore
    assert (r.strategy, r.prune_rate, r.epsilon, r.seed, r.favor, r.correction) == \
        ("adaptive", 0.5, 0.2, 42, "low_similarity", "neuron")
    assert STRATEGIES.names() == names.RESTORE_STRATEGIES.names() and set(CORRECTIONS) == {"neuron", "module"}
    assert defence_params(r, "nlsr") == {"strategy": "adaptive", "correction": "neuron", "similarity": "gram",
                                         "prune_rate": 0.5, "epsilon": 0.2, "favor": "low_similarity", "seed": 42}
    assert defence_params(r, "safelora")["tau"] == 0.6 and defence_params(r, "resta") == {"gamma": 0.2,
                                                                                         "space": "weight"}
    thr = load_params(REPO / "params" / "tiny.yaml", {"restore.strategy": "threshold"}).restore
    assert defence_params(thr, "random_mask") == {"strategy": "threshold", "correction": "neuron",
                                                  "similarity": "gram", "tau": 0.6, "seed": 42}
    with pytest.raises(ParamsError, match="restore.layers"):
        load_params(REPO / "params" / "tiny.yaml", {"restore.strategy": "layers"})
    with pytest.raises(ParamsError, match="restore.strategy"):
        load_params(REPO / "params" / "tiny.yaml", {"restore.strategy": "greedy"})
    with pytest.raises(ParamsError, match="restore.defences"):
        load_params(REPO / "params" / "tiny.yaml", {"restore.defences": ["nlsr", "vaccine"]})


# --------------------------------------------------------------------------------------------- files
def test_realign_writes_an_adapter_that_peft_loads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=CONFIG["target_modules"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(cfg), lora).save_pretrained(str(tmp_path / "ft"))
    ft, config = read_adapter(tmp_path / "ft")
    assert len(lora_modules(ft)) == 14
    write_adapter(tmp_path / "ref", {k: 1.8 * v for k, v in ft.items()}, config)
    (tmp_path / "ft" / "tokenizer.json").write_text("{}")
    mask = make_mask(ft, 0.5)

    records = realign(tmp_path / "ft", tmp_path / "ref", mask, tmp_path / "out", strategy="adaptive", seed=0)
    out, out_config = read_adapter(tmp_path / "out")
    assert out_config == config and (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / SELECTION_FILE).read_text()) == records
    assert {"name", "layer", "module_type", "similarity", "probability", "selected"} == set(records[0])
    expected, _ = realign_state(ft, {k: 1.8 * v for k, v in ft.items()}, mask, strategy="adaptive", seed=0)
    assert same(out, expected)

    model = PeftModel.from_pretrained(LlamaForCausalLM(cfg), str(tmp_path / "out"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(loaded[k], out[k]) for k in out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)

    defend("resta", tmp_path / "ft", tmp_path / "resta", reference_dir=tmp_path / "ref", gamma=0.2)
    resta = PeftModel.from_pretrained(LlamaForCausalLM(cfg), str(tmp_path / "resta"))
    assert resta(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    with pytest.raises(ValueError, match="is an input adapter directory"):
        realign(tmp_path / "ft", tmp_path / "ref", None, tmp_path / "ft")


def test_benchmark_logic_at_a_tiny_shape(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_restore", REPO / "benchmarks" / "restore.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(["--layers", "2", "--hidden", "16", "--intermediate", "24", "--kv", "8", "--rank", "4",
                         "--explicit-layers", "2", "--workdir", str(tmp_path)])
    result = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert rc == 0 and result["bench"] == "restore" and result["modules"] == 14
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("seconds", "speedup_vs_explicit", "peak_rss_mb"))
    assert result["explicit_layers_timed"] == 2 and result["explicit_fp32_vs_gram_max_abs_diff"] < 1e-4
    assert result["gram_vs_fp64_abs_diff"] < 1e-6
    assert (tmp_path / "realigned" / SELECTION_FILE).is_file()


def test_defence_names_put_each_variant_after_its_defence():
    from nlsr_lib.stages.restore import defence_names

    params = load_params(REPO / "params" / "tiny.yaml")
    names = defence_names(params)
    assert names.index("safelora_delta") == names.index("safelora") + 1
    assert "safelora_delta" not in defence_names(load_params(REPO / "params" / "tiny.yaml",
                                                             {"restore.defences": ["none", "nlsr"]}))
