"""Unreadable safetensors files are named: the header check and the translation of the library's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nlsr_lib.errors import NlsrError, UnreadableFileError, explain_unreadable_safetensors, safetensors_problem


@pytest.fixture()
def sound(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(16, 8), "b": torch.zeros(3)}, str(path))
    return path


def _cut(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def test_the_header_check_accepts_a_sound_file_and_says_what_is_wrong_with_a_broken_one(sound, tmp_path):
    assert safetensors_problem(sound) is None
    size = sound.stat().st_size
    assert "truncated" in safetensors_problem(_cut(sound, size - 10))
    assert "header announces" in safetensors_problem(_cut(sound, 40))
    assert "fewer than the 8-byte" in safetensors_problem(_cut(sound, 3))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    assert "header announces 1099511627776 bytes" in safetensors_problem(huge)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((4).to_bytes(8, "little") + b"nope")
    assert "not valid JSON" in safetensors_problem(junk)


def test_the_library_errors_are_translated_naming_the_file(sound):
    from safetensors import safe_open

    _cut(sound, sound.stat().st_size // 2)

    def read(path):  # like nlsr_lib.regions.masks.read_tensors: the path is a local of the failing frame
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    for load in (lambda: load_file(str(sound)), lambda: read(sound)):
        with pytest.raises(Exception) as info:
            load()
        explained = explain_unreadable_safetensors(info.value)
        assert isinstance(explained, UnreadableFileError) and isinstance(explained, NlsrError)
        assert explained.path == sound and str(explained).startswith(f"cannot read {sound}: not a complete")
        assert "(SafetensorError)" in str(explained)


def test_a_truncated_model_checkpoint_is_named_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    _cut(weights, weights.stat().st_size // 2)
    with pytest.raises(Exception) as info:
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert explain_unreadable_safetensors(info.value).path == weights


def test_the_run_directory_is_searched_when_no_frame_names_the_file(sound, tmp_path):
    class SafetensorError(Exception):  # the library's error, raised where no local variable holds the path
        pass

    _cut(sound, 20)
    error = SafetensorError("Error while deserializing header: header too large")
    assert explain_unreadable_safetensors(error) is None
    assert explain_unreadable_safetensors(error, search=[tmp_path]).path == sound


def test_other_errors_are_left_alone(sound, tmp_path):
    try:
        load_file(str(sound))["missing"]
    except KeyError as err:
        assert explain_unreadable_safetensors(err, search=[tmp_path]) is None
