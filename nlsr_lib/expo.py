"""EXPO: a stronger safety reference by extrapolation (spec nlsr.md §3; DESIGN.md §6 "EXPO").

``paper`` (default, arXiv 2404.16792): ``θ_expo = θ_sft + (1+α)(θ_aligned − θ_sft)``. The aligned update of a
LoRA module is ``ΔW = κ·B·A``, so extrapolating it scales **B only** by ``1+α`` (``ΔW' = (1+α)·ΔW``; α = 0 is
the identity). ``factor_scaling`` reproduces the reference code: every LoRA tensor (A and B) is multiplied by
``2α``, so ``ΔW' = 4α²·ΔW`` (α = 0.5 is the identity, α = 0.9 gives ×3.24).

Works on adapter files alone: the base model is never loaded. For the ``sft`` method θ_sft is the raw base
and the adapter is the SFT LoRA itself; for preference methods it is W_sft and the method's LoRA.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .models import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, write_adapter

EXPO_MODES = ("paper", "factor_scaling")


def expo_factors(alpha: float, mode: str) -> tuple[float, float]:
    """(scale of lora_A, scale of lora_B) for ``alpha`` under ``mode``."""
    if mode not in EXPO_MODES:
        raise ValueError(f"unknown EXPO mode {mode!r}; allowed: {', '.join(EXPO_MODES)}")
    if not alpha >= 0:
        raise ValueError(f"EXPO alpha must be >= 0, got {alpha!r}")
    return (1.0, 1.0 + alpha) if mode == "paper" else (2.0 * alpha, 2.0 * alpha)


def expo_state(state: Mapping[str, torch.Tensor], alpha: float, mode: str = "paper") -> dict[str, torch.Tensor]:
    """The extrapolated adapter state dict (keys ``…lora_{A|B}.weight``), computed in fp32, stored in the
    tensors' own dtype."""
    scale_a, scale_b = expo_factors(alpha, mode)
    out = {}
    for key, tensor in state.items():
        if ".lora_A." in key:
            scale = scale_a
        elif ".lora_B." in key:
            scale = scale_b
        else:
            raise ValueError(f"EXPO expects LoRA factors only; adapter key {key!r} is neither lora_A nor lora_B")
        out[key] = (tensor.float() * scale).to(tensor.dtype)
    return out


def expo_adapter(adapter_dir: str | Path, out_dir: str | Path, alpha: float, mode: str = "paper") -> Path:
    """Write the EXPO adapter of ``adapter_dir`` to ``out_dir`` (same config; tokenizer files copied)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    state, config = read_adapter(adapter_dir)
    write_adapter(out_dir, expo_state(state, alpha, mode), config)
    for extra in adapter_dir.iterdir():
        if extra.is_file() and extra.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy2(extra, out_dir / extra.name)
    return out_dir


def choose_alpha(val_scores: dict[float, float]) -> float:
    """The alpha with the lowest validation harmful score; ties go to the smallest alpha (least extrapolation)."""
    if not val_scores:
        raise ValueError("choose_alpha needs at least one (alpha, harmful score) pair")
    return min(sorted(val_scores), key=lambda a: val_scores[a])
