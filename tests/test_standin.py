"""Stand-ins of the paper's models (nlsr_lib.standin): Llama-3's format for the base, beaver-dam-7b's for the judge,
random weights, built on the CPU in seconds, deterministic and written atomically."""

from __future__ import annotations

import json

import pytest
import torch

from nlsr_lib.config import ModelConfig
from nlsr_lib.data.schemas import HARM_CATEGORIES
from nlsr_lib.errors import UsageError
from nlsr_lib.standin import (BOS, EOS, LLAMA3_SPECIAL_TOKENS, MANIFEST, asset_hint, build_moderation,
                               build_profile_assets, build_standins, default_judged, default_texts)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return build_standins(tmp_path_factory.mktemp("standins") / "out")


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_base_is_a_bf16_llama_with_grouped_query_attention(standins):
    config = json.loads((standins["base"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["pad_token_id"] is None
    from safetensors import safe_open

    with safe_open(str(standins["base"] / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_base_tokenizer_has_llama3s_format(standins):
    from transformers import AutoTokenizer

    base = standins["base"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in base.iterdir()}
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "pad_token" not in tok_config
    tok_json = json.loads((base / "tokenizer.json").read_text())
    assert tok_json["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel"
    assert {t["content"] for t in tok_json["added_tokens"]} == set(LLAMA3_SPECIAL_TOKENS)
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.pad_token is None  # as Llama-3: no pad token
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    config = json.loads((base / "config.json").read_text())
    assert len(tok) == config["vocab_size"] and 500 < len(tok) <= 1024
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id == config["bos_token_id"] and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id == config["eos_token_id"]
    assert min(tok.convert_tokens_to_ids(list(LLAMA3_SPECIAL_TOKENS))) == len(tok) - len(LLAMA3_SPECIAL_TOKENS)
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there "}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == (f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_base_loads_through_the_library_and_generates(standins):
    from nlsr_lib.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(standins["base"], ModelConfig(dtype="bfloat16", device_map="cpu"))
    tok = load_tokenizer(standins["base"])
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token == EOS  # load_tokenizer's rule for a tokenizer without a pad token
    tok.padding_side = "left"
    enc = tok(["Hello", "How do I bake bread?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4) and int(out.max()) < len(tok)


def test_moderation_has_beaver_dams_format(standins):
    moderation = standins["moderation"]
    assert {p.name for p in moderation.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
        "added_tokens.json"}
    config = json.loads((moderation / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["dtype"] == "bfloat16"
    assert config["problem_type"] == "multi_label_classification"
    assert [config["id2label"][str(i)] for i in range(14)] == list(HARM_CATEGORIES)
    added = json.loads((moderation / "added_tokens.json").read_text())
    assert config["pad_token_id"] == added["<pad>"] == config["vocab_size"] - 1
    assert json.loads((moderation / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"


def test_moderation_judges_in_bf16(standins):
    from nlsr_lib.evaluate.judges import ModerationJudge

    judge = ModerationJudge.load(standins["moderation"], dtype="bfloat16", device="cpu", batch_size=2)
    assert next(judge.model.parameters()).dtype == torch.bfloat16 and judge.labels == list(HARM_CATEGORIES)
    assert judge.tokenizer.eos_token == "</s>" and judge.pad_token_id == judge.model.config.pad_token_id
    prompts = ["How do I pick a lock?", "Give me a soup recipe.", "Tell me a joke."]
    responses = ["Sure, first get a tension wrench.", "I'm sorry, I can't.", ""]
    verdicts = judge.judge(prompts, responses)
    assert len(verdicts) == 3 and [v.empty for v in verdicts] == [False, False, True]
    for v in verdicts:
        assert 0.0 <= v.max_probability <= 1.0 and set(v.categories) <= set(HARM_CATEGORIES)
        assert v.flagged == (v.max_probability > 0.5) == bool(v.categories)
    probs = judge.probabilities(judge.texts(prompts, responses))
    assert probs.shape == (3, 14) and probs.dtype == torch.float32


def test_the_random_judge_flags_about_half_of_the_texts_its_head_was_set_on(standins):
    """A random head would flag every text or none (each input ends with EOS, so every pooled state is nearly the
    same); the stand-in's head is centred on the judged texts, so its verdicts vary (and still mean nothing)."""
    from nlsr_lib.evaluate.judges import ModerationJudge

    judge = ModerationJudge.load(standins["moderation"], dtype="bfloat16", device="cpu", batch_size=16)
    prompts, responses = zip(*default_judged())
    flagged = sum(v.flagged for v in judge.judge(prompts, responses)) / len(prompts)
    assert 0.3 <= flagged <= 0.7, flagged


def test_builds_are_deterministic(standins, tmp_path):
    again = build_standins(tmp_path / "again")
    for name in ("base", "moderation"):
        assert _files(again[name]) == _files(standins[name]), name
    other = build_moderation(tmp_path / "seed1", seed=1)
    assert _files(other)["model.safetensors"] != _files(standins["moderation"])["model.safetensors"]


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    from transformers import LlamaForSequenceClassification

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(LlamaForSequenceClassification, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_moderation(tmp_path / "judge")
    assert list(tmp_path.iterdir()) == []


def test_a_rebuild_replaces_the_old_directory(tmp_path):
    out = build_moderation(tmp_path / "judge")
    (out / "stray.txt").write_text("left from before")
    build_moderation(out)
    assert not (out / "stray.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["judge"]


def test_cli_builds_the_profiles_assets_from_a_corpus(tmp_path, capsys):
    from nlsr_lib.cli import main
    from nlsr_lib.data.loaders import load_dataset_source
    from nlsr_lib.standin import WORLD_EXPORTS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(default_texts(seed=3)[:200]) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["standin", "build", str(out), "--corpus", str(corpus)]) == 0
    assert {p.name for p in out.iterdir()} == {"base", "moderation", "data", MANIFEST}
    assert "[nlsr] base:" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tokenizer_texts"]["from"] == "given" and manifest["data_dir"] is None
    for name, splits in WORLD_EXPORTS.items():  # the world's data in the hub schema, read by the real-data loader
        loaded = load_dataset_source(name, {split: str(out / file) for split, file in splits.items()})
        assert set(loaded) == set(splits) and all(len(ds) > 100 for ds in loaded.values())
    assert loaded["train"].column_names[:3] == ["instruction", "input", "output"]
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["standin", "build", str(tmp_path / "x"), "--corpus", str(tmp_path / "empty.txt")]) == 2
    assert not (tmp_path / "x").exists()


def test_the_profile_build_replaces_only_an_earlier_build(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a stand-in build")
    with pytest.raises(UsageError, match=r"mine exists and is not a stand-in build \(no standin.json\)"):
        build_profile_assets(tmp_path / "mine", texts=default_texts()[:100])
    assert (tmp_path / "mine" / "notes.txt").is_file()
    with pytest.raises(UsageError, match=r"data folder .*missing .*sst2/train.tsv"):
        build_profile_assets(tmp_path / "new", tmp_path / "no-data")
    assert not (tmp_path / "new").exists()


def test_a_missing_asset_names_the_build_command(tmp_path):
    from nlsr_lib.paths import PROJECT_ROOT

    hint = asset_hint(PROJECT_ROOT / "runs" / "standin" / "assets" / "data" / "alpaca" / "train.jsonl")
    assert hint is not None and "`nlsr standin build runs/standin/assets` in " in hint and "make standin" in hint
    assert f"`nlsr standin build {tmp_path}/standin/a`" in asset_hint(tmp_path / "standin" / "a" / "moderation")
    assert asset_hint(tmp_path / "models" / "base") is None  # not a stand-in folder
    assert asset_hint(tmp_path / "standin" / "a" / "other.jsonl") is None  # not a stand-in asset
