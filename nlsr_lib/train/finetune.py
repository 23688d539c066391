"""Downstream (harmful) fine-tuning: the attack of spec nlsr.md §1.1 stage 6 and §1.2.

The attacked model is W_sft + the **aligned LoRA, trained further** on a poisoned mixture (LLaMA-Factory
resumes the adapter when ``create_new_adapter`` is false), so the fine-tuned adapter lives in the same LoRA
parameter space as the aligned and reference adapters. Loss: cross-entropy on response tokens + EOS; the
prompt is the record's ``instruction`` field, which already holds the full Alpaca prompt (§2.4).
``adapter_dir=None`` gives the unaligned baseline: a fresh LoRA on the raw base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..config import TrainConfig
from .alignment import AlignmentMethod, get_method, train_adapter


def mixture_rows(records: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """trl prompt-completion rows of a poisoned mixture (``instruction`` is already an Alpaca prompt)."""
    return [{"prompt": r["instruction"], "completion": r["output"]} for r in records]


def continue_adapter(base_model, adapter_dir: str | Path):
    """The aligned adapter loaded trainable on its base, ready to be trained further."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)


def finetune(base_model, tokenizer, adapter_dir: str | Path | None, records: Sequence[Mapping[str, str]],
             tc: TrainConfig, lora_config, out_dir: Path, dtype: str = "float32", quiet: bool = False,
             key: str = "attack.train", method: AlignmentMethod | None = None) -> dict:
    """Train ``adapter_dir`` further (or a fresh LoRA when None) on ``records``; save the adapter to ``out_dir``.
    The continued adapter's weights are upcast to fp32 for training (PEFT's ``autocast_adapter_dtype``) and saved
    back in :func:`~.alignment.adapter_dtype`; ``key`` names ``tc`` in errors. ``method``: the SFT method to train
    with (default plain SFT; a fine-tuning-stage defence's, :mod:`nlsr_lib.train.defended`)."""
    sft = method or get_method("sft")
    if adapter_dir is None:
        return train_adapter(sft, base_model, tokenizer, mixture_rows(records), tc, lora_config, out_dir, dtype, quiet,
                             key)
    model = continue_adapter(base_model, adapter_dir)
    return train_adapter(sft, model, tokenizer, mixture_rows(records), tc, None, out_dir, dtype, quiet, key)
