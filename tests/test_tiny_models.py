"""Tokenizer, token layout shared by training and inference, LoRA config, adapter I/O and merging."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nlsr_lib.config import LoraConfig, ModelConfig, Params, TinyModelConfig
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.evaluate.generation import generate_responses
from nlsr_lib.models import lora_scaling, merge_adapter, peft_lora_config, read_adapter, write_adapter
from nlsr_lib.tiny.model import encode_pairs, tiny_llama_config, train_tokenizer

TEXTS = [alpaca_prompt(f"How do I bake bread number {i}?") + f"Sure, here is how. Step {i}: mix." for i in range(40)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tok"))


def test_tokenizer_adds_bos_once_and_has_special_tokens(tok):
    ids = tok("hello").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token and tok.pad_token and tok.padding_side == "left"
    assert tok.decode(tok("### Response:Sure").input_ids, skip_special_tokens=True) == "### Response:Sure"


def test_prompt_tokens_are_a_prefix_of_prompt_plus_response(tok):
    """Identical tokens at training and inference (DESIGN.md §6): no merge across "### Response:"."""
    for text in ("Sure, here is how.", "I'm sorry, I can't.", "positive", " The final answer is:  7"):
        prompt = alpaca_prompt("Tell me something.")
        p, pr = tok(prompt).input_ids, tok(prompt + text).input_ids
        assert pr[: len(p)] == p


def test_training_layout_is_bos_prompt_response_eos(tok):
    (seq,) = encode_pairs(tok, [("### Response:", "Sure")], max_length=64)
    assert seq[0] == tok.bos_token_id and seq[-1] == tok.eos_token_id


def _tiny_model(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(tiny_llama_config(cfg, tok)).eval()


def test_batched_left_padded_generation_equals_one_by_one(tok):
    model = _tiny_model(tok)
    prompts = [alpaca_prompt("Hi"), alpaca_prompt("How do I bake bread number 12 at home today?")]
    batched = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=2)
    single = [generate_responses(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_lora_config_matches_the_paper_defaults():
    cfg = peft_lora_config(LoraConfig())
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (128, 256, 0.0)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert lora_scaling({"r": 128, "lora_alpha": 256}) == 2.0


def test_adapter_round_trip_and_merge_equals_w0_plus_kappa_ba(tok, tmp_path):
    from peft import get_peft_model

    model = _tiny_model(tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, peft_lora_config(LoraConfig(r=2, alpha=4)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    state, config = read_adapter(tmp_path / "adapter")
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    assert ".default" not in key and config["r"] == 2
    write_adapter(tmp_path / "copy", state, config)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), read_adapter(tmp_path / "copy")[0].values()))

    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", ModelConfig(device_map="cpu"))
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    a, b = state[key], state[key.replace("lora_A", "lora_B")]
    w0 = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    expected = w0 + lora_scaling(config) * b @ a
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)


def test_nan_adapters_are_refused(tmp_path):
    write_adapter(tmp_path, {"x.lora_A.weight": torch.tensor([[float("nan")]])}, {"r": 1, "lora_alpha": 1})
    with pytest.raises(ValueError, match="NaN or inf"):
        read_adapter(tmp_path)


def test_non_finite_models_and_adapters_are_refused_at_load_by_name(tok, tmp_path):
    """An adapter with NaN weights used to be evaluated (empty generations); the loaders refuse it, naming the
    state-dict key and the directory, and so does generation (``pipeline.generate_for``)."""
    import re

    from peft import get_peft_model

    from nlsr_lib.models import load_causal_lm, load_with_adapter
    from nlsr_lib.runs import Run
    from nlsr_lib.stages.evaluate import ModelRef, generate_for

    cfg = ModelConfig(device_map="cpu")
    model = _tiny_model(tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, peft_lora_config(LoraConfig(r=2, alpha=4)))
    peft_model.save_pretrained(tmp_path / "adapter")
    state, config = read_adapter(tmp_path / "adapter")
    load_with_adapter(tmp_path / "base", tmp_path / "adapter", cfg)  # finite: loads
    key = next(k for k in state if k.endswith("v_proj.lora_B.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    write_adapter(tmp_path / "nan_adapter", state, config)
    pattern = rf"{re.escape(str(tmp_path / 'nan_adapter'))}: tensor {re.escape(key)} contains NaN or inf"
    with pytest.raises(ValueError, match=pattern):
        load_with_adapter(tmp_path / "base", tmp_path / "nan_adapter", cfg)
    params = dataclasses.replace(Params(), model=cfg)
    ref = ModelRef("nan", str(tmp_path / "base"), str(tmp_path / "nan_adapter"), None)
    with pytest.raises(ValueError, match=pattern):
        generate_for(params, Run("test", root=tmp_path / "runs"), ref, [alpaca_prompt("Hi")], 4, "test")
    assert not list((tmp_path / "runs").rglob("*.json"))  # nothing stored for a refused adapter

    bad = _tiny_model(tok)
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[1, 2] = float("inf")
    bad.save_pretrained(tmp_path / "inf_base")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'inf_base'))}: tensor "
                                         r"model\.layers\.0\.mlp\.up_proj\.weight contains NaN or inf"):
        load_causal_lm(tmp_path / "inf_base", cfg)


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        read_adapter(tmp_path)


def test_tokenizer_training_is_deterministic_across_processes(tmp_path):
    """The parallel BPE trainer breaks ties differently per process; training must not depend on it."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys; from nlsr_lib.tiny.model import train_tokenizer; from nlsr_lib.data.templates import alpaca_prompt;"
            "train_tokenizer([alpaca_prompt(f'w{i} x{i%7} y{i%3}') + ' ab ba ab ba' for i in range(300)], 350, sys.argv[1])")
    digests = set()
    for run in range(2):
        out = tmp_path / str(run)
        env = {k: v for k, v in __import__("os").environ.items() if k != "TOKENIZERS_PARALLELISM"}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
        digests.add(hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest())
    assert len(digests) == 1
