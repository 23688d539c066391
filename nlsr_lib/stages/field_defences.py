"""The defences of the field beside NLSR (spec/defences.md), by family, each serving the model it defends.

* alignment stage: ``vaccine`` and ``booster`` retrain the aligned adapter (:func:`~.align.defended_align_stage`),
  then the same attack continues it;
* fine-tuning stage: ``lisa`` and ``constrained_sft`` train the attack with their own trainer, ``safety_mixing``
  trains it on the mixture with safe rows mixed in;
* post-fine-tuning: ``antidote`` prunes the attacked adapter's LoRA factors by Wanda scores on harmful calibration
  rows (:func:`antidote_stage`), beside the training-free defences of ``restore.defences``.

:data:`FIELD_DEFENCES` maps each name to a :class:`FieldDefence`; :meth:`FieldDefence.serve` returns the defended
model of an attack and :meth:`FieldDefence.cost_artifact` the artifact of the stage the defence runs (its alignment, its
fine-tuning or its transform), whose manifest gives its seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import names
from ..config import Params
from ..progress import bars_enabled
from ..registry import Registry
from ..runs import Artifact, Run
from .align import defended_align_stage
from .attack import attack_stage, attack_points, harmful_count
from .graph import ModelRef, request, stage_kind
from .world import load_source, source_inputs

FAMILIES = ("alignment", "fine-tuning", "post-fine-tuning")


@dataclass(frozen=True)
class FieldDefence:
    """One defence of the field: its ``family`` (:data:`FAMILIES`) and ``serve(params, run, method, task, p, n)``,
    the model it serves for the attack (method, task, p, n)."""

    name: str
    family: str
    serve: Callable[..., ModelRef]

    def cost_artifact(self, params: Params, run: Run, method: str, served: ModelRef) -> Artifact:
        """The artifact whose build is the defence's own work: the defended alignment (alignment stage, one per
        aligned model, shared by every attack on it), else the served model's (its fine-tuning or transform)."""
        if self.family == "alignment":
            return defended_align_stage(params, run, method, self.name)
        return served.artifact


FIELD_DEFENCES: Registry[FieldDefence] = Registry(names.FIELD_DEFENCES)


def _register(name: str, family: str, serve: Callable[..., ModelRef]) -> None:
    FIELD_DEFENCES.register(name, FieldDefence(name, family, serve))


def _attack_with(**how) -> Callable[..., ModelRef]:
    """A served model that is the attack itself, trained as ``how`` says (``defence=`` or ``variant=``)."""
    def serve(params: Params, run: Run, method: str, task: str, p: float, n: int | None = None) -> ModelRef:
        return attack_stage(params, run, method, task, p, n, **how)
    return serve


def _antidote(params: Params, run: Run, method: str, task: str, p: float, n: int | None = None) -> ModelRef:
    return antidote_stage(params, run, attack_stage(params, run, method, task, p, n), method)


_register("vaccine", "alignment", _attack_with(defence="vaccine"))
_register("booster", "alignment", _attack_with(defence="booster"))
_register("lisa", "fine-tuning", _attack_with(defence="lisa"))
_register("safety_mixing", "fine-tuning", _attack_with(variant="safety_mixing"))
_register("constrained_sft", "fine-tuning", _attack_with(defence="constrained_sft"))
_register("antidote", "post-fine-tuning", _antidote)


def field_defence(name: str) -> FieldDefence:
    return FIELD_DEFENCES[name]


def served_model(params: Params, run: Run, defence: str, method: str, task: str, p: float,
                 n: int | None = None) -> ModelRef:
    """The model the field's ``defence`` serves for the attack (method, task, p, n)."""
    return FIELD_DEFENCES[defence].serve(params, run, method, task, p, n)


# --------------------------------------------------------------------------------------------- Antidote
def antidote_calibration(params: Params, beavertails_train) -> list[dict]:
    """Antidote's re-alignment set (spec/defences.md §4, D-A5, D-B6): unsafe BeaverTails ``30k_train`` rows
    ``start ≤ i < start + size`` in unsafe-row order, refused when they overlap an attack's harmful rows (the
    first ⌊n·p⌋ unsafe rows of every mixture) or run past the data."""
    from ..config import ParamsError
    from ..data.mixing import beavertails_pool

    a = params.defences.antidote
    used = max((harmful_count(pt.n, pt.p, pt.variant) for pt in attack_points(params)), default=0)
    if a.calibration_start < used:
        raise ParamsError(f"defences.antidote.calibration_start: {a.calibration_start} overlaps the attacks' harmful "
                          f"rows (the first {used} unsafe BeaverTails rows); allowed: >= {used} (D-A5)")
    pool = beavertails_pool(beavertails_train, safe=False)
    rows = pool[a.calibration_start:a.calibration_start + a.calibration_size]
    if len(rows) < a.calibration_size:
        raise ParamsError(f"defences.antidote: calibration rows {a.calibration_start}..{a.calibration_start + a.calibration_size} "
                          f"need {a.calibration_start + a.calibration_size} unsafe BeaverTails rows; the source has "
                          f"{len(pool)}; lower calibration_start or calibration_size")
    return rows


@stage_kind("antidote", reads=("defences.antidote", "model"), consumes=("attack", "world"), device="gpu",
            args=("method",))
def antidote_stage(params: Params, run: Run, attacked: ModelRef, method: str) -> ModelRef:
    """Antidote applied to the ``attacked`` adapter (spec/defences.md §4): one no-grad pass of the fine-tuned model
    over the calibration rows, the top ``dense_ratio`` Wanda scores of every LoRA factor's rows zeroed; writes the
    pruned adapter, its mask (safetensors) and per-factor records."""
    from ..models import copy_tokenizer_files, load_tokenizer, load_with_adapter
    from ..regions.calibration import ordered_batches
    from ..restore.antidote import antidote, save_antidote

    a = params.defences.antidote
    inputs, values = source_inputs(params, run, "beavertails")

    def build(out: Path) -> dict:
        rows = antidote_calibration(params, load_source(params, run, "beavertails")["30k_train"])
        tokenizer = load_tokenizer(attacked.base, params.model)
        batches = ordered_batches(tokenizer, rows, max_length=a.max_length, batch_size=a.batch_size)
        model = load_with_adapter(attacked.base, attacked.adapter, params.model)
        state, masks, records = antidote(model, batches, dense_ratio=a.dense_ratio, group=a.group,
                                         show_progress=bars_enabled())
        config = json.loads((Path(attacked.adapter) / "adapter_config.json").read_text())
        save_antidote(out / "adapter", state, config, masks, records, dense_ratio=a.dense_ratio, group=a.group)
        copy_tokenizer_files(attacked.adapter, out / "adapter")
        marked, total = sum(r["marked"] for r in records), sum(r["total"] for r in records)
        return {"calibration_rows": len(rows), "marked": marked, "total": total, "fraction": marked / total}

    tag = f"restore/antidote/{attacked.tag.removeprefix('attack/')}"
    artifact = request(params, run, "antidote", tag, build, args={"method": method}, values=values,
                       inputs={"attacked": attacked.artifact, **inputs}, counts={"model_loads": 1})
    return ModelRef(tag, attacked.base, str(artifact.path / "adapter"), artifact)


__all__ = ["FAMILIES", "FIELD_DEFENCES", "FieldDefence", "antidote_calibration", "antidote_stage", "field_defence",
           "served_model"]
