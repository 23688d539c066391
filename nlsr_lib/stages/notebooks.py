"""What each notebook measures, as one library call per notebook (DESIGN.md §2): the records of its tables and the
artifacts its figures read.

Each function requests every stage its notebook needs, in the notebook's order, then reads the manifests into
records. Under a planning :class:`~nlsr_lib.runs.Run` the readers return nothing and the function only requests,
so the same code is both the notebook's computation and the plan ``nlsr plan`` / ``nlsr run`` build
(:data:`NOTEBOOK_STAGES`): a notebook run after ``nlsr run`` builds nothing.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import Params
from ..registry import Registry
from ..runs import Run
from . import ablation as ablations
from .align import align_stage, aligned_adapter_ref
from .attack import attack_points, attack_stage, harmful_count
from .evaluate import (generations_stage, harmful_scores, measure, primary_harmful_score, primary_safety,
                       task_accuracy_stage)
from .expo import expo_alphas, expo_stage, reference_stage
from .fusion import fusion_names, fusion_stage, learned_mask_stage, task_refs
from .regions import calibration_stage, mask_stage
from .restore import defence_names, defence_stage
from .world import base_model_stage, moderation_stage

NOTEBOOK_STAGES: Registry[Callable[[Params, Run], dict[str, Any]]] = Registry("notebook")


def _summary(run: Run, artifact) -> dict | None:
    return None if run.planning else artifact.manifest()["summary"]


@NOTEBOOK_STAGES.register("01")
def alignment(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 01: the base model, the moderation judge, every aligned adapter and each model's harmful score per
    judge (``records``), with the generations of each model (``generations``, for examples)."""
    base, moderation = base_model_stage(params, run), moderation_stage(params, run)
    aligned = {m: align_stage(params, run, m) for m in params.alignment.methods}
    names = ("base", *params.alignment.methods)
    records = []
    for name in names:
        records += harmful_scores(params, run, name, "test") or []
    generations = {name: generations_stage(params, run, name, "test") for name in names}
    return {"base": _summary(run, base), "moderation": _summary(run, moderation),
            "aligned": {m: _summary(run, a) for m, a in aligned.items()}, "records": records,
            "generations": generations}


