"""Module similarity between fine-tuned and reference LoRA updates on a mask (spec/nlsr.md §5.2, DESIGN.md §5).

    sim_m = cos( vec((B⊙M_B)(A⊙M_A)), vec((B̂⊙M_B)(Â⊙M_A)) )

(the LoRA scaling κ and any positive scale of the reference cancel). ``gram`` (the default) never forms a
d_out×d_in product: with A⁰ = A⊙M_A etc.,

    ⟨B⁰A⁰, B̂⁰Â⁰⟩_F = sum((B⁰ᵀB̂⁰) ⊙ (A⁰Â⁰ᵀ)),   ‖B⁰A⁰‖²_F = sum((B⁰ᵀB⁰) ⊙ (A⁰A⁰ᵀ)),

which is exact, costs six r×r products per module instead of two d_out×d_in ones, and is far more accurate:
r×r entries are fp32 sums of d terms, then added up in fp64 (error ~1e-7), whereas a fp32 cosine over
10⁷–10⁸-element vectors is off by up to ~1e-2 (measured on Llama-3-8B shapes; ``benchmarks/restore.py``). ``explicit`` forms the products as the reference code does (in fp32 by default), for
tests and the benchmark. A zero masked update has similarity 0, as ``torch.nn.functional.cosine_similarity``
(which the reference code calls) gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from .. import names
from ..registry import Registry
from .modules import LoraModule
from .parallel import map_modules

Tensor = torch.Tensor
def clip_cosine(cos: float) -> float:
    """A cosine clipped to [-1, 1] against rounding; a NaN stays NaN (``min(1.0, nan)`` would hide it as 1.0)."""
    return cos if math.isnan(cos) else max(-1.0, min(1.0, cos))


SIMILARITIES: Registry[Callable[..., float]] = Registry(names.SIMILARITIES)


def register_similarity(name: str) -> Callable:
    return SIMILARITIES.register(name)


def masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """x ⊙ M in fp32 (no copy when x is fp32 and there is no mask)."""
    x = x.float()
    return x if mask is None else torch.where(mask, x, 0.0)


def frobenius_inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ)) from two r×r products, summed in fp64."""
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum(dtype=torch.float64))


def cosine(inner: float, sq_norm_1: float, sq_norm_2: float) -> float:
    """inner / (‖x‖‖y‖), 0 when either vector is zero, clipped to [-1, 1] against rounding."""
    denom = math.sqrt(max(sq_norm_1, 0.0) * max(sq_norm_2, 0.0))
    if denom == 0.0:
        return 0.0
    cos = inner / denom
    return clip_cosine(cos)


@register_similarity("gram")
def gram_similarity(a: Tensor, b: Tensor, a_ref: Tensor, b_ref: Tensor,
                    mask_a: Tensor | None = None, mask_b: Tensor | None = None) -> float:
    """sim_m of spec §5.2 through the Gram identity, without any d_out×d_in product."""
    a0, b0, ar0, br0 = masked(a, mask_a), masked(b, mask_b), masked(a_ref, mask_a), masked(b_ref, mask_b)
    return cosine(frobenius_inner(b0, a0, br0, ar0), frobenius_inner(b0, a0, b0, a0),
                  frobenius_inner(br0, ar0, br0, ar0))


@register_similarity("explicit")
def explicit_similarity(a: Tensor, b: Tensor, a_ref: Tensor, b_ref: Tensor,
                        mask_a: Tensor | None = None, mask_b: Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> float:
    """sim_m of spec §5.2 as the reference code computes it: form both d_out×d_in updates, then the cosine of
    the flattened vectors (in ``dtype``; the reference code used bf16, this defaults to fp32), clipped to
    [-1, 1] against rounding (an fp32 cosine of identical large updates can exceed 1), as :func:`cosine`."""
    a0, b0 = masked(a, mask_a).to(dtype), masked(b, mask_b).to(dtype)
    ar0, br0 = masked(a_ref, mask_a).to(dtype), masked(b_ref, mask_b).to(dtype)
    delta, delta_ref = b0 @ a0, br0 @ ar0
    cos = float(torch.nn.functional.cosine_similarity(delta.reshape(1, -1), delta_ref.reshape(1, -1)))
    return clip_cosine(cos)


def get_similarity(name: str) -> Callable[..., float]:
    return SIMILARITIES[name]


def module_similarities(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                        modules: Sequence[LoraModule], mask: Mapping[str, Tensor] | None = None,
                        method: str = "gram", show_progress: bool | None = None) -> Tensor:
    """sim_m for every module in ``modules`` order (fp64 vector); ``mask=None`` means every entry."""
    fn = get_similarity(method)

    def one(m: LoraModule) -> float:
        return fn(finetuned[m.key_a], finetuned[m.key_b], reference[m.key_a], reference[m.key_b],
                  None if mask is None else mask[m.key_a], None if mask is None else mask[m.key_b])

    return torch.tensor(map_modules(one, modules, f"similarity ({method})", show_progress), dtype=torch.float64)
