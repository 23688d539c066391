"""Which modules to restore: a registry of selection strategies (spec/nlsr.md §5.4, §5.5, §5.7; DESIGN.md §6).

Each strategy maps the module similarities (fp64 vector, model order) to a :class:`Selection`: the probability
with which each module is restored and the draw. Deterministic strategies have probabilities 1 or 0.

* ``threshold`` — layer-level correction (§5.4): restore m iff sim_m < τ.
* ``adaptive`` — probability-based layer pruning (§5.5, the NLSR default): rank the modules by similarity,
  restore each with probability linear in its rank between ρ−ε and ρ+ε, one seeded Bernoulli draw.
* ``layers`` — every module of decoder layers a ≤ i < b (§5.7, ``layer_ablations``).
* ``all`` — every module.

A new strategy is one function plus ``@register_strategy("name")``; its keyword arguments are its parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import names
from ..registry import Registry
from .modules import LoraModule

FAVOR = ("low_similarity", "high_similarity")
STRATEGIES: Registry[Callable[..., "Selection"]] = Registry(names.RESTORE_STRATEGIES)


@dataclass(frozen=True)
class Selection:
    """Per module (model order): restoration probability (fp64) and whether it was selected (bool)."""

    probability: torch.Tensor
    selected: torch.Tensor


def register_strategy(name: str) -> Callable:
    return STRATEGIES.register(name)


def _deterministic(selected: torch.Tensor) -> Selection:
    return Selection(selected.to(torch.float64), selected)


def adaptive_probabilities(similarity: torch.Tensor, prune_rate: float, epsilon: float,
                           favor: str = "low_similarity") -> torch.Tensor:
    """Restoration probabilities of spec §5.5.

    Rank by similarity, descending (stable: ties keep model order); q_m = position (0 = most similar),
    u_m = 1 − q_m/(L−1). ``high_similarity`` (the reference code) sets p_m = clip((ρ−ε) + 2ε·u_m, 0, 1): the most
    similar module gets ρ+ε, the least similar ρ−ε. ``low_similarity`` (the default, DESIGN.md §6: a module the
    attack moved away from the reference is the one to restore) uses 1−u_m instead, so the least similar gets
    ρ+ε. With L = 1, p = ρ. Spec §10: sims [0.9, 0.2, 0.5, 0.7], ρ=0.5, ε=0.2, code direction →
    [0.7, 0.3, 0.4333, 0.5667].
    """
    if favor not in FAVOR:
        raise ValueError(f"unknown favor {favor!r}; allowed: {', '.join(FAVOR)}")
    n = similarity.numel()
    if n == 1:
        return torch.full((1,), float(min(max(prune_rate, 0.0), 1.0)), dtype=torch.float64)
    order = torch.sort(similarity.to(torch.float64), descending=True, stable=True).indices
    position = torch.empty(n, dtype=torch.float64)
    position[order] = torch.arange(n, dtype=torch.float64)
    u = 1.0 - position / (n - 1)
    if favor == "low_similarity":
        u = 1.0 - u
    return ((prune_rate - epsilon) + 2.0 * epsilon * u).clamp(0.0, 1.0)


@register_strategy("adaptive")
def adaptive_selection(similarity: torch.Tensor, modules: Sequence[LoraModule], *, prune_rate: float = 0.5,
                       epsilon: float = 0.2, favor: str = "low_similarity", seed: int = 42) -> Selection:
    """Probability-based layer pruning (spec §5.5): z_m ~ Bernoulli(p_m), one draw over the vector from an explicit
    CPU ``torch.Generator(seed)``; expected number restored ≈ ρ·L."""
    p = adaptive_probabilities(similarity, prune_rate, epsilon, favor)
    draw = torch.bernoulli(p, generator=torch.Generator().manual_seed(seed))
    return Selection(p, draw.bool())


@register_strategy("threshold")
def threshold_selection(similarity: torch.Tensor, modules: Sequence[LoraModule], *, tau: float) -> Selection:
    """Layer-level correction (spec §5.4): select m iff sim_m < τ."""
    return _deterministic(similarity < tau)


@register_strategy("layers")
def layer_selection(similarity: torch.Tensor, modules: Sequence[LoraModule], *,
                    layers: Sequence[int]) -> Selection:
    """Every module of decoder layers a ≤ i < b (spec §5.7); modules outside decoder layers are never selected."""
    if len(layers) != 2 or not 0 <= layers[0] < layers[1]:
        raise ValueError(f"layers must be [a, b) with 0 <= a < b, got {list(layers)}")
    a, b = layers
    return _deterministic(torch.tensor([m.layer is not None and a <= m.layer < b for m in modules], dtype=torch.bool))


@register_strategy("all")
def all_selection(similarity: torch.Tensor, modules: Sequence[LoraModule]) -> Selection:
    """Every module."""
    return _deterministic(torch.ones(len(modules), dtype=torch.bool))


def strategy_parameters(strategy: str) -> tuple[str, ...]:
    """The keyword parameters ``strategy`` takes."""
    fn = get_strategy(strategy)
    return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)


def strategy_params(strategy: str, params: Mapping[str, object]) -> dict[str, object]:
    """The subset of ``params`` that ``strategy`` takes (config fields of other strategies dropped)."""
    taken = strategy_parameters(strategy)
    return {k: v for k, v in params.items() if k in taken}


def get_strategy(name: str) -> Callable[..., Selection]:
    return STRATEGIES[name]


def check_strategy(strategy: str, params: Mapping[str, object]) -> None:
    """An unknown strategy, or parameters it does not take, are errors naming what is allowed."""
    allowed = strategy_parameters(strategy)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"strategy {strategy!r} takes no parameter(s) {unknown}; its parameters: "
                        f"{', '.join(allowed) or 'none'}")


def select_modules(strategy: str, similarity: torch.Tensor, modules: Sequence[LoraModule],
                   **params) -> Selection:
    """Run ``strategy`` on the similarities (after :func:`check_strategy`)."""
    check_strategy(strategy, params)
    return get_strategy(strategy)(similarity, modules, **params)
