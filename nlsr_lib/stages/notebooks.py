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
from ..seeds import replicates, seeds_for, with_training_seed
from . import ablation as ablations
from .align import align_stage, aligned_adapter_ref
from .attack import attack_points, attack_stage, harmful_count, headline_points
from .evaluate import (generations_stage, harmful_scores, measure, primary_harmful_score, primary_safety,
                       task_accuracy_stage)
from .expo import expo_alphas, expo_stage, identity_alpha, reference_stage
from .fusion import fusion_names, fusion_stage, learned_mask_stage, task_refs
from .regions import calibration_stage, mask_stage
from .restore import defence_names, defence_stage
from .suite import judge_agreement, suite_rows
from .world import base_model_stage, moderation_stage

NOTEBOOK_STAGES: Registry[Callable[[Params, Run], dict[str, Any]]] = Registry("notebook")


def first_replicate(params: Params) -> Params:
    """The replicate of the first training seed: what a single-seed table (and a figure of one run) reads."""
    return with_training_seed(params, params.seeds[0])


def _summary(run: Run, artifact) -> dict | None:
    return None if run.planning else artifact.manifest()["summary"]


PRIMARY_SET = "beavertails_30k_test"
"""The benchmark of every table's primary harmful score: the ``test`` slice of BeaverTails ``30k_test``."""


def primary_fields(params: Params) -> dict[str, str]:
    """The benchmark fields of a primary-set row (spec/evaluation.md §2.0: every row names its judge)."""
    return {"benchmark": PRIMARY_SET, "wrapper": "identity", "judge": params.judges.primary}


def _suite(params: Params, run: Run, models: dict[str, Any], key: str, **where: Any) -> list[dict]:
    """The evaluation suite's rows (:func:`~nlsr_lib.stages.suite.suite_rows`) of each ``{label: model}``, each row
    tagged with ``where`` and its label under ``key``."""
    return [{**where, key: label, **row} for label, model in models.items()
            for row in suite_rows(params, run, model) or []]


@NOTEBOOK_STAGES.register("01")
def alignment(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 01 (headline, every training seed): the base model, the moderation judge, every aligned adapter
    (``aligned``: one row per method and seed) and each model's harmful score per judge (``records``, with
    ``seed``; the base is the same model at every seed), with the first seed's generations (``generations``)."""
    base, moderation = base_model_stage(params, run), moderation_stage(params, run)
    names = ("base", *params.alignment.methods)
    aligned, records = [], []
    for seed, replica in replicates(params):
        trained = {m: align_stage(replica, run, m) for m in params.alignment.methods}
        aligned += [{"method": m, "seed": seed, **(_summary(run, a) or {})} for m, a in trained.items()]
        for name in names:
            records += [{**r, "benchmark": PRIMARY_SET, "wrapper": "identity", "seed": seed}
                        for r in harmful_scores(replica, run, name, "test") or []]
    first = first_replicate(params)
    generations = {name: generations_stage(first, run, name, "test") for name in names}
    suite = [row for seed, replica in replicates(params)
             for row in _suite(replica, run, {n: n for n in names}, "method", seed=seed)]
    return {"base": _summary(run, base), "moderation": _summary(run, moderation), "aligned": aligned,
            "records": records, "generations": generations, "suite": suite,
            "agreement": judge_agreement(first, run, names)}


