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
    assert (p.generation.max_new_tokens, p.generation.batch_size) == (512, 256)  # rows cap; the token budget sizes
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
    ({"alignment.methods": ["sft", "rlhf"]},
     r"alignment\.methods\[1\]: unknown alignment method 'rlhf'; registered: sft, dpo, orpo, kto, simpo"),
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


# --------------------------------------------------------------------------------------------- fail early
@pytest.mark.parametrize("yaml_text, message", [
    ("alignment: {dpo: {learning_rate: .inf}}\n", r"alignment\.dpo\.learning_rate: inf is not allowed; expected a"),
    ("pretrain: {learning_rate: -.inf}\n", r"pretrain\.learning_rate: -inf is not allowed"),
    ("alignment: {dpo: {beta: .nan}}\n", r"alignment\.dpo\.beta: nan is not allowed"),
    ("expo: {alphas: [0.1, .inf]}\n", r"expo\.alphas\[1\]: inf is not allowed"),
    ("restore: {tau: 1e999}\n", r"restore\.tau: inf is not allowed"),
])
def test_non_finite_numbers_are_refused(tmp_path, yaml_text, message):
    (tmp_path / "p.yaml").write_text(f"extends: {PARAMS / 'smoke.yaml'}\n{yaml_text}")
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "p.yaml")


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps", "balanced", "sequential"])
def test_supported_device_maps_load(value):
    assert load_params(PARAMS / "smoke.yaml", {"model.device_map": value}).model.device_map == value


@pytest.mark.parametrize("key, value", [("model.device_map", "gpu"), ("model.device_map", "cuda:x"),
                                        ("model.device_map", "none"), ("model.device_map", ""),
                                        ("model.device_map", "CPU"), ("fusion.device", "gpu:0")])
def test_unknown_devices_are_refused_naming_the_allowed_ones(key, value):
    with pytest.raises(ParamsError, match=rf"{key}: '{value}' is not allowed; choose one of .*cpu, cuda, cuda:N"):
        load_params(PARAMS / "smoke.yaml", {key: value})


@pytest.mark.parametrize("key", ["fusion.method", "ablation.method"])
def test_fused_and_ablated_methods_must_be_aligned(key):
    overrides = {"alignment.methods": ["sft", "dpo"], "expo.methods": ["sft", "dpo"], "fusion.method": "dpo",
                 "ablation.method": "dpo", key: "kto"}
    with pytest.raises(ParamsError, match=rf"{key}: 'kto' is not among alignment\.methods \['sft', 'dpo'\]"):
        load_params(PARAMS / "smoke.yaml", overrides)


def test_lora_targets_that_match_no_module_are_named_with_the_available_ones():
    message = (r"lora\.target_modules: 'qproj', 'mlp\.q_proj' match no module of tiny; "
               r"its adaptable modules are embed_tokens, q_proj, k_proj, .*down_proj, lm_head")
    with pytest.raises(ParamsError, match=message):
        load_params(PARAMS / "smoke.yaml", {"lora.target_modules": ["q_proj", "qproj", "mlp.q_proj"]})
    # PEFT's list rule: a name or a dotted suffix of the full module path
    p = load_params(PARAMS / "smoke.yaml", {"lora.target_modules": ["self_attn.q_proj", "model.layers.1.mlp.up_proj"]})
    assert p.lora.target_modules == ("self_attn.q_proj", "model.layers.1.mlp.up_proj")


