"""Fusion inside (or outside) safety regions, at neuron, rank and attention-head level (spec/merging.md §5.3 item 3,
§3.2-3.3; DESIGN.md §2 notebook 06, §4 masks).

All three restrict **the merged update** ``Δ = Merge({τ_t})`` of factor-space task vectors
(``τ_t = θ_t − θ_aligned`` per ``lora_A``/``lora_B`` key, :mod:`.lora`) and return
``θ' = θ_aligned + R(Δ)``. The operator itself sees the full task vectors (its statistics — TIES thresholds, sign
election, TALL masks — are those of the unrestricted merge); only where its update lands is restricted, so the
property "nothing changes outside the region" holds exactly for every operator.

* **neuron level** (:func:`restrict_to_mask`): with a boolean mask ``m`` per key (True = safety-critical,
  DESIGN.md §4) ``R(Δ) = m ⊙ Δ`` (``where="inside"``: fuse only inside the region, the aligned values are kept
  outside) or ``R(Δ) = (1 − m) ⊙ Δ`` (``where="outside"``: the safety region keeps its aligned values).
  A key without a mask has an empty region.
* **rank level** (:func:`project`): with an orthonormal basis ``U`` (``d × q``, ``UᵀU = I``) of a safety subspace
  per key, ``R(Δ) = U Uᵀ Δ`` (``mode="onto"``) or ``R(Δ) = Δ − U Uᵀ Δ`` (``mode="out"``); ``side="right"``
  projects the columns instead, ``Δ U Uᵀ`` (input space, e.g. for ``lora_A``). A key without a basis has the empty
  subspace (``onto`` gives 0, ``out`` gives ``Δ``). The two modes sum to ``Δ``.
* **attention-head level** (:func:`head_scores`, :func:`select_heads`, :func:`head_masks`): a per-entry
  importance score (any scorer's, same keys and shapes as the adapter) is aggregated per head — head ``h`` of a
  ``q/k/v_proj`` owns rows ``[h·d_h, (h+1)·d_h)`` of its ``lora_B``; head ``h`` of ``o_proj`` owns those columns of
  its ``lora_A`` — as the mean ``|score|`` over the head's entries; heads are ranked over the whole model and the top
  ``fraction`` form the region. The factors shared by all heads of a module (``lora_A`` of q/k/v, ``lora_B`` of o)
  belong to the region when any head of the module does, so ``where="outside"`` never touches a selected head.
  Tensors of other modules (MLP) lie outside every head region. Selecting every head with ``where="inside"`` gives
  the plain merge on attention modules.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..regions.lora import split_key
from .inmemory import apply_delta, merge_task_vectors, task_vectors
from .layout import LayoutError

WHERE = ("inside", "outside")
PROJECTIONS = ("onto", "out")
HEAD_ROWS = ("q_proj", "k_proj", "v_proj")  # heads split the output rows of these
HEAD_COLS = ("o_proj",)  # and the input columns of this one


def _check_where(where: str) -> None:
    if where not in WHERE:
        raise ValueError(f"unknown region side {where!r}; allowed: {', '.join(WHERE)}")


def merged_delta(aligned: Mapping[str, torch.Tensor], tasks: Sequence[Mapping[str, torch.Tensor]], method: str,
                 *, scope: str = "tensor", **params) -> dict[str, torch.Tensor]:
    """``Δ = Merge({θ_t − θ_aligned})`` in fp32 (the update every region restriction acts on)."""
    return merge_task_vectors(task_vectors(aligned, tasks), method, scope=scope, **params)


# --------------------------------------------------------------------------------------------- neuron level
def restrict_to_mask(delta: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     where: str = "inside") -> dict[str, torch.Tensor]:
    """``m ⊙ Δ`` (inside) or ``(1 − m) ⊙ Δ`` (outside) per key; errors name the key and both shapes."""
    _check_where(where)
    extra = set(masks) - set(delta)
    if extra:
        raise LayoutError(f"masks have keys that are not in the adapter: {sorted(extra)[:5]}")
    out = {}
    for key, d in delta.items():
        m = masks.get(key)
        if m is None:
            out[key] = torch.zeros_like(d) if where == "inside" else d.clone()
            continue
        if tuple(m.shape) != tuple(d.shape):
            raise LayoutError(f"mask {key}: shape {tuple(m.shape)} but the adapter tensor is {tuple(d.shape)}")
        if m.dtype != torch.bool:
            raise TypeError(f"mask {key}: expected a bool tensor, got {m.dtype}")
        region = m.to(d.device) if where == "inside" else ~m.to(d.device)
        out[key] = d * region
    return out


def fuse_neurons(aligned: Mapping[str, torch.Tensor], tasks: Sequence[Mapping[str, torch.Tensor]],
                 masks: Mapping[str, torch.Tensor], method: str, *, where: str = "inside", scope: str = "tensor",
                 **params) -> dict[str, torch.Tensor]:
    """``θ_aligned + m ⊙ Merge(τ)`` (inside) or ``θ_aligned + (1 − m) ⊙ Merge(τ)`` (outside)."""
    delta = merged_delta(aligned, tasks, method, scope=scope, **params)
    return apply_delta(aligned, restrict_to_mask(delta, masks, where))


# --------------------------------------------------------------------------------------------- rank level
def _check_basis(key: str, u: torch.Tensor, d: int, tol: float = 1e-3) -> torch.Tensor:
    if u.dim() != 2 or u.shape[0] != d:
        raise LayoutError(f"basis {key}: shape {tuple(u.shape)} but the projected dimension is {d} (need {d} × q)")
    u = u.float()
    gram = u.T @ u
    err = (gram - torch.eye(u.shape[1], device=u.device)).abs().max().item() if u.shape[1] else 0.0
    if err > tol:
        raise ValueError(f"basis {key}: columns are not orthonormal (max |UᵀU − I| = {err:.2e})")
    return u


def project(delta: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor], mode: str = "out",
            side: str = "left") -> dict[str, torch.Tensor]:
    """``U Uᵀ Δ`` (onto) or ``Δ − U Uᵀ Δ`` (out) per key; ``side="right"``: ``Δ U Uᵀ`` / ``Δ − Δ U Uᵀ``."""
    if mode not in PROJECTIONS:
        raise ValueError(f"unknown projection {mode!r}; allowed: {', '.join(PROJECTIONS)}")
    if side not in ("left", "right"):
        raise ValueError(f"unknown side {side!r}; allowed: left, right")
    extra = set(bases) - set(delta)
    if extra:
        raise LayoutError(f"bases have keys that are not in the adapter: {sorted(extra)[:5]}")
    out = {}
    for key, d in delta.items():
        if key not in bases:
            out[key] = torch.zeros_like(d) if mode == "onto" else d.clone()
            continue
        dim = d.shape[0] if side == "left" else d.shape[-1]
        u = _check_basis(key, bases[key].to(d.device), dim)
        onto = u @ (u.T @ d) if side == "left" else (d @ u) @ u.T
        out[key] = onto if mode == "onto" else d - onto
    return out


def fuse_ranks(aligned: Mapping[str, torch.Tensor], tasks: Sequence[Mapping[str, torch.Tensor]],
               bases: Mapping[str, torch.Tensor], method: str, *, mode: str = "out", side: str = "left",
               scope: str = "tensor", **params) -> dict[str, torch.Tensor]:
    """``θ_aligned + (I − U Uᵀ) Merge(τ)`` (out: the fused update avoids the safety subspace) or ``+ U Uᵀ Merge(τ)``."""
    delta = merged_delta(aligned, tasks, method, scope=scope, **params)
    return apply_delta(aligned, project(delta, bases, mode, side))


# --------------------------------------------------------------------------------------------- head level
def _head_site(key: str) -> tuple[str, int | None] | None:
    """(module prefix, axis split by heads) of an attention LoRA key, None for other modules. The axis is 0 for the
    rows of q/k/v lora_B, 1 for the columns of o lora_A, None for a factor shared by all heads of the module."""
    split = split_key(key)
    if split is None:
        return None
    prefix, factor = split
    proj = prefix.rsplit(".", 1)[-1]
    if proj not in HEAD_ROWS + HEAD_COLS:
        return None
    if proj in HEAD_ROWS and factor == "B":
        return prefix, 0
    if proj in HEAD_COLS and factor == "A":
        return prefix, 1
    return prefix, None


def head_scores(scores: Mapping[str, torch.Tensor], head_dim: int) -> dict[tuple[str, int], float]:
    """``{(module prefix, head): mean |score| over the head's entries}`` for every attention module."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    out = {}
    for key, s in scores.items():
        site = _head_site(key)
        if site is None or site[1] is None:
            continue
        prefix, axis = site
        size = s.shape[axis]
        if size % head_dim:
            raise LayoutError(f"{key}: dimension {size} is not a multiple of head_dim {head_dim}")
        per_head = s.float().abs().movedim(axis, 0).reshape(size // head_dim, -1).mean(dim=1)
        for h, v in enumerate(per_head.tolist()):
            out[(prefix, h)] = v
    return out


def select_heads(scores: Mapping[tuple[str, int], float], fraction: float) -> set[tuple[str, int]]:
    """The top ``⌈fraction · #heads⌉`` heads by score over the whole model (ties: the earlier key and head first)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"head fraction must be in [0, 1], got {fraction!r}")
    k = math.ceil(round(fraction * len(scores), 9))
    ranked = sorted(scores, key=lambda h: (-scores[h], h))
    return set(ranked[:k])


def head_masks(shapes: Mapping[str, Sequence[int]], heads: set[tuple[str, int]],
               head_dim: int) -> dict[str, torch.Tensor]:
    """Boolean masks (adapter keys → bool tensors of the shapes) of the selected heads' entries (module docstring)."""
    chosen: dict[str, set[int]] = {}
    for prefix, h in heads:
        chosen.setdefault(prefix, set()).add(h)
    masks = {}
    for key, shape in shapes.items():
        site = _head_site(key)
        if site is None:
            continue
        prefix, axis = site
        mask = torch.zeros(tuple(shape), dtype=torch.bool)
        selected = chosen.get(prefix, set())
        if axis is None:
            mask[...] = bool(selected)  # shared by all heads of the module
        else:
            if shape[axis] % head_dim:
                raise LayoutError(f"{key}: dimension {shape[axis]} is not a multiple of head_dim {head_dim}")
            for h in selected:
                index = [slice(None)] * len(shape)
                index[axis] = slice(h * head_dim, (h + 1) * head_dim)
                mask[tuple(index)] = True
        masks[key] = mask
    return masks


def fuse_heads(aligned: Mapping[str, torch.Tensor], tasks: Sequence[Mapping[str, torch.Tensor]],
               scores: Mapping[str, torch.Tensor], method: str, *, head_dim: int, fraction: float,
               where: str = "inside", scope: str = "tensor", **params) -> dict[str, torch.Tensor]:
    """Head-level region fusion: rank heads by aggregated ``scores``, take the top ``fraction`` as the region, and
    fuse inside it (or outside it) exactly as :func:`fuse_neurons` with :func:`head_masks`."""
    heads = select_heads(head_scores(scores, head_dim), fraction)
    masks = head_masks({k: tuple(v.shape) for k, v in aligned.items()}, heads, head_dim)
    return fuse_neurons(aligned, tasks, masks, method, where=where, scope=scope, **params)


def head_dim_from_config(model_config: Mapping) -> int:
    """``head_dim`` from an HF model config (``config.json``): its ``head_dim`` or hidden_size / heads."""
    if model_config.get("head_dim"):
        return int(model_config["head_dim"])
    return int(model_config["hidden_size"]) // int(model_config["num_attention_heads"])
