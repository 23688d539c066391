"""Merges of state dicts held in memory: LoRA adapters and small models (spec/somf.md §2.1, §3).

``merge_task_vectors`` is the reference semantics; the streaming driver (:mod:`.stream`) computes the same result
tensor by tensor and the tests check that they agree.

* task vectors ``τ_i[k] = θ_i[k] − θ_base[k]`` in fp32, key by key (:func:`task_vectors`);
* scope ``tensor``: each key is trimmed on its own; scope ``global``: TIES thresholds are the ``⌊density·D⌋``-th
  largest magnitude over **all** keys of a task (``D`` = all its entries; the TIES paper and the SOMF code),
  computed exactly by :func:`global_thresholds`;
* ``θ_merged[k] = θ_base[k] + Δ[k]``, computed in fp32 and stored in ``θ_base[k]``'s dtype; non-float tensors are
  passed through from the base (they must be equal in every model).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..counts import kept_by_density
from .layout import LayoutError, check_same_layout, layout_of
from .operators import get_merge, merge_tensors, param_default
from .select import global_threshold

SCOPES = ("tensor", "global")


def task_vectors(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                 names: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """``τ_i = θ_i − θ_base`` in fp32 for every floating key; layouts must match (errors name keys and shapes) and
    NaN/inf weights are refused."""
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    ref = layout_of(base)
    for name, model in zip(names, models):
        check_same_layout(ref, layout_of(model), "the base", name)
    taus = [{k: m[k].float() - base[k].float() for k in base if base[k].is_floating_point()} for m in models]
    for name, tv in zip(names, taus):
        for k, t in tv.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {k}: NaN or inf in the base or in {name}")
    return taus


def global_thresholds(taus: Sequence[Mapping[str, torch.Tensor]], density: float) -> list[float | None]:
    """Per task, the exact ``⌊density·D⌋``-th largest ``|τ|`` over all its keys (two radix passes, no concat)."""
    out: list[float | None] = []
    for tv in taus:
        total = sum(t.numel() for t in tv.values())
        m = kept_by_density(total, density)
        if m >= total:
            out.append(None)
            continue
        out.append(global_threshold(lambda tv=tv: (t.detach().abs() for t in tv.values()), m))
    return out


def merge_task_vectors(taus: Sequence[Mapping[str, torch.Tensor]], method: str, *, scope: str = "tensor",
                       single_task_identity: bool = False, **params) -> dict[str, torch.Tensor]:
    """``Δ[k] = Merge_method({τ_i[k]})`` for every key (fp32). ``scope`` only matters for trimming methods."""
    if scope not in SCOPES:
        raise ValueError(f"unknown trimming scope {scope!r}; allowed: {', '.join(SCOPES)}")
    if not taus:
        raise ValueError("merge_task_vectors: no task vectors")
    ref = layout_of(taus[0])
    for i, tv in enumerate(taus[1:], start=1):
        check_same_layout(ref, layout_of(tv), "task vector 0", f"task vector {i}")
    spec = get_merge(method)
    thresholds = None
    if spec.trims and scope == "global":
        thresholds = global_thresholds(taus, params.get("density", param_default(method, "density")))
    return {k: merge_tensors(method, [tv[k] for tv in taus], key=k, thresholds=thresholds,
                             single_task_identity=single_task_identity, **params)
            for k in taus[0]}


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``θ_base + Δ`` per key, in fp32, stored in the base's dtype; keys without a delta are copied."""
    extra = set(delta) - set(base)
    if extra:
        raise LayoutError(f"delta has keys not in the base: {sorted(extra)[:5]}")
    return {k: (v.float() + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in base.items()}


def merge_state_dicts(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], method: str,
                      *, scope: str = "tensor", single_task_identity: bool = False,
                      **params) -> dict[str, torch.Tensor]:
    """``θ_base + Merge({θ_i − θ_base})`` for whole state dicts in memory (full-weight checkpoints, small models)."""
    taus = task_vectors(base, models)
    for k, v in base.items():
        if not v.is_floating_point() and any(not torch.equal(m[k], v) for m in models):
            raise LayoutError(f"non-float tensor {k} differs between the base and a model; it cannot be merged")
    delta = merge_task_vectors(taus, method, scope=scope, single_task_identity=single_task_identity, **params)
    return apply_delta(base, delta)
