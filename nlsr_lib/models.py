"""Model and adapter I/O shared by every profile (DESIGN.md §3-4).

* :func:`load_causal_lm` / :func:`load_tokenizer`: a hub id or a local directory; dtype and device map from
  params; ``trust_remote_code`` stays off unless the profile turns it on.
* :func:`peft_lora_config`: LoRA of spec/nlsr.md §1.2 (r, alpha, dropout, the seven projections).
* :func:`merge_adapter`: ``W_sft = W0 + kappa * B A`` written as a standalone model (spec/nlsr.md §1.1 stage 1).
* :func:`read_adapter` / :func:`write_adapter`: PEFT adapter state dicts in safetensors, without a base model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def resolve_device_map(device_map: str) -> str | None:
    """``auto`` means "spread over GPUs"; on a CPU-only machine it is plain CPU placement (None)."""
    if device_map == "auto" and not torch.cuda.is_available():
        return None
    return None if device_map == "cpu" else device_map


def load_tokenizer(path_or_id: str | Path, cfg: ModelConfig | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=bool(cfg and cfg.trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` (a file or directory) and the key of the first tensor holding NaN or
    inf. One reduction per floating tensor, on its own device; tensors without storage (``meta``) are skipped."""
    for key, tensor in tensors:
        if tensor.is_floating_point() and tensor.numel() and tensor.device.type != "meta" \
                and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: tensor {key} contains NaN or inf values")


def load_causal_lm(path_or_id: str | Path, cfg: ModelConfig):
    """A causal LM from a hub id or local directory, in ``cfg.dtype`` and eval mode; NaN/inf weights are refused
    (:func:`check_finite`, naming the parameter)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path_or_id), dtype=DTYPES[cfg.dtype], device_map=distributed.device_map(resolve_device_map(cfg.device_map)),
        trust_remote_code=cfg.trust_remote_code,
    )
    with torch.no_grad():
        check_finite(model.named_parameters(), f"model {path_or_id}")
    return model.eval()


def peft_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none")


def load_with_adapter(base_dir: str | Path, adapter_dir: str | Path | None, cfg: ModelConfig):
    """Base model (W_sft or the raw base) with an adapter on top as a PeftModel (not merged), eval mode; NaN/inf
    weights in either are refused, naming the tensor (the adapter's by its key in the adapter file)."""
    model = load_causal_lm(base_dir, cfg)
    if adapter_dir is None:
        return model
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        check_finite(get_peft_model_state_dict(model).items(), f"adapter {adapter_dir}")
    return model


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, cfg: ModelConfig) -> None:
    """Write ``W0 + kappa * B A`` for every adapted module as a standalone model with its tokenizer."""
    model = load_with_adapter(base_dir, adapter_dir, cfg).merge_and_unload()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(base_dir, cfg).save_pretrained(str(out_dir))


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's state dict (keys ``...lora_{A|B}.weight``) and its config, without any base model."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory: {ADAPTER_WEIGHTS} is missing")
    state = load_file(str(weights))
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    check_finite(state.items(), f"adapter {adapter_dir}")
    return state, config


def write_adapter(adapter_dir: str | Path, state: Mapping[str, torch.Tensor], config: Mapping) -> None:
    """Write a PEFT adapter directory (safetensors + adapter_config.json) loadable by PeftModel."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(adapter_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, default=list) + "\n")


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy the tokenizer files of adapter directory ``src_dir`` (those of ``TOKENIZER_FILES`` it has) into
    ``dst_dir``, so a written adapter loads with the tokenizer it was trained with."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst_dir / name)


def lora_scaling(config: Mapping) -> float:
    """kappa = lora_alpha / r (or / sqrt(r) with rsLoRA), spec/nlsr.md §0."""
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
