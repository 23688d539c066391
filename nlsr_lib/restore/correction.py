"""Correction of the selected modules: a registry (spec/nlsr.md §5.3, §5.7).

* ``neuron`` — neuron-level correction (§5.3): the safety-critical (masked) entries of A and B take the
  reference values, every other entry keeps the fine-tuned value:
  ``A ← A ⊙ ¬M_A + Â ⊙ M_A``, ``B ← B ⊙ ¬M_B + B̂ ⊙ M_B``.
* ``module`` — whole-module correction (the ablation; §5.7 ``layer_ablations``): every entry of A and B takes
  the reference value, whatever the mask says.

Unselected modules are unchanged (the output shares their tensors). Results are stored in the fine-tuned
adapter's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .. import names
from ..registry import Registry
from .modules import LoraModule
from .parallel import map_modules

Tensor = torch.Tensor
CORRECTIONS: Registry[Callable[[Tensor, Tensor, Tensor | None], Tensor]] = Registry(names.CORRECTIONS)


def register_correction(name: str) -> Callable:
    return CORRECTIONS.register(name)


@register_correction("neuron")
def transplant(x: Tensor, x_ref: Tensor, mask: Tensor | None) -> Tensor:
    """x ⊙ ¬M + x̂ ⊙ M in x's dtype (spec §5.3; §10: A=[[1,2]], Â=[[10,20]], M=[[T,F]] → [[10,2]]).
    ``mask=None`` means every entry is safety-critical."""
    x_ref = x_ref.to(x.dtype)
    return x_ref if mask is None else torch.where(mask, x_ref, x)


@register_correction("module")
def replace_module(x: Tensor, x_ref: Tensor, mask: Tensor | None) -> Tensor:
    """Every entry takes the reference value (the mask is not used)."""
    return x_ref.to(x.dtype)


def get_correction(name: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    return CORRECTIONS[name]


def correct(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor], modules: Sequence[LoraModule],
            selected: Sequence[bool] | Tensor, mask: Mapping[str, Tensor] | None = None,
            correction: str = "neuron", show_progress: bool | None = None) -> dict[str, Tensor]:
    """The corrected state dict: selected modules corrected by ``correction``, the rest as fine-tuned."""
    fn = get_correction(correction)
    keys = [key for m, s in zip(modules, selected) if bool(s) for key in (m.key_a, m.key_b)]

    def one(key: str) -> Tensor:
        return fn(finetuned[key], reference[key], None if mask is None else mask[key])

    out = dict(finetuned)
    out.update(zip(keys, map_modules(one, keys, f"correction ({correction})", show_progress)))
    return out
