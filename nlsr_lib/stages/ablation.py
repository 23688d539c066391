"""Notebook 07: one-factor ablations of NLSR around its canonical run (spec/nlsr.md §5, §9; DESIGN.md §6).

Every ablation is a registered function ``point(params, value) -> Point``: the profile with one parameter changed
(and, for the reference and the scorer, which reference / mask the defence reads). :func:`ablation_stage` turns a
point into the defended model of the ``ablation.method`` adapter attacked on ``ablation.task`` at
``ablation.poison_ratio``. A point equal to the profile's own setting *is* the canonical run of notebook 05 and
shares its artifact (same fingerprint); every other point is its own artifact beside it.

===================  ==================================================================  ========================
ablation             what changes                                                        values
===================  ==================================================================  ========================
``mask_sparsity``    the low-rank mask's sparsity (share of entries *not* transplanted)  ``ablation.mask_sparsity``
``rank_keep_ratio``  the share of principal directions the low-rank scorer keeps          ``ablation.rank_keep_ratio``
``prune_rate``       ρ, the expected share of modules restored (adaptive)                ``ablation.prune_rate``
``epsilon``          ε, the spread ρ ± ε of the restoration probabilities                ``ablation.epsilon``
``tau``              layer-level correction (``threshold``): restore modules with sim < τ ``ablation.tau``
``seed``             the adaptive draw (and the random mask)                             ``ablation.seeds``
``scorer``           the region scorer of the mask                                       ``ablation.scorers``
``favor``            less (paper) or more (reference code) similar modules restored      both
``reference``        the EXPO reference or the plain aligned adapter                     ``expo``, ``plain``
``correction``       masked entries only (neuron level) or whole selected modules        ``neuron``, ``module``
``strategy``         adaptive or every module (``threshold`` is the τ sweep)             ``adaptive, all``
===================  ==================================================================  ========================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..config import Params
from ..registry import Registry
from ..runs import Run
from .attack import attack_stage
from .graph import ModelRef
from .restore import defence_stage


@dataclass(frozen=True)
class Point:
    """One ablation point: the params it runs under, and the reference and scorer the defence reads."""

    params: Params
    reference: str = "expo"
    scorer: str = "low_rank"


@dataclass(frozen=True)
class Ablation:
    name: str
    fn: Callable[[Params, Any], Point]
    values: Callable[[Params], tuple]
    default: Callable[[Params], Any]
    controls: bool  # also run the random-mask control at every value


ABLATIONS: Registry[Ablation] = Registry("ablation", make=Ablation)


def register_ablation(name: str, values: Callable[[Params], tuple], default: Callable[[Params], Any],
                      controls: bool = False):
    """Decorator: add ``fn(params, value) -> Point`` to :data:`ABLATIONS` with its values and the profile's value."""
    return ABLATIONS.register(name, values=values, default=default, controls=controls)


def _restore(params: Params, **changes) -> Params:
    return dataclasses.replace(params, restore=dataclasses.replace(params.restore, **changes))


def _regions(params: Params, **changes) -> Params:
    return dataclasses.replace(params, regions=dataclasses.replace(params.regions, **changes))


@register_ablation("mask_sparsity", lambda p: p.ablation.mask_sparsity, lambda p: p.regions.mask_sparsity,
                   controls=True)
def _mask_sparsity(params: Params, value: float) -> Point:
    return Point(_regions(params, mask_sparsity=value))


@register_ablation("rank_keep_ratio", lambda p: p.ablation.rank_keep_ratio, lambda p: p.regions.rank_keep_ratio)
def _rank_keep_ratio(params: Params, value: float) -> Point:
    return Point(_regions(params, rank_keep_ratio=value))


@register_ablation("prune_rate", lambda p: p.ablation.prune_rate, lambda p: p.restore.prune_rate)
def _prune_rate(params: Params, value: float) -> Point:
    return Point(_restore(params, strategy="adaptive", prune_rate=value))


@register_ablation("epsilon", lambda p: p.ablation.epsilon, lambda p: p.restore.epsilon)
def _epsilon(params: Params, value: float) -> Point:
    return Point(_restore(params, strategy="adaptive", epsilon=value))


@register_ablation("tau", lambda p: p.ablation.tau, lambda p: None)
def _tau(params: Params, value: float) -> Point:
    return Point(_restore(params, strategy="threshold", tau=value))


@register_ablation("seed", lambda p: p.ablation.seeds, lambda p: p.restore.seed, controls=True)
def _seed(params: Params, value: int) -> Point:
    return Point(_restore(params, seed=value))


@register_ablation("scorer", lambda p: p.ablation.scorers, lambda p: "low_rank")
def _scorer(params: Params, value: str) -> Point:
    return Point(params, scorer=value)


@register_ablation("favor", lambda p: ("low_similarity", "high_similarity"), lambda p: p.restore.favor)
def _favor(params: Params, value: str) -> Point:
    return Point(_restore(params, favor=value))


@register_ablation("reference", lambda p: ("expo", "plain"), lambda p: "expo")
def _reference(params: Params, value: str) -> Point:
    return Point(params, reference=value)


@register_ablation("correction", lambda p: ("neuron", "module"), lambda p: p.restore.correction)
def _correction(params: Params, value: str) -> Point:
    return Point(_restore(params, correction=value))


@register_ablation("strategy", lambda p: ("adaptive", "all"), lambda p: p.restore.strategy)
def _strategy(params: Params, value: str) -> Point:
    return Point(_restore(params, strategy=value))


def get_ablation(name: str) -> Ablation:
    return ABLATIONS[name]


def attacked_ref(params: Params, run: Run) -> ModelRef:
    """The attacked adapter every ablation defends (``ablation.method`` on ``ablation.task`` at its ratio)."""
    a = params.ablation
    return attack_stage(params, run, a.method, a.task, a.poison_ratio)


def ablation_stage(params: Params, run: Run, name: str, value: Any, defence: str = "nlsr") -> ModelRef:
    """The ``defence`` (``nlsr`` or ``random_mask``) of the ablation's attacked adapter at one ablation point."""
    if defence not in ("nlsr", "random_mask"):
        raise ValueError(f"ablations defend with 'nlsr' or 'random_mask', not {defence!r}")
    point = get_ablation(name).fn(params, value)
    return defence_stage(point.params, run, attacked_ref(params, run), params.ablation.method, defence,
                         reference=point.reference, scorer=point.scorer)


def ablation_points(params: Params) -> list[tuple[str, Any, str]]:
    """Every ``(ablation, value, defence)`` of the profile, in registry order; controls where the ablation has them."""
    points = []
    for name, ablation in ABLATIONS.items():
        for value in ablation.values(params):
            points.append((name, value, "nlsr"))
            if ablation.controls:
                points.append((name, value, "random_mask"))
    return points