@NOTEBOOK_STAGES.register("02")
def harmful_finetuning(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 02: the DPO adapter's accuracy on each task before the attack (``before``) and every attacked model
    of :func:`~nlsr_lib.stages.attack.attack_points` with its harmful score and task accuracy (``records``)."""
    before = []
    for method in ("dpo",):
        ref = aligned_adapter_ref(params, run, method)
        for task in params.attack.tasks:
            acc = _summary(run, task_accuracy_stage(params, run, ref, task))
            if acc is not None:
                before.append({"task": task, "method": method, "accuracy": acc["accuracy"],
                               "accuracy_strict": acc["accuracy_strict"]})
    records = []
    for point in attack_points(params):
        row = measure(params, run, point.ref(params, run), (point.task,), strict=True)
        records.append({"task": point.task, "method": point.method, "variant": point.variant,
                        "poison_ratio": point.p, "n": point.n, "harmful_size": harmful_count(point.n, point.p,
                                                                                             point.variant), **row})
    return {"before": before, "records": records}


@NOTEBOOK_STAGES.register("03")
def safety_reference(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 03: every EXPO candidate of every method with its validation and test harmful scores; ``chosen``
    marks the α of the method's reference stage (the lowest validation score)."""
    records = []
    for method in params.expo.methods:
        rows = []
        for alpha in expo_alphas(params):
            ref = expo_stage(params, run, method, alpha)
            rows.append({"method": method, "alpha": alpha, "mode": params.expo.mode,
                         "val_harmful_score": primary_harmful_score(params, run, ref, "val"),
                         **primary_safety(params, run, ref, "test")})
        reference = reference_stage(params, run, method)
        if not run.planning:
            from .expo import chosen_alpha

            chosen = chosen_alpha(reference)
            records += [{**r, "chosen": r["alpha"] == chosen} for r in rows]
    return {"records": records}


@NOTEBOOK_STAGES.register("04")
def safety_regions(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 04: the EXPO-DPO reference, its calibration data, a mask per scorer of ``regions.scorers``
    (``masks``) and the low-rank mask of every method's reference (``method_masks``), as mask artifacts."""
    reference = reference_stage(params, run, "dpo")
    calibration = calibration_stage(params, run, reference)
    masks = {scorer: mask_stage(params, run, reference, scorer) for scorer in params.regions.scorers}
    method_refs = {method: reference_stage(params, run, method) for method in params.expo.methods}
    method_masks = {method: mask_stage(params, run, ref, "low_rank") for method, ref in method_refs.items()}
    return {"reference": reference, "calibration": _summary(run, calibration), "masks": masks,
            "method_refs": method_refs, "method_masks": method_masks}


def _defend_all(params: Params, run: Run, method: str, task: str, p: float) -> list[dict]:
    """The aligned row and one row per defence of the ``method`` adapter attacked on ``task`` at ratio ``p``."""
    aligned = aligned_adapter_ref(params, run, method)
    rows = [{"task": task, "method": method, "poison_ratio": p, "defense": "aligned",
             **measure(params, run, aligned, (task,))}]
    attacked = attack_stage(params, run, method, task, p)
    for defence in defence_names(params):
        ref = defence_stage(params, run, attacked, method, defence)
        rows.append({"task": task, "method": method, "poison_ratio": p, "defense": defence,
                     **measure(params, run, ref, (task,))})
    return rows


@NOTEBOOK_STAGES.register("05")
def restoration(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 05: every defence of every attacked DPO adapter (each task and ratio) and of every other method's
    adapter (SST-2 at ``attack.methods_ratio``) with the aligned row (``records``); NLSR's per-module selection of
    the DPO SST-2 adapters at each ratio (``similarity``)."""
    a = params.attack
    records = []
    for task in a.tasks:
        for p in a.poison_ratios:
            records += _defend_all(params, run, "dpo", task, p)
    for method in (m for m in params.alignment.methods if m != "dpo"):
        records += _defend_all(params, run, method, "sst2", a.methods_ratio)
    similarity = []
    for p in a.poison_ratios:
        defended = defence_stage(params, run, attack_stage(params, run, "dpo", "sst2", p), "dpo", "nlsr")
        if not run.planning:
            from .restore import selection_records

            similarity += [{**rec, "poison_ratio": p} for rec in selection_records(defended)]
    return {"records": records, "similarity": similarity}


def fusion_input_sets(params: Params) -> list[tuple[str, ...]]:
    """Notebook 06's input sets: each task alone, then every task together."""
    return [(task,) for task in params.attack.tasks] + [tuple(params.attack.tasks)]


@NOTEBOOK_STAGES.register("06")
def model_fusion(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 06: per input set, the aligned adapter, the attacked one (single task) and every fusion with their
    harmful scores and accuracies (``records``); the learned masks' training histories (``histories``)."""
    f = params.fusion
    records = []
    for tasks in fusion_input_sets(params):
        def row(name: str, ref) -> dict:
            return {"fusion": name, "inputs": "+".join(tasks), **measure(params, run, ref, tasks, per_task=True)}

        records.append(row("aligned", aligned_adapter_ref(params, run, f.method)))
        if len(tasks) == 1:
            records.append(row("none", task_refs(params, run, tasks)[0]))
        for name in fusion_names(params):
            records.append(row(name, fusion_stage(params, run, tasks, name)))
    histories = {}
    for tasks in fusion_input_sets(params):
        learned = learned_mask_stage(params, run, tasks)
        if not run.planning:
            from .fusion import mask_history

            histories["+".join(tasks)] = mask_history(learned)
    return {"records": records, "histories": histories}


@NOTEBOOK_STAGES.register("07")
def restoration_ablation(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 07: the aligned and attacked baselines (``baselines``) and every ablation point with its defended
    model's harmful score, accuracy and restored modules (``records``)."""
    a = params.ablation

    def row(ref) -> dict:
        return measure(params, run, ref, (a.task,))

    baselines = [{"defense": name, **row(ref)}
                 for name, ref in (("aligned", aligned_adapter_ref(params, run, a.method)),
                                   ("none", ablations.attacked_ref(params, run)))]
    records = []
    for name, value, defence in ablations.ablation_points(params):
        ref = ablations.ablation_stage(params, run, name, value, defence)
        measured = row(ref)
        if not run.planning:
            from .restore import selection_records

            selection = selection_records(ref)
            records.append({"ablation": name, "value": value, "defense": defence, **measured,
                            "restored_modules": sum(r["selected"] for r in selection), "modules": len(selection)})
    return {"baselines": baselines, "records": records}


__all__ = ["NOTEBOOK_STAGES", "fusion_input_sets"]
