"""NLSR restoration and the training-free baselines, on LoRA adapter files only (spec/nlsr.md §5, §7).

The attacked (fine-tuned), aligned and reference (EXPO) adapters share one LoRA parameter space over W_sft
(DESIGN.md §4), so they are compared and transplanted entry by entry; a base model is never loaded.

* :mod:`.modules` — module pairing in model order and the checks (module sets, ranks, shapes, masks, NaN/inf).
* :mod:`.similarity` — sim_m = cos(vec(B⁰A⁰), vec(B̂⁰Â⁰)) on the mask via the Gram identity (§5.2).
* :mod:`.selection` — the strategy registry: threshold (§5.4), adaptive (§5.5), layers (§5.7), all.
* :mod:`.correction` — neuron-level (§5.3) or whole-module correction of the selected modules.
* :mod:`.nlsr` — :func:`realign_state`, NLSR on state dicts.
* :mod:`.baselines` — SafeLoRA (published and NLSR-code variants), RESTA, random masks.
* :mod:`.defences` — the defence registry (none, nlsr, safelora, resta, aligned_adapter, random_mask) and
  :func:`realign` / :func:`defend` on adapter directories.
"""

from .baselines import (random_mask_like, random_mask_of_density, resta_config, resta_state, safelora_module,
                        safelora_state)
from .correction import CORRECTIONS, correct, register_correction, transplant
from .defences import (DEFENCES, SELECTION_FILE, Adapter, defence_params, defend, defend_adapter, load_mask,
                       realign, register_defence)
from .modules import LoraModule, RestoreError, check_mask, check_pair, lora_modules
from .nlsr import module_records, realign_state
from .selection import (STRATEGIES, Selection, adaptive_probabilities, register_strategy, select_modules,
                        strategy_params)
from .similarity import SIMILARITIES, explicit_similarity, gram_similarity, module_similarities

__all__ = [
    "Adapter", "CORRECTIONS", "DEFENCES", "LoraModule", "RestoreError", "SELECTION_FILE", "SIMILARITIES",
    "STRATEGIES", "Selection", "adaptive_probabilities", "check_mask", "check_pair", "correct", "defence_params",
    "defend", "defend_adapter", "explicit_similarity", "gram_similarity", "load_mask", "lora_modules",
    "module_records", "module_similarities", "random_mask_like", "random_mask_of_density", "realign",
    "realign_state", "register_correction", "register_defence", "register_strategy", "resta_config",
    "resta_state", "safelora_module", "safelora_state", "select_modules", "strategy_params", "transplant",
]
