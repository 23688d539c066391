"""EXPO in both modes (spec nlsr.md §3, §10): hand values, identities and the delta scaling property."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nlsr_lib.expo import expo_adapter, expo_state
from nlsr_lib.models import read_adapter, write_adapter

KEY_A, KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", \
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _delta(state):
    return state[KEY_B].float() @ state[KEY_A].float()


def test_factor_scaling_hand_values():
    out = expo_state({KEY_A: torch.tensor([[1.0]]), KEY_B: torch.tensor([[1.0]])}, 0.9, "factor_scaling")
    assert torch.allclose(out[KEY_A], torch.tensor([[1.8]])) and torch.allclose(out[KEY_B], torch.tensor([[1.8]]))
    assert torch.allclose(_delta(out), torch.tensor([[3.24]]))


def test_paper_mode_scales_b_only():
    out = expo_state({KEY_A: torch.tensor([[1.0]]), KEY_B: torch.tensor([[1.0]])}, 0.9, "paper")
    assert out[KEY_A].item() == 1.0 and out[KEY_B].item() == pytest.approx(1.9)


def test_identities():
    state = {KEY_A: torch.randn(4, 6), KEY_B: torch.randn(5, 4)}
    for alpha, mode in ((0.0, "paper"), (0.5, "factor_scaling")):
        out = expo_state(state, alpha, mode)
        assert all(torch.equal(out[k], state[k]) for k in state)


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(0, 2), seed=st.integers(0, 100))
def test_delta_scales_as_specified(alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {KEY_A: torch.randn(3, 7, generator=gen), KEY_B: torch.randn(5, 3, generator=gen)}
    torch.testing.assert_close(_delta(expo_state(state, alpha, "paper")), (1 + alpha) * _delta(state))
    torch.testing.assert_close(_delta(expo_state(state, alpha, "factor_scaling")), 4 * alpha ** 2 * _delta(state))


def test_errors():
    with pytest.raises(ValueError, match="paper, factor_scaling"):
        expo_state({KEY_A: torch.ones(1, 1)}, 0.5, "reference")
    with pytest.raises(ValueError, match=">= 0"):
        expo_state({KEY_A: torch.ones(1, 1)}, -0.1)
    with pytest.raises(ValueError, match="neither lora_A nor lora_B"):
        expo_state({"lm_head.weight": torch.ones(1, 1)}, 0.5)


def test_adapter_files_in_and_out_keep_dtype(tmp_path):
    state = {KEY_A: torch.ones(2, 3, dtype=torch.bfloat16), KEY_B: torch.ones(4, 2, dtype=torch.bfloat16)}
    write_adapter(tmp_path / "a", state, {"r": 2, "lora_alpha": 4, "peft_type": "LORA"})
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    expo_adapter(tmp_path / "a", tmp_path / "b", 0.9)
    out, config = read_adapter(tmp_path / "b")
    assert out[KEY_B].dtype == torch.bfloat16 and out[KEY_B][0, 0].item() == pytest.approx(1.9, rel=1e-2)
    assert config["r"] == 2 and (tmp_path / "b" / "tokenizer.json").is_file()


def test_alpha_choice_lowest_validation_score_then_smallest_alpha():
    from nlsr_lib.expo import choose_alpha

    assert choose_alpha({0.1: 30.0, 0.5: 10.0, 0.9: 12.0}) == 0.5
    assert choose_alpha({0.9: 5.0, 0.3: 5.0, 0.0: 40.0}) == 0.3
    with pytest.raises(ValueError):
        choose_alpha({})
