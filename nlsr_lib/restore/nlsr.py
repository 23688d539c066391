"""NLSR restoration on in-memory adapter state dicts (spec/nlsr.md §5.1–§5.5).

    1. sim_m for every module on the mask (§5.2, :mod:`.similarity`),
    2. select modules with a strategy (§5.4/§5.5, :mod:`.selection`),
    3. correct the selected modules (§5.3, :mod:`.correction`),

and one record per module: ``name, layer, module_type, similarity, probability, selected``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .correction import correct, get_correction
from .modules import LoraModule, check_finite, check_mask, check_pair
from .selection import Selection, check_strategy, select_modules
from .similarity import get_similarity, module_similarities

Tensor = torch.Tensor


def module_records(modules: Sequence[LoraModule], similarity: Sequence[float] | Tensor | None,
                   probability: Sequence[float] | Tensor, selected: Sequence[bool] | Tensor) -> list[dict]:
    """Flat per-module records (JSON-ready): name, layer, module_type, similarity (None if not computed),
    probability of restoration, selected."""
    return [
        {"name": m.name, "layer": m.layer, "module_type": m.module_type,
         "similarity": None if similarity is None else float(similarity[i]),
         "probability": float(probability[i]), "selected": bool(selected[i])}
        for i, m in enumerate(modules)
    ]


def prepare(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor], mask: Mapping[str, Tensor] | None,
            check_values: bool = True) -> tuple[list[LoraModule], dict[str, Tensor] | None]:
    """Structural checks (module sets, ranks, shapes, mask keys/dtype/shapes), and NaN/inf refusal when
    ``check_values`` (skip it for states ``read_adapter`` already checked)."""
    modules = check_pair(finetuned, reference)
    mask = None if mask is None else check_mask(mask, finetuned)
    if check_values:
        check_finite(finetuned, "fine-tuned adapter")
        check_finite(reference, "reference adapter")
    return modules, mask


def realign_state(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                  mask: Mapping[str, Tensor] | None = None, *, strategy: str = "adaptive",
                  correction: str = "neuron", similarity: str = "gram", check_values: bool = True,
                  show_progress: bool | None = None, **strategy_params) -> tuple[dict[str, Tensor], list[dict]]:
    """NLSR on state dicts: (realigned state, per-module records).

    ``mask`` maps each adapter key to a bool tensor (True = safety-critical); ``None`` = every entry. Strategy
    parameters (``tau``; ``prune_rate``, ``epsilon``, ``favor``, ``seed``; ``layers``) go to the strategy.
    """
    check_strategy(strategy, strategy_params)  # names first: the similarity pass can take seconds
    get_correction(correction)
    get_similarity(similarity)
    modules, mask = prepare(finetuned, reference, mask, check_values)
    sims = module_similarities(finetuned, reference, modules, mask, similarity, show_progress)
    selection: Selection = select_modules(strategy, sims, modules, **strategy_params)
    state = correct(finetuned, reference, modules, selection.selected, mask, correction, show_progress)
    return state, module_records(modules, sims, selection.probability, selection.selected)
