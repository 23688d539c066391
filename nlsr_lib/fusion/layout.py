"""Checks that the inputs of a merge line up: same keys, shapes and dtypes (DESIGN.md §7 "errors are specific")."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch


class TensorMeta(NamedTuple):
    """Name, shape and dtype of one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class LayoutError(ValueError):
    """Inputs of a merge do not line up; the message names the keys, shapes or dtypes."""


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:5])
    return shown + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")


def check_same_layout(reference: Mapping[str, TensorMeta], other: Mapping[str, TensorMeta], ref_name: str,
                      other_name: str, *, check_dtype: bool = True) -> None:
    """Raise :class:`LayoutError` naming the missing/extra keys, the first shape and the first dtype mismatch."""
    missing, extra = set(reference) - set(other), set(other) - set(reference)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{other_name} lacks {len(missing)} key(s) of {ref_name}: {_names(missing)}")
        if extra:
            parts.append(f"{other_name} has {len(extra)} key(s) not in {ref_name}: {_names(extra)}")
        raise LayoutError("; ".join(parts))
    for key, meta in reference.items():
        o = other[key]
        if tuple(o.shape) != tuple(meta.shape):
            raise LayoutError(f"tensor {key}: shape {tuple(meta.shape)} in {ref_name} but {tuple(o.shape)} in "
                              f"{other_name}")
        if check_dtype and o.dtype != meta.dtype:
            raise LayoutError(f"tensor {key}: dtype {meta.dtype} in {ref_name} but {o.dtype} in {other_name}; "
                              f"convert the checkpoints to one dtype first")


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta(k, tuple(v.shape), v.dtype) for k, v in state.items()}
