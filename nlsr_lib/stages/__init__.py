"""The pipeline's stages (DESIGN.md §2), one module per step, over the pure algorithm packages::

    world     world, tokenizer, base_model, moderation      (and the datasets every stage reads)
    align     align, defended_align                         notebooks 01, 05
    evaluate  generations, judge, accuracy; measure()       every notebook
    attack    mixture, attack                               notebook 02
    expo      expo, reference                               notebook 03
    regions   calibration, mask                             notebook 04
    restore   restore                                       notebooks 05, 07
    field_defences  antidote (and the field's defences)     notebook 05
    fusion    fusion, learned_mask, learned_mask_random     notebook 06
    ablation  the ablation points (restore stages)          notebook 07
    suite     benchmark_generations, over_refusal,          notebooks 01, 05, 06 (the evaluation suite)
              capability

Every stage kind is registered in :data:`STAGES` with its declared reads and version (:mod:`.graph`);
:mod:`.notebooks` says what each notebook measures, :mod:`.plan` turns that into a graph with counts, and
:mod:`.executors` builds a plan locally or on Ray.
"""

from __future__ import annotations

from . import (ablation, align, attack, evaluate, expo, field_defences, fusion, regions, restore, suite,  # noqa: F401
               world)  # (registers)
from .graph import STAGES, ModelRef, StageKind, stage_kind

__all__ = ["STAGES", "ModelRef", "StageKind", "stage_kind"]
