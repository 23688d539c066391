"""Safety-critical regions of a reference LoRA adapter (spec nlsr.md §4; DESIGN.md §4-6).

Scorers (:data:`SCORERS`: ``wanda``, ``snip``, ``preference_snip``, ``random``, ``low_rank``,
``wanda_set_difference``, ``snip_set_difference``) score every LoRA matrix of the reference adapter loaded as a
``peft.PeftModel`` over its base; :func:`build_mask` turns scores into boolean masks (True = safety-critical),
:func:`save_mask` / :func:`load_mask` store them as safetensors keyed by the adapter's state-dict keys.

Modules: :mod:`.calibration` (batches), :mod:`.activations` (one-pass statistics), :mod:`.selection` (how many
and which entries), :mod:`.registry` (the scorer registry), :mod:`.wanda`, :mod:`.snip`, :mod:`.control`
(random), :mod:`.lowrank` (NLSR's scorer and the safety subspaces), :mod:`.masks` (files and statistics),
:mod:`.threads` (one CPU thread for small post-processing ops).
"""

from __future__ import annotations

from . import wanda, snip, control, lowrank  # noqa: F401,I001  (register the scorers, in table order)
from .activations import POSITIONS, collect_lora_statistics, layerwise_pass, statistic_positions
from .calibration import batches_hash, calibration_batches, encode_pair, preference_batches, sample_rows
from .lora import adapter_key, lora_matrices, lora_shapes, lora_weights, normalize_key, parse_key
from .lowrank import (LowRankResult, low_rank_subspaces, load_subspaces, output_directions, principal_directions,
                      project_onto, project_out, rank_to_keep, save_subspaces)
from .masks import (density_records, intersection, jaccard, layer_density_records, load_mask, mask_metadata,
                    overall_density, save_mask, union, validate_mask)
from .registry import (SCORERS, Scorer, build_mask, get_scorer, masks_from_scores, register_scorer,
                       register_set_difference, score, scorer_options, set_difference_masks)
from .selection import TIE_RULES, magnitude_keep_mask, rowwise_keep_mask, set_difference_mask, top_set
from .snip import dpo_loss, sequence_logps

__all__ = [
    "SCORERS", "Scorer", "register_scorer", "register_set_difference", "get_scorer", "score", "build_mask",
    "masks_from_scores", "set_difference_masks", "scorer_options",
    "calibration_batches", "preference_batches", "encode_pair", "sample_rows", "batches_hash",
    "collect_lora_statistics", "layerwise_pass", "statistic_positions", "POSITIONS",
    "low_rank_subspaces", "LowRankResult", "principal_directions", "output_directions", "project_onto",
    "project_out", "rank_to_keep", "save_subspaces", "load_subspaces",
    "save_mask", "load_mask", "validate_mask", "mask_metadata", "density_records", "layer_density_records",
    "overall_density", "intersection", "union", "jaccard",
    "rowwise_keep_mask", "magnitude_keep_mask", "set_difference_mask", "top_set", "TIE_RULES",
    "lora_matrices", "lora_weights", "lora_shapes", "adapter_key", "normalize_key", "parse_key",
    "dpo_loss", "sequence_logps",
]
