"""SOMF's learned safety mask (spec/somf.md §2, §6, §7 test targets): the concrete sample, the rescale, the fused
adapter, gradients through every merge operator, training that touches only the logits, the export."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_fusion, tiny_peft_llama
from nlsr_lib.fusion import MERGE_METHODS
from nlsr_lib.fusion.learned_mask import (
    ConcreteMask, Fusion, export_adapter_state, mask_task_vectors, train_mask,
)

PROJ = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(seed: int, shapes=(("a", (4, 6)), ("b", (6, 4)))) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes}


# --------------------------------------------------------------------------------------------- the mask
def test_relaxed_sample_limits_and_mean():
    shapes = {"x": (200, 200)}
    gen = torch.Generator().manual_seed(0)
    assert float(ConcreteMask(shapes, init_logit=40.0).relaxed(gen)["x"].min()) > 0.999
    assert float(ConcreteMask(shapes, init_logit=-40.0).relaxed(gen)["x"].max()) < 1e-3
    m = ConcreteMask(shapes, temperature=0.5).relaxed(gen)["x"]
    assert abs(float(m.mean()) - 0.5) < 0.01  # L = 0, T = 0.5: E[m] = 0.5 by symmetry


@settings(max_examples=15, deadline=None)
@given(st.floats(-3.0, 3.0))
def test_bernoulli_export_keeps_with_probability_sigmoid_logit(logit):
    mask = ConcreteMask({"x": (400, 100)}, init_logit=logit)
    b = mask.export("bernoulli", seed=3)["x"]
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(b.mean()) - 1 / (1 + math.exp(-logit))) < 0.02
    assert torch.equal(b, mask.export("bernoulli", seed=3)["x"])  # seeded


def test_threshold_export_is_logit_sign_and_soft_is_sigmoid():
    mask = ConcreteMask({"x": (2, 2)})
    with torch.no_grad():
        mask.logits[0].copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    assert mask.export("threshold")["x"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert torch.allclose(mask.export("soft")["x"], torch.sigmoid(mask.logits[0].detach()))
    assert mask.statistics()["keep_rate"] == 0.5
    with pytest.raises(ValueError, match="unknown mask export 'hard'; allowed: threshold, bernoulli, soft"):
        mask.export("hard")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ConcreteMask({"x": (2,)}, temperature=0.0)


# --------------------------------------------------------------------------------------------- rescale
@settings(max_examples=20, deadline=None)
@given(st.floats(0.05, 1.0), st.integers(0, 1000))
def test_constant_mask_returns_tau_exactly(c, seed):
    tau = _state(seed)
    out = mask_task_vectors([tau], {k: torch.full_like(v, c) for k, v in tau.items()})[0]
    for k in tau:
        torch.testing.assert_close(out[k], tau[k], rtol=1e-6, atol=1e-6)


def test_binary_mask_scales_kept_entries_by_inverse_keep_rate_and_empty_mask_keeps_aligned():
    tau = {"x": torch.arange(1.0, 9.0).reshape(2, 4)}
    b = torch.tensor([[1.0, 0, 0, 0], [1, 0, 1, 1]])  # keep rate 1/2
    out = mask_task_vectors([tau], {"x": b})[0]["x"]
    assert out.tolist() == [[2.0, 0, 0, 0], [10.0, 0, 14.0, 16.0]]
    assert mask_task_vectors([tau], {"x": b}, rescale="none")[0]["x"].tolist() == [[1.0, 0, 0, 0], [5, 0, 7, 8]]
    assert torch.equal(mask_task_vectors([tau], {"x": torch.zeros(2, 4)})[0]["x"], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown mask rescale 'max'"):
        mask_task_vectors([tau], {"x": b}, rescale="max")
    with pytest.raises(ValueError, match=r"mask x: shape \(4, 2\) but the task vector is \(2, 4\)"):
        mask_task_vectors([tau], {"x": b.T})


def test_soft_mask_at_init_is_the_task_model_and_reference_is_the_task_model():
    aligned, task = _state(0), _state(1)
    tau = {k: task[k] - aligned[k] for k in aligned}
    fusion = Fusion(aligned, [tau])
    mask = ConcreteMask({k: v.shape for k, v in aligned.items()})
    soft = export_adapter_state(fusion, mask, "soft")
    for k in aligned:
        torch.testing.assert_close(soft[k], task[k])
        torch.testing.assert_close(fusion.state(None)[k], task[k])


def test_fusion_multi_task_merges_the_masked_vectors():
    aligned, t1, t2 = _state(0), _state(1), _state(2)
    taus = [{k: t[k] - aligned[k] for k in aligned} for t in (t1, t2)]
    fusion = Fusion(aligned, taus, merge="task_arithmetic", merge_params={"lam": 0.3})
    ones = {k: torch.ones_like(v) for k, v in aligned.items()}
    for k in aligned:
        torch.testing.assert_close(fusion.state(ones)[k], aligned[k] + 0.3 * (taus[0][k] + taus[1][k]))
    with pytest.raises(ValueError, match="task vector 0 and the aligned adapter have different keys"):
        Fusion(aligned, [{"a": taus[0]["a"]}])


def _backprop_throughrandom_fusion(method: str, scope: str):
    """A relaxed mask through ``method`` at ``scope`` over three random task vectors, a random linear loss
    backpropagated; returns (aligned, taus, merge params, mask)."""
    aligned = _state(0)
    taus = [{k: v - aligned[k] for k, v in _state(s).items()} for s in (1, 2, 3)]
    params = {"k": 1} if method.startswith("consensus") else {}
    fusion = Fusion(aligned, taus, merge=method, merge_params=params, scope=scope)
    mask = ConcreteMask({k: v.shape for k, v in aligned.items()})
    weights = _state(9)
    state = fusion.state(mask.relaxed(torch.Generator().manual_seed(0)))
    sum((state[k] * weights[k]).sum() for k in state).backward()
    return aligned, taus, params, mask


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_gradient_reaches_every_logit_tensor_through_every_operator(method):
    aligned, taus, _, mask = _backprop_throughrandom_fusion(method, "global")
    for key, logits in mask.items():
        assert logits.grad is not None and float(logits.grad.abs().sum()) > 0, (method, key)
    for tv, fresh in zip(taus, [{k: v - aligned[k] for k, v in _state(s).items()} for s in (1, 2, 3)]):
        for k in tv:
            assert torch.equal(tv[k], fresh[k])  # inputs are never modified


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def peft_model():
    return tiny_peft_llama(PROJ)


def _pref_batch(seed: int, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for side, t in (("chosen", 10), ("rejected", 12)):
        ids = torch.randint(0, 64, (n, t), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids), f"{side}_labels": labels}
    return out


def test_training_moves_only_the_logits_and_is_deterministic(peft_model):
    fusion = random_fusion(peft_model, 2)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    taus_before = [{k: v.clone() for k, v in tv.items()} for tv in fusion.taus]
    batches = [_pref_batch(1), _pref_batch(2)]
    mask, history = train_mask(peft_model, fusion, batches, learning_rate=0.05, epochs=1.5, show_progress=False)
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert any(float(lg.detach().abs().max()) > 0 for lg in mask.logits)  # the logits moved
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n  # base and adapter weights bit-identical
    for tv, tb in zip(fusion.taus, taus_before):
        assert all(torch.equal(tv[k], tb[k]) for k in tv)
    again, history2 = train_mask(peft_model, fusion, batches, learning_rate=0.05, epochs=1.5, show_progress=False)
    assert [h["loss"] for h in history] == [h["loss"] for h in history2]
    assert all(torch.equal(a, b) for a, b in zip(mask.logits, again.logits))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=0.2)  # near the reference at init


def test_training_lowers_the_dpo_loss_of_the_soft_mask(peft_model):
    from nlsr_lib.fusion.learned_mask import _pair_logps, lora_parameter_names

    fusion = random_fusion(peft_model)
    batch = _pref_batch(5, n=8)
    names = lora_parameter_names(peft_model)

    def loss_of(mask):
        state = export_adapter_state(fusion, mask, "soft")
        with torch.no_grad():
            pol = _pair_logps(peft_model, {names[k]: v for k, v in state.items()}, batch)
            ref = _pair_logps(peft_model, {names[k]: v for k, v in fusion.state(None).items()}, batch)
        n = batch["chosen_input_ids"].shape[0]
        return float(-torch.nn.functional.logsigmoid(0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))).mean())

    init = ConcreteMask({k: v.shape for k, v in fusion.aligned.items()})
    mask, _ = train_mask(peft_model, fusion, [batch], learning_rate=0.2, epochs=20, show_progress=False)
    assert loss_of(mask) < loss_of(init) - 0.01


def test_training_refuses_adapters_of_other_modules(peft_model):
    fusion = random_fusion(peft_model)
    wrong = Fusion({k + "x": v for k, v in fusion.aligned.items()}, [{k + "x": v for k, v in fusion.taus[0].items()}])
    with pytest.raises(ValueError, match="the model's LoRA matrices and the adapters' keys differ"):
        train_mask(peft_model, wrong, [_pref_batch(1)], show_progress=False)
    with pytest.raises(ValueError, match="no preference batches"):
        train_mask(peft_model, fusion, [], show_progress=False)


def test_mask_state_round_trip_and_shape_errors():
    mask = ConcreteMask({"x": (2, 3)}, init_logit=1.5)
    other = ConcreteMask({"x": (2, 3)})
    other.load_state(mask.state())
    assert torch.equal(other.logits[0], mask.logits[0])
    with pytest.raises(ValueError, match=r"mask logits x: shape \(3, 2\)"):
        other.load_state({"x": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="mask logits missing"):
        other.load_state({})


def test_permuted_control_keeps_counts_not_positions():
    from nlsr_lib.fusion.learned_mask import permuted_mask

    gen = torch.Generator().manual_seed(0)
    mask = {"a": (torch.rand(20, 30, generator=gen) > 0.7).float(), "b": torch.rand(5, 8, generator=gen)}
    control = permuted_mask(mask, seed=1)
    assert float(control["a"].sum()) == float(mask["a"].sum()) and not torch.equal(control["a"], mask["a"])
    assert torch.equal(control["b"].flatten().sort().values, mask["b"].flatten().sort().values)
    assert all(torch.equal(control[k], permuted_mask(mask, seed=1)[k]) for k in mask)  # seeded


@pytest.mark.parametrize("method", ["ties", "consensus_ties"])
def test_trimming_merges_at_tensor_scope_train_with_finite_gradients(method, peft_model):
    """The trim threshold is a constant w.r.t. the logits: at scope ``tensor`` it is computed on detached values
    (it used to call ``numpy()`` on a tensor that requires grad), and the gradient reaches every logit tensor."""
    _, _, params, mask = _backprop_throughrandom_fusion(method, "tensor")
    for key, logits in mask.items():
        assert logits.grad is not None and bool(torch.isfinite(logits.grad).all()), (method, key)
        assert float(logits.grad.abs().sum()) > 0, (method, key)
    # ... and the DPO training loop runs end to end with finite losses
    base = random_fusion(peft_model, 2)
    trained = Fusion(base.aligned, base.taus, merge=method, merge_params=params, scope="tensor")
    mask, history = train_mask(peft_model, trained, [_pref_batch(1)], learning_rate=0.05, epochs=2,
                               show_progress=False)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert all(bool(torch.isfinite(lg).all()) for lg in mask.logits)
    assert any(float(lg.detach().abs().max()) > 0 for lg in mask.logits)


def test_training_stops_on_a_non_finite_loss(peft_model):
    """No silent NaN: a NaN DPO loss (here from β = NaN) stops the mask training with a named error."""
    fusion = random_fusion(peft_model)
    with pytest.raises(FloatingPointError, match=r"learned mask: non-finite training loss nan at step 1"):
        train_mask(peft_model, fusion, [_pref_batch(1)], beta=float("nan"), epochs=2, show_progress=False)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())  # flags restored
