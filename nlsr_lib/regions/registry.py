"""The region-scorer registry and the two calls every stage and notebook uses (DESIGN.md §7; spec nlsr.md §4).

A scorer is one function ``fn(model, batches, **options) -> {adapter key: fp32 score}`` over every LoRA matrix
(A and B) of the reference adapter loaded as a ``peft.PeftModel``, plus one registry line saying how its scores
become a mask (``selection``) and which calibration data it reads (``data``); its name is declared in
:data:`nlsr_lib.names.REGION_SCORERS`, the list params choose from:

* ``wanda`` (:mod:`.wanda`): ``abs(W)·‖x_j‖``; row-wise; (prompt, response) batches;
* ``snip`` (:mod:`.snip`): ``abs(W)·Σ_n abs(∇_W ℓ_n)`` with the LM loss; row-wise; (prompt, response) batches;
* ``preference_snip`` (:mod:`.snip`): the same with the DPO loss; row-wise; preference batches;
* ``random`` (:mod:`.control`): ``N(0, 1)`` seeded per matrix; row-wise; no data;
* ``low_rank`` (:mod:`.lowrank`): ``abs(V Vᵀ W)``; per matrix; (prompt, response) batches;
* ``wanda_set_difference``, ``snip_set_difference``: the base scores on safety and on utility batches; top-q safety
  minus top-p utility per matrix.

:func:`score` returns the scores, :func:`masks_from_scores` turns them into masks (so a sparsity sweep scores
once), :func:`build_mask` does both. :func:`scorer_options` maps the ``regions:`` params section onto the keyword
options a scorer accepts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from .. import names
from ..registry import Registry
from .selection import magnitude_keep_mask, rowwise_keep_mask, set_difference_mask
from .threads import single_thread

SELECTIONS = ("rowwise", "matrix", "set_difference")
DATA_KINDS = ("pairs", "preference", "none")


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[..., dict[str, torch.Tensor]]
    selection: str
    data: str
    options: tuple[str, ...]
    base: str | None = None  # the scorer whose scores a set difference compares

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().split("\n")[0]


SCORERS: Registry[Scorer] = Registry(names.REGION_SCORERS, make=Scorer)


def register_scorer(name: str, *, selection: str, data: str = "pairs", options: tuple[str, ...] = ()) -> Callable:
    """Decorator: register ``fn(model, batches, **options)`` as the scorer ``name``."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if data not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {data!r}")
    return SCORERS.register(name, selection=selection, data=data, options=tuple(options))


def register_set_difference(name: str, base: str) -> None:
    """Register ``name`` as the set difference (top-q safety \\ top-p utility) of the scores of ``base``."""
    b = get_scorer(base)
    SCORERS.register(name, b.fn, selection="set_difference", data=b.data, options=b.options, base=base)


def get_scorer(name: str) -> Scorer:
    return SCORERS[name]


def seed_for(seed: int, key: str) -> int:
    """A per-tensor seed from the run seed and the tensor's key (order-independent, reproducible)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def score(name: str, model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]] | None,
          **options: Any) -> dict[str, torch.Tensor]:
    """The fp32 scores of every LoRA matrix under scorer ``name`` (for a set difference: the base scores)."""
    scorer = get_scorer(name)
    unknown = sorted(set(options) - set(scorer.options) - {"show_progress"})
    if unknown:
        raise TypeError(f"scorer {name!r} does not take {unknown}; its options: {', '.join(scorer.options)}")
    return scorer.fn(model, batches, **options)


def masks_from_scores(name: str, scores: Mapping[str, torch.Tensor], mask_sparsity: float, *,
                      tie_rule: str = "index", weights: Mapping[str, torch.Tensor] | None = None,
                      seed: int = 42) -> dict[str, torch.Tensor]:
    """Masks (True = safety-critical) from the scores of a row-wise or per-matrix scorer (:mod:`.selection`).

    ``weights`` (the LoRA matrices) are needed only by the row-wise ``tie_rule="reference"``, which also prunes
    exact zeros; ``seed`` seeds the per-matrix reference rule's random pruning of zeros."""
    scorer = get_scorer(name)
    if scorer.selection == "set_difference":
        raise ValueError(f"{name!r} is a set difference; use set_difference_masks(safety, utility, q, p)")
    out = {}
    with single_thread():
        for key, s in scores.items():
            if scorer.selection == "rowwise":
                w = weights[key] if (weights is not None and tie_rule == "reference") else None
                out[key] = rowwise_keep_mask(s, mask_sparsity, tie_rule=tie_rule, weight=w).cpu()
            else:
                gen = torch.Generator().manual_seed(seed_for(seed, key))
                out[key] = magnitude_keep_mask(s, mask_sparsity, tie_rule=tie_rule, generator=gen).cpu()
    return out


