"""Shared fixtures: outputs of every test go to a temporary NLSR_HOME, never into the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("NLSR_QUIET", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture()
def one_torch_thread():
    """Torch kernels on one thread for the test (small models run faster and deterministically so)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def nlsr_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NLSR_HOME", str(tmp_path))
    return tmp_path


def tiny_peft_llama(target_modules, seed: int = 0, scale: float = 0.3):
    """A tiny random Llama (hidden 32, 2 layers, vocab 64) with a rank-4 LoRA on ``target_modules`` whose A and B
    are random and nonzero (drawn from ``seed + 1``), in eval mode — for scorer and mask tests."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlsr_lib.regions.lora import lora_matrices

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=list(target_modules))).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_matrices(model):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * scale)
    return model


def random_fusion(model, n_tasks: int = 1):
    """A learned-mask :class:`~nlsr_lib.fusion.learned_mask.Fusion` of ``model``'s LoRA weights (the aligned
    adapter) with ``n_tasks`` random task vectors (std 0.2, seeds 100, 101, ...)."""
    import torch

    from nlsr_lib.fusion.learned_mask import Fusion
    from nlsr_lib.regions.lora import lora_weights

    aligned = lora_weights(model)
    taus = []
    for s in range(n_tasks):
        gen = torch.Generator().manual_seed(100 + s)
        taus.append({k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in aligned.items()})
    return Fusion(aligned, taus)


def tiny_aligned_lora_model(tokenizer, seed: int = 0):
    """A one-layer tiny Llama (hidden 16) for ``tokenizer`` with a nonzero rank-2 LoRA on q/v (B drawn from
    ``seed + 1``, ×0.3): the aligned adapter a fine-tuning-stage defence continues, for trainer tests."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from nlsr_lib.config import TinyModelConfig
    from nlsr_lib.tiny.model import tiny_llama_config

    torch.manual_seed(seed)
    cfg = TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=128)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config(cfg, tokenizer)),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model
