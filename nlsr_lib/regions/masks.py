"""Safety masks on disk and their statistics (DESIGN.md §4 "Masks"; spec nlsr.md §4.1, §9.9).

A mask is one ``.safetensors`` file: key = the LoRA weight's adapter state-dict key
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``), value = a bool tensor of the weight's
shape, True = safety-critical; the string metadata records the scorer, the reference adapter, the sparsity, the
calibration hash and whatever else the stage adds (:func:`mask_metadata`). Masks are always written on CPU and
never pickled. :func:`load_mask` also accepts the reference code's ``…lora_A.default`` key form (spec §11) and
validates the mask against an adapter's state dict or shapes, naming the missing/extra module or both shapes.

Statistics: :func:`density_records` (per matrix), :func:`layer_density_records` (per layer × module type, A and B
together), :func:`overall_density` (kept entries / all masked entries), :func:`intersection` and :func:`jaccard`
between two masks (over all entries; two empty masks have Jaccard 1).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from .lora import normalize_key, parse_key

Shapes = Mapping[str, "torch.Tensor | torch.Size | tuple[int, ...]"]


def atomic_save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, Any]) -> Path:
    """safetensors ``save_file`` to a temporary file beside ``path``, then rename (nothing half-written)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # 0666 & ~umask (not mkstemp 0600); swept if killed
    try:
        save_file(dict(tensors), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata (the counterpart of :func:`atomic_save_tensors`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def mask_metadata(scorer: str, reference: str, mask_sparsity: float | None = None,
                  calibration_hash: str | None = None, **extra: Any) -> dict[str, str]:
    """String metadata of a mask file: scorer, reference, sparsity, calibration hash, plus ``extra``."""
    meta: dict[str, Any] = {"scorer": scorer, "reference": reference}
    if mask_sparsity is not None:
        meta["mask_sparsity"] = mask_sparsity
    if calibration_hash is not None:
        meta["calibration_hash"] = calibration_hash
    meta.update(extra)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


_PROJECTION_ORDER = {name: i for i, name in enumerate(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def natural_order(key: str) -> tuple:
    """Sort key of a LoRA matrix: layer, then q, k, v, o, gate, up, down, then A before B (the model's order;
    safetensors files store keys alphabetically)."""
    p = parse_key(key)
    return (-1 if p["layer"] is None else p["layer"], _PROJECTION_ORDER.get(p["module"], len(_PROJECTION_ORDER)),
            key.rsplit(".lora_", 1)[0], p["matrix"])


def _normalize(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in masks.items():
        norm = normalize_key(key)
        if norm in out:
            raise ValueError(f"mask keys {key!r} and another key both name the matrix {norm!r}")
        out[norm] = value
    return out


def save_mask(path: str | Path, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None,
              ) -> Path:
    """Write ``masks`` (adapter key → bool tensor) as one safetensors file on CPU, atomically."""
    masks = _normalize(masks)
    if not masks:
        raise ValueError("refusing to save an empty mask")
    for key, value in masks.items():
        if value.dtype != torch.bool:
            raise TypeError(f"mask {key}: expected a bool tensor, got {value.dtype}")
    return atomic_save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in masks.items()}, metadata or {})


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def validate_mask(masks: Mapping[str, torch.Tensor], expected: Shapes, *, source: str = "mask") -> None:
    """Raise if ``masks`` does not cover exactly the LoRA matrices of ``expected`` (an adapter state dict or a
    key → shape mapping) with the same shapes; the message names the module and both shapes."""
    want = {normalize_key(k): _shape(v) for k, v in expected.items() if ".lora_A" in k or ".lora_B" in k}
    have = {k: tuple(v.shape) for k, v in masks.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        raise ValueError(f"{source}: no mask for {len(missing)} LoRA matri{'x' if len(missing) == 1 else 'ces'} of "
                         f"the adapter, e.g. {missing[0]} (shape {want[missing[0]]})")
    if extra:
        raise ValueError(f"{source}: {len(extra)} mask entr{'y' if len(extra) == 1 else 'ies'} not in the adapter, "
                         f"e.g. {extra[0]} (shape {have[extra[0]]})")
    for key in sorted(want):
        if have[key] != want[key]:
            raise ValueError(f"{source}: module {key}: mask shape {have[key]} does not match adapter shape "
                             f"{want[key]}")


def load_mask(path: str | Path, expected: Shapes | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(masks, metadata)`` from a mask file, in the model's order (that of ``expected`` if given); with
    ``expected`` (an adapter state dict or key → shape mapping) the mask is validated against it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    masks = _normalize(raw)
    order = [normalize_key(k) for k in expected] if expected is not None else []
    rank = {k: i for i, k in enumerate(order)}
    masks = {k: masks[k] for k in sorted(masks, key=lambda k: (rank.get(k, len(rank)), natural_order(k)))}
    for key, value in masks.items():
        if value.dtype != torch.bool:
            raise TypeError(f"{path}: mask {key} is {value.dtype}, not bool")
    if expected is not None:
        validate_mask(masks, expected, source=str(path))
    return masks, metadata


def density_records(masks: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One record per matrix: key, layer, module, matrix (A/B), kept, total, density (DataFrame-ready)."""
    out = []
    for key, m in masks.items():
        kept, total = int(m.sum()), m.numel()
        out.append({"key": key, **parse_key(key), "kept": kept, "total": total,
                    "density": kept / total if total else 0.0})
    return out


def layer_density_records(masks: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One record per (layer, module type), A and B pooled: layer, module, kept, total, density."""
    groups: dict[tuple, list[int]] = {}
    for rec in density_records(masks):
        g = groups.setdefault((rec["layer"], rec["module"]), [0, 0])
        g[0] += rec["kept"]
        g[1] += rec["total"]
    return [{"layer": layer, "module": module, "kept": kept, "total": total,
             "density": kept / total if total else 0.0} for (layer, module), (kept, total) in groups.items()]


def overall_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Kept fraction over all masked entries."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        raise ValueError("overall_density of an empty mask")
    return sum(int(m.sum()) for m in masks.values()) / total


def _check_same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"the masks cover different matrices ({len(diff)} differ, e.g. {diff[0]})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"module {k}: mask shapes {tuple(a[k].shape)} and {tuple(b[k].shape)} differ")


def intersection(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries True in both masks (elementwise AND, per matrix)."""
    _check_same(a, b)
    return {k: a[k] & b[k] for k in a}


def union(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    _check_same(a, b)
    return {k: a[k] | b[k] for k in a}


def jaccard(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``|a ∩ b| / |a ∪ b|`` over all entries of all matrices (1.0 when both are empty)."""
    _check_same(a, b)
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    uni = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / uni if uni else 1.0
