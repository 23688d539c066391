"""Training seeds as a params axis (issue 18).

A study's numbers move with the floating-point path of the machine and with the seed of every training (data
order, LoRA initialisation, dropout): a single run is one draw. ``params.seeds`` lists the training seeds; a
**replicate** is the params with every training's seed set to one of them (:func:`with_training_seed`): each
:class:`~nlsr_lib.config.TrainConfig` (the alignment methods, the attack, any training defence) and the learned
safety mask. Everything else stays fixed across replicates — the world, the data seed (mixture shuffles), the
pretrained base, the moderation judge, the evaluation prompts, and the training-free random draws (the region
scorers' and restoration's ``seed``, swept by notebook 07's ``seed`` ablation instead).

Stages are cached per seed without any change to the stage graph: a training stage reads its config, seed
included, so each replicate has its own fingerprint, and everything downstream follows from its inputs. The
replicate of ``seeds[0]`` equals params whose training configs already carry that seed, so adding seeds to a
profile keeps the first seed's cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from .config import LearnedMaskConfig, Params, TrainConfig

SEEDED_CONFIGS = (TrainConfig, LearnedMaskConfig)
"""Config classes whose ``seed`` is a training seed (replaced in every replicate)."""


def _reseed(value: Any, seed: int) -> Any:
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    changes = {f.name: _reseed(getattr(value, f.name), seed) for f in dataclasses.fields(value)}
    if isinstance(value, SEEDED_CONFIGS):
        changes["seed"] = seed
    changed = {k: v for k, v in changes.items() if v is not getattr(value, k)}
    return dataclasses.replace(value, **changed) if changed else value


def with_training_seed(params: Params, seed: int) -> Params:
    """``params`` with the ``seed`` of every training config (:data:`SEEDED_CONFIGS`, at any depth) set to ``seed``;
    every other field, the top-level data ``seed`` included, unchanged."""
    if seed < 0:
        raise ValueError(f"training seed {seed}: allowed: a non-negative integer")
    return _reseed(params, seed)


def training_seeds(params: Params) -> dict[str, int]:
    """The training seeds ``params`` carries, by dotted config path (for a manifest or a check)."""
    found: dict[str, int] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, SEEDED_CONFIGS):
            found[path] = value.seed
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{f.name}".lstrip("."))

    walk(params, "")
    return found


def seeds_for(params: Params, headline: bool) -> tuple[int, ...]:
    """The seeds a table runs at: every seed of ``params.seeds`` for a headline table (or under ``seed_scope:
    all``), else the first only."""
    return params.seeds if headline or params.seed_scope == "all" else params.seeds[:1]


def replicates(params: Params, headline: bool = True) -> Iterator[tuple[int, Params]]:
    """``(seed, replicate params)`` for each seed a table runs at (:func:`seeds_for`)."""
    for seed in seeds_for(params, headline):
        yield seed, with_training_seed(params, seed)


__all__ = ["SEEDED_CONFIGS", "replicates", "seeds_for", "training_seeds", "with_training_seed"]