def set_difference_masks(safety: Mapping[str, torch.Tensor], utility: Mapping[str, torch.Tensor], q: float,
                         p: float) -> dict[str, torch.Tensor]:
    """Per matrix, the top-⌊q·n⌋ safety entries minus the top-⌊p·n⌋ utility entries (merging.md §3.2)."""
    if set(safety) != set(utility):
        raise ValueError(f"safety and utility scores cover different matrices: "
                         f"{sorted(set(safety) ^ set(utility))[:3]}")
    with single_thread():
        return {k: set_difference_mask(safety[k], utility[k], q, p).cpu() for k in safety}


def build_mask(name: str, model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]] | None,
               mask_sparsity: float = 0.8, *, tie_rule: str = "index",
               utility_batches: Iterable[Mapping[str, torch.Tensor]] | None = None, q: float = 0.1, p: float = 0.1,
               seed: int = 42, **options: Any) -> dict[str, torch.Tensor]:
    """Score with ``name`` and select: ``{adapter key: bool tensor of the matrix's shape}`` (True = kept).

    Row-wise and per-matrix scorers keep ``⌈(1−mask_sparsity)·n⌉`` entries (per row / per matrix). A set
    difference ignores ``mask_sparsity``: its size follows from ``q`` (safety) and ``p`` (utility) and it needs
    ``utility_batches``. Scorers that take ``mask_sparsity``/``tie_rule``/``seed`` themselves (wanda with
    ``propagate=True`` prunes between layers; random and low_rank draw from ``seed``) receive them."""
    scorer = get_scorer(name)
    shared = {"mask_sparsity": mask_sparsity, "tie_rule": tie_rule, "seed": seed}
    options = {**{k: v for k, v in shared.items() if k in scorer.options}, **options}
    if scorer.selection == "set_difference":
        if utility_batches is None:
            raise ValueError(f"{name!r} needs utility_batches (the utility calibration set)")
        safety = score(name, model, batches, **options)
        utility = score(name, model, utility_batches, **options)
        return set_difference_masks(safety, utility, q, p)
    scores = score(name, model, batches, **options)
    weights = None
    if tie_rule == "reference" and scorer.selection == "rowwise":
        from .lora import lora_weights

        weights = lora_weights(model)
    return masks_from_scores(name, scores, mask_sparsity, tie_rule=tie_rule, weights=weights, seed=seed)


def scorer_options(cfg: Any, name: str) -> dict[str, Any]:
    """The keyword options of scorer ``name`` taken from a ``RegionsConfig`` (the ``regions:`` params section)."""
    available = {
        "mask_sparsity": cfg.mask_sparsity, "tie_rule": cfg.tie_rule, "rank_keep_ratio": cfg.rank_keep_ratio,
        "svd": cfg.svd, "niter": cfg.svd_niter, "seed": cfg.seed, "positions": cfg.positions,
        "propagate": cfg.propagate, "cumulative_grad": cfg.snip.cumulative_grad, "beta": cfg.snip.preference_beta,
    }
    return {k: v for k, v in available.items() if k in get_scorer(name).options}