@NOTEBOOK_STAGES.register("02")
def harmful_finetuning(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 02: the DPO adapter's accuracy on each task before the attack (``before``, every seed) and every
    attacked model of :func:`~nlsr_lib.stages.attack.attack_points` with its harmful score and task accuracy
    (``records``): the headline points (:func:`~nlsr_lib.stages.attack.headline_points`) at every training seed,
    the others at the first."""
    before = []
    headline = set(headline_points(params))
    records = []
    for seed, replica in replicates(params):
        ref = aligned_adapter_ref(replica, run, "dpo")
        for task in params.attack.tasks:
            acc = _summary(run, task_accuracy_stage(replica, run, ref, task))
            if acc is not None:
                before.append({"task": task, "method": "dpo", "seed": seed, "accuracy": acc["accuracy"],
                               "accuracy_strict": acc["accuracy_strict"], "n_task": acc["n"]})
        for point in attack_points(params):
            if seed not in seeds_for(params, point in headline):
                continue
            row = measure(replica, run, point.ref(replica, run), (point.task,), strict=True,
                          helpfulness_reference=aligned_adapter_ref(replica, run, point.method))
            records.append({"task": point.task, "method": point.method, "variant": point.variant,
                            "poison_ratio": point.p, "n": point.n,
                            "harmful_size": harmful_count(point.n, point.p, point.variant), "seed": seed, **row})
    return {"before": before, "records": records}


@NOTEBOOK_STAGES.register("03")
def safety_reference(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 03: every EXPO candidate of every method with its validation harmful score (every seed) and its
    test score (first seed), ``chosen`` marking the α of the method's reference stage (``records``); and per seed
    and method the headline comparison (``chosen``): the test harmful score of the un-extrapolated model
    (``aligned``) and of the reference (``expo``) at the α chosen on the validation slice."""
    identity = identity_alpha(params)
    records, chosen_rows = [], []
    for seed, replica in replicates(params):
        curve = seed in seeds_for(params, headline=False)
        for method in params.expo.methods:
            rows = []
            for alpha in expo_alphas(params):
                ref = expo_stage(replica, run, method, alpha)
                row = {"method": method, "alpha": alpha, "mode": params.expo.mode, "seed": seed,
                       "val_harmful_score": primary_harmful_score(replica, run, ref, "val")}
                if curve or alpha == identity:
                    row.update(primary_safety(replica, run, ref, "test"))
                rows.append(row)
            reference = reference_stage(replica, run, method)
            expo = primary_safety(replica, run, reference, "test")
            if run.planning:
                continue
            from .expo import chosen_alpha

            alpha = chosen_alpha(reference)
            records += [{**r, "chosen": r["alpha"] == alpha} for r in rows]
            aligned = next(r for r in rows if r["alpha"] == identity)
            chosen_rows.append({"method": method, "seed": seed, "alpha": alpha,
                                "aligned": aligned["harmful_score"], "expo": expo["harmful_score"],
                                "change": expo["harmful_score"] - aligned["harmful_score"]})
    return {"records": records, "chosen": chosen_rows}


def _regions_of(params: Params, run: Run) -> dict[str, Any]:
    reference = reference_stage(params, run, "dpo")
    calibration = calibration_stage(params, run, reference)
    masks = {scorer: mask_stage(params, run, reference, scorer) for scorer in params.regions.scorers}
    method_refs = {method: reference_stage(params, run, method) for method in params.expo.methods}
    method_masks = {method: mask_stage(params, run, ref, "low_rank") for method, ref in method_refs.items()}
    return {"reference": reference, "calibration": _summary(run, calibration), "masks": masks,
            "method_refs": method_refs, "method_masks": method_masks}


@NOTEBOOK_STAGES.register("04")
def safety_regions(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 04 (every training seed: masks are cheap, the references exist for notebook 03): per seed
    (``replicates``), the EXPO-DPO reference, its calibration data, a mask per scorer of ``regions.scorers``
    (``masks``) and the low-rank mask of every method's reference (``method_masks``), as mask artifacts; the first
    seed's at the top level."""
    replicas = {seed: _regions_of(replica, run) for seed, replica in replicates(params)}
    return {**replicas[params.seeds[0]], "replicates": replicas}


def _seconds(run: Run, artifact) -> float | None:
    """The seconds an artifact's build took (its manifest), or None under a planning run."""
    return None if run.planning else float(artifact.manifest()["seconds"])


def _defend_all(params: Params, run: Run, method: str, task: str, p: float, seed: int) -> list[dict]:
    """The aligned row and one row per defence of the ``method`` adapter attacked on ``task`` at ratio ``p``; each
    with its ``family`` and ``cost_s``, the seconds of the stage that made it (the alignment, the attack's
    fine-tuning, the defence's transform)."""
    where = {"task": task, "method": method, "poison_ratio": p, "seed": seed}
    aligned = aligned_adapter_ref(params, run, method)
    rows = [{**where, "defense": "aligned", "family": "reference", "cost_s": _seconds(run, aligned.artifact),
             **measure(params, run, aligned, (task,), helpfulness_reference=aligned)}]
    attacked = attack_stage(params, run, method, task, p)
    for defence in defence_names(params):
        ref = defence_stage(params, run, attacked, method, defence)
        family = "reference" if defence == "none" else "post-fine-tuning"
        rows.append({**where, "defense": defence, "family": family, "cost_s": _seconds(run, ref.artifact),
                     **measure(params, run, ref, (task,), helpfulness_reference=aligned)})
    return [{**row, **primary_fields(params)} for row in rows]


BEFORE_ATTACK = "before attack"
"""The ``family`` of the rows of an alignment-stage defence's aligned model (``vaccine_aligned``), measured before any
attack: the reference its attacked row is compared with, as ``aligned`` is for the plain DPO adapter."""


def _field_defences(params: Params, run: Run, method: str, task: str, p: float, seed: int) -> list[dict]:
    """One row per defence of the field in ``defences.methods`` (spec/defences.md) on the attack (method, task, p):
    the model it serves, measured like the others, with its ``family`` and ``cost_s`` (the seconds of its own stage:
    the defended alignment, the defended fine-tuning or the transform); an alignment-stage defence also gets a
    ``<name>_aligned`` row, its aligned model before the attack (family :data:`BEFORE_ATTACK`)."""
    from .align import defended_aligned_ref
    from .field_defences import field_defence

    where = {"task": task, "method": method, "poison_ratio": p, "seed": seed, **primary_fields(params)}
    aligned = aligned_adapter_ref(params, run, method)
    rows = []
    for name in params.defences.methods:
        defence = field_defence(name)
        if defence.family == "alignment":  # the defended aligned model before the attack, a reference of its own
            before = defended_aligned_ref(params, run, method, name)
            rows.append({**where, "defense": f"{name}_aligned", "family": BEFORE_ATTACK,
                         "cost_s": _seconds(run, before.artifact),
                         **measure(params, run, before, (task,), helpfulness_reference=aligned)})
        served = defence.serve(params, run, method, task, p)
        cost = _seconds(run, defence.cost_artifact(params, run, method, served))
        rows.append({**where, "defense": name, "family": defence.family, "cost_s": cost,
                     **measure(params, run, served, (task,), helpfulness_reference=aligned)})
    return rows


SUITE_DEFENCES = ("aligned", "none", "nlsr", "random_mask")
"""The models of notebook 05 that the evaluation suite measures: before the attack, after it, NLSR and its
random-mask control."""


def suite_attack(params: Params) -> tuple[str, str, float]:
    """The attack notebook 05 runs the evaluation suite on: DPO on the first task at the ratio nearest 0.1 (the
    paper's main setting)."""
    return "dpo", params.attack.tasks[0], min(params.attack.poison_ratios, key=lambda p: abs(p - 0.1))


def _suite_models(params: Params, run: Run) -> dict[str, Any]:
    method, task, p = suite_attack(params)
    attacked = attack_stage(params, run, method, task, p)
    models = {"aligned": aligned_adapter_ref(params, run, method)}
    models.update({d: defence_stage(params, run, attacked, method, d) for d in SUITE_DEFENCES[1:]
                   if d in defence_names(params)})
    return models


@NOTEBOOK_STAGES.register("05")
def restoration(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 05: every defence of every attacked DPO adapter (each task and ratio) and of every other method's
    adapter (SST-2 at ``attack.methods_ratio``) with the aligned row (``records``); the attacks of the headline
    points at every training seed, the rest at the first. NLSR's per-module selection of the DPO SST-2 adapters
    at each ratio, first seed (``similarity``)."""
    a = params.attack
    headline = {(point.task, point.p) for point in headline_points(params) if point.variant == "poisoned"}
    field_attacks = headline if params.defences.scope == "headline" else {suite_attack(params)[1:]}
    records = []
    for seed, replica in replicates(params):
        for task in a.tasks:
            for p in a.poison_ratios:
                if seed in seeds_for(params, (task, p) in headline):
                    records += _defend_all(replica, run, "dpo", task, p, seed)
                if (task, p) in field_attacks:  # the field's defences: a training each, headline attacks only
                    records += _field_defences(replica, run, "dpo", task, p, seed)
        if seed in seeds_for(params, headline=False):
            for method in (m for m in params.alignment.methods if m != "dpo"):
                records += _defend_all(replica, run, method, "sst2", a.methods_ratio, seed)
        method, task, p = suite_attack(params)
        records += _suite(replica, run, _suite_models(replica, run), "defense", task=task, method=method,
                          poison_ratio=p, seed=seed)
    first = first_replicate(params)
    similarity = []
    for p in a.poison_ratios:
        defended = defence_stage(first, run, attack_stage(first, run, "dpo", "sst2", p), "dpo", "nlsr")
        if not run.planning:
            from .restore import selection_records

            similarity += [{**rec, "poison_ratio": p} for rec in selection_records(defended)]
    agreement = judge_agreement(first, run, list(_suite_models(first, run).values()))
    return {"records": records, "similarity": similarity, "agreement": agreement}


def fusion_input_sets(params: Params) -> list[tuple[str, ...]]:
    """Notebook 06's input sets: each task alone, then every task together."""
    return [(task,) for task in params.fusion.tasks] + [tuple(params.fusion.tasks)]


@NOTEBOOK_STAGES.register("06")
def model_fusion(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 06: per input set, the aligned adapter, the attacked one (single task) and every fusion with their
    harmful scores and accuracies (``records``): single-task sets at every training seed (the headline table),
    the set of every task at the first; the first seed's learned-mask training histories (``histories``)."""
    f = params.fusion
    records = []
    for seed, replica in replicates(params):
        for tasks in fusion_input_sets(params):
            if seed not in seeds_for(params, headline=len(tasks) == 1):
                continue

            def row(name: str, ref) -> dict:
                return {"fusion": name, "inputs": "+".join(tasks), "seed": seed, **primary_fields(params),
                        **measure(replica, run, ref, tasks, per_task=True)}

            records.append(row("aligned", aligned_adapter_ref(replica, run, f.method)))
            if len(tasks) == 1:
                records.append(row("none", task_refs(replica, run, tasks)[0]))
            for name in fusion_names(params):
                records.append(row(name, fusion_stage(replica, run, tasks, name)))
    suite = [row for seed, replica in replicates(params)
             for row in _suite(replica, run, _fusion_suite_models(replica, run), "fusion",
                               inputs=params.fusion.tasks[0], seed=seed)]
    first = first_replicate(params)
    agreement = judge_agreement(first, run, list(_fusion_suite_models(first, run).values()))
    histories = {}
    for tasks in fusion_input_sets(params):
        learned = learned_mask_stage(first, run, tasks)
        if not run.planning:
            from .fusion import mask_history

            histories["+".join(tasks)] = mask_history(learned)
    return {"records": records, "histories": histories, "suite": suite, "agreement": agreement}


def _fusion_suite_models(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 06's models under the evaluation suite: the aligned adapter, the adapter attacked on the first task
    and every fusion of it."""
    tasks = (params.fusion.tasks[0],)
    return {"aligned": aligned_adapter_ref(params, run, params.fusion.method), "none": task_refs(params, run, tasks)[0],
            **{name: fusion_stage(params, run, tasks, name) for name in fusion_names(params)}}


@NOTEBOOK_STAGES.register("07")
def restoration_ablation(params: Params, run: Run) -> dict[str, Any]:
    """Notebook 07: the aligned and attacked baselines (``baselines``) and every ablation point with its defended
    model's harmful score, accuracy and restored modules (``records``), each row with its training ``seed``: the
    first seed, or every seed under ``seed_scope: all``."""
    a = params.ablation
    baselines, records = [], []
    for seed, replicate in replicates(params, headline=False):

        def row(ref) -> dict:
            return measure(replicate, run, ref, (a.task,))

        baselines += [{"defense": name, "seed": seed, **row(ref)}
                      for name, ref in (("aligned", aligned_adapter_ref(replicate, run, a.method)),
                                        ("none", ablations.attacked_ref(replicate, run)))]
        for name, value, defence in ablations.ablation_points(replicate):
            ref = ablations.ablation_stage(replicate, run, name, value, defence)
            measured = row(ref)
            if not run.planning:
                from .restore import selection_records

                selection = selection_records(ref)
                records.append({"ablation": name, "value": value, "defense": defence, "seed": seed, **measured,
                                "restored_modules": sum(r["selected"] for r in selection),
                                "modules": len(selection)})
    return {"baselines": baselines, "records": records}


__all__ = ["NOTEBOOK_STAGES", "fusion_input_sets"]