def test_the_known_llama_layout_is_what_transformers_builds():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlsr_lib.config import model_module_names

    tiny = load_params(PARAMS / "smoke.yaml").model
    cfg = LlamaConfig(vocab_size=64, hidden_size=tiny.tiny.hidden_size, intermediate_size=tiny.tiny.intermediate_size,
                      num_hidden_layers=tiny.tiny.num_hidden_layers, num_attention_heads=tiny.tiny.num_attention_heads,
                      num_key_value_heads=tiny.tiny.num_key_value_heads, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    built = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert set(model_module_names(tiny)) == built


def test_lora_targets_of_a_local_model_are_checked_from_its_config(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    llama, gpt2 = tmp_path / "llama", tmp_path / "gpt2"
    LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=64).save_pretrained(llama)
    GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64).save_pretrained(gpt2)
    assert load_params(PARAMS / "smoke.yaml", {"model.name": str(llama)}).lora.target_modules[0] == "q_proj"
    with pytest.raises(ParamsError, match=r"'q_proj', 'k_proj'.* match no module of .*gpt2; .*c_attn, c_proj"):
        load_params(PARAMS / "smoke.yaml", {"model.name": str(gpt2)})  # built on the meta device
    assert load_params(PARAMS / "smoke.yaml", {"model.name": str(gpt2), "lora.target_modules": ["c_attn"]})


def test_lora_targets_of_a_hub_model_not_on_this_machine_are_not_checked():
    from nlsr_lib.config import model_module_names

    p = load_params(PARAMS / "paper_llama3_8b.yaml", {"model.name": "nobody/not-downloaded-7b",
                                                      "lora.target_modules": ["anything"]})
    assert model_module_names(p.model) is None and p.lora.target_modules == ("anything",)


def test_yaml_syntax_errors_name_the_file_and_line_also_through_extends(tmp_path):
    (tmp_path / "parent.yaml").write_text("profile: p\nlora: {r: 4\nseed: 1\n")  # unclosed flow mapping
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nprofile: c\n")
    with pytest.raises(ParamsError, match=rf"{tmp_path / 'parent.yaml'}, line \d+, column \d+: invalid YAML: .*"
                                          rf"\(extended by {tmp_path / 'child.yaml'}\)"):
        load_params(tmp_path / "child.yaml")
    (tmp_path / "tab.yaml").write_text("profile: t\nlora:\n\tr: 4\n")
    with pytest.raises(ParamsError, match=rf"{tmp_path / 'tab.yaml'}, line 3, column 1: invalid YAML"):
        load_params(tmp_path / "tab.yaml")


# --------------------------------------------------------------------------------------------- where a params file is
def test_a_relative_params_path_is_relative_to_the_repository_root(tmp_path, monkeypatch):
    from nlsr_lib.config import resolve_params_path
    from nlsr_lib.paths import PROJECT_ROOT

    monkeypatch.chdir(tmp_path)  # e.g. papermill started from anywhere, or a kernel in notebooks/
    assert resolve_params_path("params/smoke.yaml") == PROJECT_ROOT / "params" / "smoke.yaml"
    assert load_params("params/smoke.yaml").profile == "smoke"
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "smoke.yaml").write_text("profile: impostor\n")
    assert load_params("params/smoke.yaml").profile == "smoke"  # the root wins over the current directory
    monkeypatch.chdir(PROJECT_ROOT / "notebooks")
    assert load_params("params/smoke.yaml").profile == "smoke"  # the notebooks' default, from their folder
    with pytest.raises(ParamsError, match=r"params file not found: params/nope\.yaml \(looked for .*relative to "
                                          r"the repository root"):
        load_params("params/nope.yaml")


def test_extends_is_relative_to_the_file_that_contains_it(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "exp" / "deep").mkdir(parents=True)
    (tmp_path / "base" / "parent.yaml").write_text(f"extends: {PARAMS / 'smoke.yaml'}\nlora: {{r: 2}}\n")
    (tmp_path / "exp" / "deep" / "child.yaml").write_text("extends: ../../base/parent.yaml\nprofile: child\n")
    monkeypatch.chdir(PARAMS)
    p = load_params(tmp_path / "exp" / "deep" / "child.yaml")
    assert (p.profile, p.lora.r, p.lora.alpha) == ("child", 2, 8)
    (tmp_path / "exp" / "orphan.yaml").write_text("extends: parent.yaml\n")
    with pytest.raises(ParamsError, match=r"extends: parent\.yaml: params file not found: .*exp/parent\.yaml"):
        load_params(tmp_path / "exp" / "orphan.yaml")
