"""The LoRA matrices of a ``peft.PeftModel`` and their adapter-file keys (DESIGN.md §4, spec nlsr.md §0).

A LoRA module ``m`` (a PEFT ``LoraLayer`` such as ``…layers.3.self_attn.q_proj``) holds two ``nn.Linear``
matrices per adapter: ``lora_A[adapter]`` (``A ∈ R^{r×d_in}``) and ``lora_B[adapter]`` (``B ∈ R^{d_out×r}``).
Every mask, score and subspace of :mod:`nlsr_lib.regions` is keyed by the matrix's **adapter state-dict key**,
the name PEFT writes to ``adapter_model.safetensors``: ``base_model.model.model.layers.{i}.{self_attn|mlp}.
{proj}.lora_{A|B}.weight`` (no adapter name). :func:`lora_matrices` lists them in ``named_modules`` order
(layers in order; q, k, v, o, gate, up, down within a layer; A before B), the order of the reference code.

This module is the one home of LoRA key parsing (:data:`KEY`): :func:`split_key` (the adapter-file form only),
:func:`normalize_key` (every form the reference code writes too), :func:`parse_key` (layer, module type, matrix),
:func:`layer_index`; restoration, fusion and the mask files use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
"""A LoRA matrix key in any form: ``<module>.lora_{A|B}[.<adapter name>][.weight]``."""
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraMatrix:
    """One LoRA matrix of a PeftModel: its adapter key, its owning LoRA module and the ``nn.Linear`` itself."""

    key: str
    side: str  # "A" or "B"
    module_name: str  # e.g. base_model.model.model.layers.0.self_attn.q_proj
    lora_layer: torch.nn.Module  # the PEFT LoraLayer (owns lora_A / lora_B)
    linear: torch.nn.Linear  # lora_A[adapter] or lora_B[adapter]

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.linear.weight


def adapter_key(module_name: str, side: str) -> str:
    """The adapter state-dict key of a LoRA module's A or B matrix."""
    if side not in ("A", "B"):
        raise ValueError(f"LoRA side must be 'A' or 'B', got {side!r}")
    return f"{module_name}.lora_{side}.weight"


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` of an adapter-file key ``<module>.lora_{A|B}.weight``; None for any other key
    (including the other forms of a LoRA key, which :func:`normalize_key` maps to this one)."""
    match = KEY.match(key)
    if match is None or key != adapter_key(match["module"], match["side"]):
        return None
    return match["module"], match["side"]


def normalize_key(key: str) -> str:
    """``…lora_A.weight``, ``…lora_A.default.weight`` and ``…lora_A.default`` (the reference code's mask keys,
    spec §4.1) all name the same matrix; return the adapter-file form ``…lora_A.weight``."""
    match = KEY.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a LoRA matrix key (expected …lora_A.weight or …lora_B.weight)")
    return adapter_key(match["module"], match["side"])


def parse_key(key: str) -> dict:
    """``{"layer": int | None, "module": "q_proj", "matrix": "A"}`` from an adapter key (DataFrame-ready)."""
    match = KEY.match(key)
    if not match:
        raise ValueError(f"{key!r} is not a LoRA matrix key (expected …lora_A.weight or …lora_B.weight)")
    layer = _LAYER_RE.search(match["module"])
    return {"layer": int(layer.group(1)) if layer else None, "module": match["module"].rsplit(".", 1)[-1],
            "matrix": match["side"]}


def _active_adapter(layer: torch.nn.Module) -> str:
    active = list(getattr(layer, "active_adapters", None) or [])
    if len(active) != 1:
        raise ValueError(f"region scoring needs exactly one active LoRA adapter, found {active}")
    return active[0]


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(module_name, LoraLayer)`` for every LoRA module of ``model`` holding the active adapter."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = _active_adapter(module)
            if adapter in module.lora_A:
                out.append((name, module))
    if not out:
        raise ValueError("the model has no LoRA modules: load the reference adapter as a peft.PeftModel")
    return out


def lora_matrices(model: torch.nn.Module) -> list[LoraMatrix]:
    """Every LoRA matrix (A then B of each module) of the active adapter, in ``named_modules`` order."""
    out = []
    for name, layer in lora_modules(model):
        adapter = _active_adapter(layer)
        for side, linears in (("A", layer.lora_A), ("B", layer.lora_B)):
            out.append(LoraMatrix(adapter_key(name, side), side, name, layer, linears[adapter]))
    return out


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{adapter key: fp32 CPU copy of the weight}`` (the adapter state dict, read from the live model)."""
    return {m.key: m.weight.detach().float().cpu().clone() for m in lora_matrices(model)}


def lora_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {m.key: tuple(m.weight.shape) for m in lora_matrices(model)}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list of a (Peft) causal LM: the ``ModuleList`` whose name ends with ``layers`` and
    that contains LoRA modules (``model.model.layers`` for Llama, Mistral, Qwen2)."""
    names = {name for name, _ in lora_modules(model)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
            if any(n.startswith(f"{name}.") for n in names):
                return module
    raise ValueError("could not find the decoder layers (a ModuleList named '…layers') of the model")


def layer_index(key_or_name: str) -> int | None:
    """The decoder layer ``i`` of a key or module name containing ``layers.{i}.``, or None."""
    match = _LAYER_RE.search(key_or_name)
    return int(match.group(1)) if match else None
