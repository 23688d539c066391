"""``random``: the seeded control scorer (spec nlsr.md §4.5; DESIGN §6 "randomness").

``S ~ N(0, 1)`` of each LoRA matrix's shape, drawn from its own ``torch.Generator`` seeded by
:func:`~nlsr_lib.regions.registry.seed_for` (run seed, adapter key), so a matrix's scores do not depend on which
other matrices are scored or in which order. Row-wise selection as the other neuron-level scorers. No data.
"""

from __future__ import annotations

import torch

from .lora import lora_shapes
from .registry import register_scorer, seed_for


@register_scorer("random", selection="rowwise", data="none", options=("seed",))
def random_scores(model: torch.nn.Module, batches=None, *, seed: int = 42,
                  show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Standard-normal scores, one generator per matrix (spec §4.5); ``batches`` is ignored."""
    return {key: torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, key)))
            for key, shape in lora_shapes(model).items()}
