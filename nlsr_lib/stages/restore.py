"""Stages of notebooks 05 and 07: training-free defences of an attacked adapter (spec/nlsr.md §5, §7).

:func:`defence_stage` applies one defence of the :mod:`nlsr_lib.restore` registry to an attacked adapter of notebook 02,
reading adapter files only, and returns the defended model as a :class:`~nlsr_lib.stages.graph.ModelRef` over the
same base.
What each defence is given (DESIGN.md §4: every adapter lives in the aligned LoRA space over W_sft):

* ``nlsr``: the safety reference of notebook 04 (the EXPO adapter at the α chosen on the validation slice, or the
  plain aligned adapter with ``reference="plain"``) and its ``low_rank`` mask (or another scorer's);
* ``random_mask``: the same reference, and a seeded random mask with the scorer mask's count per tensor;
* ``safelora`` / ``resta`` / ``aligned_adapter``: the aligned adapter (SafeLoRA's aligned subspace, RESTA's safety
  vector, the adapter re-applied wholesale); with ``restore.safelora.masked: true`` SafeLoRA is also given the
  mask NLSR uses (that of NLSR's safety reference), which becomes an input of the stage;
* ``none``: the attacked adapter itself;
* ``safelora_delta`` (a variant, :data:`DEFENCE_VARIANTS`): SafeLoRA projecting only what fine-tuning added to
  the aligned adapter (``safelora.update: finetuning_delta``); the spec's SafeLoRA projects the whole attacked
  adapter, which here also contains the alignment.

``overrides`` replace parameters of :func:`~nlsr_lib.restore.defence_params` (notebook 07's ablations); they are
part of the stage's config, so every ablation point is its own artifact (addressed by fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Params
from ..runs import Run
from .align import aligned_adapter_ref
from .graph import ModelRef, request, stage_kind
from .regions import MASK_FILE, mask_stage, reference_for

DEFENCE_VARIANTS = {  # name -> (registered defence, parameter overrides): rows beside the profile's defences
    "safelora_delta": ("safelora", {"update": "finetuning_delta"}),
}


@stage_kind("restore", consumes=("attack", "reference", "mask", "align"), args=("defence", "method", "scorer"))
def defence_stage(params: Params, run: Run, attacked: ModelRef, method: str, defence: str, *,
                  reference: str = "expo", scorer: str = "low_rank", mask_sparsity: float | None = None,
                  overrides: dict[str, Any] | None = None) -> ModelRef:
    """``defence`` applied to the ``attacked`` adapter of alignment ``method`` (see the module docstring). Its
    config holds every ``restore`` setting the defence reads (:func:`~nlsr_lib.restore.defence_params`) after
    ``overrides``, so each ablation point is its own artifact."""
    from ..restore import defence_params, defend
    from ..restore.defences import get_defence

    name = defence
    if defence in DEFENCE_VARIANTS:
        defence, variant = DEFENCE_VARIANTS[defence]
        overrides = {**variant, **(overrides or {})}
    spec = get_defence(defence)
    if defence == "none":
        return attacked
    inputs = {"attacked": attacked.artifact}
    kwargs = {**defence_params(params.restore, defence), **(overrides or {})}
    mask_file = None
    if defence in ("nlsr", "random_mask"):
        ref = reference_for(params, run, method, reference)
    else:
        ref = aligned_adapter_ref(params, run, method)
    inputs["reference"] = ref.artifact
    if defence in ("nlsr", "random_mask") or (defence == "safelora" and kwargs.get("masked")):
        mask = mask_stage(params, run, reference_for(params, run, method, reference), scorer, mask_sparsity)
        inputs["mask"] = mask
        mask_file = mask.path / MASK_FILE

    def build(out: Path) -> dict:
        records = defend(defence, attacked.adapter, out / "adapter", reference_dir=ref.adapter,
                         mask=mask_file if spec.uses_mask else None, **kwargs)  # writes adapter/selection.json
        return {"selected": sum(r["selected"] for r in records), "modules": len(records)}

    tag = f"restore/{name}/{attacked.tag.removeprefix('attack/')}"
    artifact = request(params, run, "restore", tag, build,
                       args={"defence": defence, "method": method, "scorer": scorer if mask_file else None,
                             "mask_sparsity": mask_sparsity}, values={"params": kwargs}, inputs=inputs)
    return ModelRef(tag, attacked.base, str(artifact.path / "adapter"), artifact)


def selection_records(ref: ModelRef) -> list[dict]:
    """The per-module records (name, layer, module_type, similarity, probability, selected) of a defended model."""
    from ..restore import SELECTION_FILE

    return json.loads((Path(ref.adapter) / SELECTION_FILE).read_text())


def defence_names(params: Params) -> list[str]:
    """The profile's defences in registry order, each followed by its variants (``safelora`` → ``safelora_delta``)."""
    from ..restore import DEFENCES

    names = []
    for d in (d for d in DEFENCES if d in params.restore.defences):
        names += [d, *(v for v, (base, _) in DEFENCE_VARIANTS.items() if base == d)]
    return names
