"""No silent NaN in training (issue "Jupyter experience and reliability", item 6): every training loop stops with
a ``FloatingPointError`` naming what was training, the step and the loss when the loss is NaN or inf — the trl
alignment trainers, the tiny pretraining, the tiny moderation judge (and the learned mask, tests/test_learned_mask.py).
Tiny models, a few steps, a learning rate of 1e30 to make the loss diverge."""

from __future__ import annotations

import math

import pytest
import torch

from nlsr_lib.config import LoraConfig, ModerationConfig, PretrainConfig, TinyModelConfig, TrainConfig
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.train.guards import check_finite_loss

TEXTS = [alpaca_prompt(f"How do I bake bread number {i}?") + f"Sure, here is how. Step {i}: mix." for i in range(40)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nlsr_lib.tiny.model import train_tokenizer

    return train_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tok"))


def _tiny_model(tok):
    from transformers import LlamaForCausalLM

    from nlsr_lib.tiny.model import tiny_llama_config

    torch.manual_seed(0)
    cfg = TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(tiny_llama_config(cfg, tok))


def test_check_finite_loss_names_where_step_and_value():
    assert check_finite_loss(torch.tensor(0.25), "x", 1) == 0.25 and check_finite_loss(2, "x", 1) == 2.0
    for bad in (float("nan"), float("inf"), torch.tensor(-math.inf)):
        with pytest.raises(FloatingPointError, match=r"tiny pretraining: non-finite training loss (nan|inf|-inf) "
                                                     r"at step 7"):
            check_finite_loss(bad, "tiny pretraining", 7)


def test_tiny_pretraining_stops_on_a_diverging_loss(tok):
    from nlsr_lib.tiny.model import pretrain

    pairs = [(alpaca_prompt(f"Q{i}"), f"answer {i}") for i in range(8)]
    cfg = PretrainConfig(steps=4, batch_size=4, learning_rate=1e30, warmup_steps=0, max_length=64)
    with pytest.raises(FloatingPointError, match=r"tiny pretraining: non-finite training loss .* at step [2-4]"):
        pretrain(_tiny_model(tok), tok, pairs, cfg, seed=0)


def test_tiny_moderation_training_stops_on_a_diverging_loss(tok, tmp_path):
    from nlsr_lib.tiny.judge import train_tiny_moderation

    from nlsr_lib.tiny.world import HARM_CATEGORIES

    rows = [{"text": TEXTS[i], "labels": [float(i % 2)] + [0.0] * (len(HARM_CATEGORIES) - 1)} for i in range(16)]
    cfg = ModerationConfig(train_steps=4, train_batch_size=4, learning_rate=1e30, hidden_size=16,
                           num_hidden_layers=1, max_length=64)
    with pytest.raises(FloatingPointError, match=r"tiny moderation: non-finite training loss .* at step [2-4]"):
        train_tiny_moderation(tok, rows, rows[:4], cfg, seed=0, out_dir=tmp_path / "judge")
    assert not (tmp_path / "judge").exists()  # nothing saved


def test_alignment_trainer_stops_on_a_diverging_loss(tok, tmp_path):
    from nlsr_lib.models import peft_lora_config
    from nlsr_lib.train.alignment import get_method, train_adapter

    rows = [{"prompt": alpaca_prompt(f"How do I bake bread number {i}?"), "completion": f"Sure. Step {i}: mix."}
            for i in range(8)]
    lora = peft_lora_config(LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    tc = TrainConfig(learning_rate=1e30, max_steps=4, batch_size=2, scheduler="constant", warmup_ratio=0.0,
                     max_length=64)
    with pytest.raises(FloatingPointError, match=r"sft alignment \((train_)?loss\): non-finite training loss "
                                                 r"(nan|inf) at step \d"):
        train_adapter(get_method("sft"), _tiny_model(tok), tok, rows, tc, lora, tmp_path / "adapter", quiet=True)
    assert not (tmp_path / "adapter").exists()  # no adapter of NaN weights written
