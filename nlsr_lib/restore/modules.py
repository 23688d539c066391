"""LoRA modules of an adapter state dict, and the checks every restoration runs first (DESIGN.md §4, §7).

An adapter state dict (``nlsr_lib.models.read_adapter``) holds, per adapted linear map ("module"), two tensors
``<module>.lora_A.weight`` (``A``, r×d_in) and ``<module>.lora_B.weight`` (``B``, d_out×r); spec/nlsr.md §0.
Modules are ordered as the reference code iterates them: decoder layers 0, 1, … and within a layer q, k, v, o,
gate, up, down (spec §0), whatever order the file stored them in.

A mask (DESIGN.md §4) is a dict with the adapter's keys and a bool tensor of each weight's shape, True =
safety-critical. Keys in the reference code's forms (``…lora_A.default`` or ``…lora_A.default.weight``) are
accepted and mapped to the adapter form (spec §11).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import SEVEN_PROJECTIONS
from ..regions.lora import layer_index, normalize_key, split_key

_SHOWN = 5


class RestoreError(ValueError):
    """Adapters or a mask that cannot be compared entry by entry; the message names the keys and shapes."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear map: its name (the key prefix), decoder layer and projection type."""

    name: str
    layer: int | None
    module_type: str

    @property
    def key_a(self) -> str:
        return f"{self.name}.lora_A.weight"

    @property
    def key_b(self) -> str:
        return f"{self.name}.lora_B.weight"


def _order(module: LoraModule) -> tuple:
    kind = module.module_type
    proj = SEVEN_PROJECTIONS.index(kind) if kind in SEVEN_PROJECTIONS else len(SEVEN_PROJECTIONS)
    return (module.layer is None, module.layer or 0, proj, module.name)


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def lora_modules(state: Mapping[str, torch.Tensor], what: str = "adapter") -> list[LoraModule]:
    """The modules of ``state`` in model order; every key must be a LoRA factor with its partner present and
    ``A`` (r×d_in), ``B`` (d_out×r) must agree on the rank r."""
    factors: dict[str, set[str]] = {}
    for key in state:
        split = split_key(key)
        if split is None:
            raise RestoreError(f"{what}: key {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' or "
                               "'<module>.lora_B.weight'); restoration works on LoRA adapters only")
        factors.setdefault(split[0], set()).add(split[1])
    modules = []
    for name, present in factors.items():
        if present != {"A", "B"}:
            missing = f"{name}.lora_{'B' if 'A' in present else 'A'}.weight"
            raise RestoreError(f"{what}: module {name} has no partner factor: {missing} is missing")
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise RestoreError(f"{what}: module {name} has inconsistent factors: lora_A {tuple(a.shape)} "
                               f"(expected r×d_in) and lora_B {tuple(b.shape)} (expected d_out×r)")
        modules.append(LoraModule(name, layer_index(f"{name}."), name.rsplit(".", 1)[-1]))
    if not modules:
        raise RestoreError(f"{what}: no LoRA factors found")
    return sorted(modules, key=_order)


def check_pair(finetuned: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
               names: tuple[str, str] = ("fine-tuned adapter", "reference adapter")) -> list[LoraModule]:
    """The shared modules of two adapters that must match key for key, rank for rank and shape for shape."""
    modules = lora_modules(finetuned, names[0])
    lora_modules(reference, names[1])
    only_f, only_r = set(finetuned) - set(reference), set(reference) - set(finetuned)
    if only_f or only_r:
        parts = [f"missing from the {names[1]}: {_names(only_f)}" if only_f else "",
                 f"missing from the {names[0]}: {_names(only_r)}" if only_r else ""]
        raise RestoreError(f"the {names[0]} and the {names[1]} have different module sets; "
                           + "; ".join(p for p in parts if p))
    for m in modules:
        rank_f, rank_r = finetuned[m.key_a].shape[0], reference[m.key_a].shape[0]
        if rank_f != rank_r:
            raise RestoreError(f"module {m.name}: different LoRA ranks, {names[0]} r={rank_f}, {names[1]} r={rank_r}")
        for key in (m.key_a, m.key_b):
            if finetuned[key].shape != reference[key].shape:
                raise RestoreError(f"module {m.name}: shape mismatch for {key}: {names[0]} "
                                   f"{tuple(finetuned[key].shape)}, {names[1]} {tuple(reference[key].shape)}")
    return modules


def canonical_mask_key(key: str) -> str:
    """``…lora_A.default`` / ``…lora_A.default.weight`` (reference code, PEFT names) → ``…lora_A.weight``
    (:func:`~nlsr_lib.regions.lora.normalize_key`); a key that names no LoRA matrix is returned unchanged, for
    :func:`check_mask` to report."""
    try:
        return normalize_key(key)
    except ValueError:
        return key


def check_mask(mask: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mask with adapter-form keys, after checking it covers exactly the adapter's keys with bool tensors of
    the weights' shapes."""
    out = {canonical_mask_key(k): v for k, v in mask.items()}
    if len(out) != len(mask):
        raise RestoreError("mask: two keys name the same LoRA factor (with and without '.default')")
    missing, extra = set(state) - set(out), set(out) - set(state)
    if missing or extra:
        parts = [f"keys missing from the mask: {_names(missing)}" if missing else "",
                 f"mask keys that are not in the adapter: {_names(extra)}" if extra else ""]
        raise RestoreError("the mask and the adapter have different module sets; " + "; ".join(p for p in parts if p))
    for key, m in out.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise RestoreError(f"mask {key}: expected a bool tensor, got "
                               f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.shape != state[key].shape:
            raise RestoreError(f"mask {key}: shape {tuple(m.shape)} does not match the weight's shape "
                               f"{tuple(state[key].shape)}")
    return out


def check_finite(state: Mapping[str, torch.Tensor], what: str = "adapter") -> None:
    """Refuse NaN/inf weights, naming the first offending key (the max of |x| is finite iff every entry is)."""
    for key, tensor in state.items():
        if tensor.numel() and not torch.isfinite(tensor.detach().abs().amax()):
            raise RestoreError(f"{what}: tensor {key} contains NaN or inf values")
