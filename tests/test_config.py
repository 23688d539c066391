"""Params loading: inheritance, strict validation, errors that name the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from nlsr_lib.config import ParamsError, dump_params, load_params, params_from_dict, to_dict

PARAMS = Path(__file__).resolve().parents[1] / "params"


@pytest.mark.parametrize("name", ["tiny", "smoke", "paper_llama3_8b", "mistral_7b", "qwen2_7b"])
def test_every_shipped_params_file_loads(name):
    params = load_params(PARAMS / f"{name}.yaml")
    assert params.profile == name


def test_paper_profile_has_the_paper_values():
    p = load_params(PARAMS / "paper_llama3_8b.yaml")
    assert (p.lora.r, p.lora.alpha, p.lora.dropout) == (128, 256, 0.0)
    assert p.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert p.alignment.sft.learning_rate == 1e-4 and p.alignment.orpo.learning_rate == 2e-4
    assert p.alignment.dpo.learning_rate == 2e-6 and p.alignment.dpo.beta == 0.1
    assert (p.alignment.simpo.beta, p.alignment.simpo.gamma) == (2.0, 1.0)
    assert p.alignment.orpo.beta == 0.5 and p.alignment.kto.beta == 0.1
    assert p.judges.moderation.model == "PKU-Alignment/beaver-dam-7b" and p.judges.moderation.threshold == 0.5
    assert (p.generation.max_new_tokens, p.generation.batch_size) == (512, 16)
    assert (p.data.safety_test_start, p.data.safety_test_end) == (0, 1000)


def test_extends_inherits_and_overrides(tmp_path):
    (tmp_path / "child.yaml").write_text(f"extends: {PARAMS / 'tiny.yaml'}\nprofile: child\nlora: {{r: 2}}\n")
    p = load_params(tmp_path / "child.yaml")
    assert p.profile == "child" and p.lora.r == 2 and p.lora.alpha == load_params(PARAMS / "tiny.yaml").lora.alpha


def test_misspelt_key_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text(f"extends: {PARAMS / 'tiny.yaml'}\nalignment:\n  dpo:\n    learnig_rate: 1e-5\n")
    with pytest.raises(ParamsError, match=r"alignment\.dpo\.learnig_rate.*learning_rate"):
        load_params(tmp_path / "bad.yaml")


def test_misspelt_top_level_section_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("profile: x\ngenration: {max_new_tokens: 3}\n")
    with pytest.raises(ParamsError, match="unknown key genration"):
        load_params(tmp_path / "bad.yaml")


@pytest.mark.parametrize("override, message", [
    ({"lora.dropout": 1.0}, r"lora\.dropout.*out of range"),
    ({"world.unsafe_fraction": 1.5}, r"world\.unsafe_fraction.*\[0\.0, 1\.0\]"),
    ({"lora.r": "eight"}, r"lora\.r: expected an integer"),
    ({"lora.r": 2.5}, r"lora\.r: expected an integer"),
    ({"model.dtype": "float8"}, r"model\.dtype.*float32, bfloat16, float16"),
    ({"alignment.methods": ["sft", "rlhf"]}, r"unknown method 'rlhf'.*dpo"),
    ({"judges.primary": "oracle"}, r"judges\.primary.*moderation, keyword"),
    ({"model.trust_remote_code": "yes"}, r"trust_remote_code: expected true or false"),
    ({"data.safety_val_start": 0}, r"overlap"),
])
def test_bad_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params(PARAMS / "tiny.yaml", override)


def test_scientific_notation_strings_are_numbers():
    assert load_params(PARAMS / "tiny.yaml", {"alignment.dpo.learning_rate": "1e-5"}).alignment.dpo.learning_rate == 1e-5


def test_params_are_frozen():
    p = load_params(PARAMS / "tiny.yaml")
    with pytest.raises(Exception):
        p.seed = 1  # type: ignore[misc]


def test_dump_round_trips(tmp_path):
    p = load_params(PARAMS / "paper_llama3_8b.yaml")
    (tmp_path / "dumped.yaml").write_text(dump_params(p))
    assert load_params(tmp_path / "dumped.yaml") == p


@given(r=st.integers(1, 4096), lr=st.floats(0, 1, allow_nan=False), dropout=st.floats(0, 0.999))
def test_valid_values_round_trip_through_dicts(r, lr, dropout):
    raw = to_dict(load_params(PARAMS / "smoke.yaml"))
    raw["lora"]["r"], raw["alignment"]["dpo"]["learning_rate"], raw["lora"]["dropout"] = r, lr, dropout
    p = params_from_dict(raw)
    assert (p.lora.r, p.alignment.dpo.learning_rate, p.lora.dropout) == (r, lr, dropout)
