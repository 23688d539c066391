"""Merge operators on task vectors, one tensor (key) at a time (spec/somf.md §3, spec/merging.md §1.3, §2).

Every operator is a pure function ``fn(taus, **params) -> Δ`` on a list of fp32 tensors of one shape (the task
vectors ``τ_1 … τ_n`` of one key, ``τ_i = θ_i − θ_base``); the merged tensor is ``θ_base + Δ``. They are
registered by name in :data:`MERGE_METHODS` (``@register_merge``; its name declared in :mod:`nlsr_lib.names`).
The drivers (:mod:`.inmemory`, :mod:`.stream`) compute the task vectors, the global statistics a method needs,
and call :func:`merge_tensors`.

=================  ============================================================================================
``weight_averaging``  ``Δ = (1/n) Σ_i τ_i`` (somf §3.1; no λ)
``task_arithmetic``   ``Δ = Σ_i λ_i τ_i`` (somf §3.2; λ a scalar or one per task)
``ties``              trim each ``τ_i`` to its top ``⌊density·D⌋`` magnitudes (``|τ| ≥ t_i``), elect
                      ``s = sign(Σ_i τ̂_i)``, disjoint merge over the agreeing entries ``A = {i: sign(τ̂_i) = s}``:
                      ``mean`` (paper) ``Δ = λ Σ_{i∈A} τ̂_i / |A|`` or ``sum`` (SOMF code) ``Δ = λ Σ_{i∈A} τ̂_i``
                      (somf §3.3, merging.md §1.3)
``dare``              ``Δ = Σ_i λ_i τ_i ⊙ (1 − d_i) / (1 − p)``, ``d_i ~ Bernoulli(p)`` drawn from a generator
                      seeded by ``(seed, key, i)`` (somf §3.4; the paper's 1/(1−p), not mergekit's L1 match)
``consensus_ta``      ``τ_MTL = Σ_t τ_t``; TALL masks ``m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|]``; consensus
                      ``c = 1[Σ_t m_t ≥ k]``; ``Δ = λ · c ⊙ τ_MTL`` (TALL masks, arXiv 2405.07813; merging.md §2)
``consensus_ties``    the same with ``τ_MTL`` = the (unscaled) TIES merge
=================  ============================================================================================

Decisions on ties (documented because results depend on them):

* **magnitude ties**: the threshold ``t_i`` is the ``⌊density·D⌋``-th largest ``|τ_i|`` (:mod:`.select`); every
  entry with ``|τ| ≥ t_i`` is kept, so entries tied with the threshold all survive (somf §3.3 "ties kept"; the
  original TIES code keeps ``m+1`` through an off-by-one, mergekit breaks ties by argsort order).
* **sign election ties**: where ``Σ_i τ̂_i = 0`` exactly, the elected sign is the sign of the sum of the elected
  signs (the "majority" rule of the TIES code, somf §3.3 step 3) taken over **the tensor**, so a streaming merge
  needs no extra pass; if that is 0 too, ``+1`` (mergekit/PEFT). The paper code takes the majority over the whole
  flattened model; the two differ only at exact cancellations.
* **TALL mask**: strict ``>`` as in the TALL code, so an entry no task moves (``τ_t = τ_MTL − τ_t = 0``) is unused.
* **n = 1**: the paper formulas apply (λ scales a single task vector). ``single_task_identity=True`` reproduces the
  SOMF code (somf §6.10): WA, TA and TIES return ``τ_1`` unchanged; DARE still drops and scales.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .. import names
from ..registry import Registry
from .select import magnitude_threshold

DISJOINT_MODES = ("mean", "sum")


@dataclass(frozen=True)
class MergeMethod:
    """A registered operator: its function, the parameters it accepts, and what its driver must provide."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...]
    trims: bool = False  # takes per-task magnitude ``thresholds`` (TIES trimming; scope tensor|global)
    identity_when_single: bool = False  # returns τ_1 unchanged for n = 1 under single_task_identity

    @classmethod
    def of(cls, name: str, fn: Callable[..., torch.Tensor], **flags: bool) -> "MergeMethod":
        """The entry of ``fn``: its parameters are its signature's, less those the drivers pass."""
        return cls(name, fn, tuple(p for p in inspect.signature(fn).parameters if p not in _DRIVER_PARAMS), **flags)


MERGE_METHODS: Registry[MergeMethod] = Registry(names.MERGE_METHODS, make=MergeMethod.of)
_DRIVER_PARAMS = ("taus", "key", "thresholds", "inplace")


def register_merge(name: str, *, trims: bool = False, identity_when_single: bool = False):
    """Decorator: add ``fn`` to :data:`MERGE_METHODS` under ``name``."""
    return MERGE_METHODS.register(name, trims=trims, identity_when_single=identity_when_single)


def get_merge(name: str) -> MergeMethod:
    return MERGE_METHODS[name]


# --------------------------------------------------------------------------------------------- helpers
def tensor_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed derived deterministically from ``(seed, key, task index)`` (blake2b), independent of the
    order in which tensors are processed, of threads and of the device (DESIGN.md §6 "randomness")."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _lambdas(lam: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(lam, (int, float)):
        return [float(lam)] * n
    lam = [float(x) for x in lam]
    if len(lam) != n:
        raise ValueError(f"{name}: {len(lam)} lambdas for {n} task vectors")
    return lam


def _scalar(lam: float, name: str) -> float:
    if not isinstance(lam, (int, float)):
        raise ValueError(f"{name}: lam must be one number (the scaling of the merged vector), got {lam!r}")
    return float(lam)


def trim(tau: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """``τ̂ = τ ⊙ 1[|τ| ≥ t]`` (``None`` keeps everything), as one fused ``hardshrink`` pass: ``|τ| > t⁻`` with
    ``t⁻`` the largest fp32 below ``t`` is ``|τ| ≥ t`` exactly."""
    if threshold is None:
        return tau.clone()
    below = float(np.nextafter(np.float32(threshold), np.float32(0.0)))
    return torch.nn.functional.hardshrink(tau, below)


def elect_sign(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    """``s = sign(Σ_i τ̂_i)`` with zero sums resolved to the tensor's majority sign, then to +1 (module docstring)."""
    sign = trimmed[0].clone()
    for t in trimmed[1:]:
        sign.add_(t)
    sign.sign_()
    zero = sign == 0
    if bool(zero.any()):
        majority = float(torch.sign(sign.sum()))
        sign.masked_fill_(zero, majority if majority != 0 else 1.0)
    return sign


def disjoint_merge(trimmed: Sequence[torch.Tensor], sign: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """``Σ_{i∈A} τ̂_i`` (``sum``) or that divided by ``|A|`` (``mean``; 0 where ``A`` is empty)."""
    if mode not in DISJOINT_MODES:
        raise ValueError(f"unknown disjoint mode {mode!r}; allowed: {', '.join(DISJOINT_MODES)}")
    acc = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if mode == "mean" else None
    for t in trimmed:
        agree = t * sign  # > 0 exactly where sign(τ̂_i) = s
        agree.clamp_(min=0.0)
        acc.add_(agree)
        if count is not None:
            count.add_(agree > 0)
    if count is not None:
        acc.div_(count.clamp_(min=1.0))
    return acc.mul_(sign)


def ties_core(taus: list[torch.Tensor], thresholds: Sequence[float | None], disjoint: str,
              inplace: bool = False) -> torch.Tensor:
    """The unscaled TIES merge: trim, elect, disjoint merge.

    ``inplace`` consumes ``taus``: the list is emptied as each task vector is used, so the working set is the
    ``n`` trimmed task vectors plus an fp32 accumulator, an fp32 sign and a uint8 count (``4n + 9`` bytes per
    entry) and shrinks task by task. Both paths compute bit-identical results."""
    if len(thresholds) != len(taus):
        raise ValueError(f"ties: {len(thresholds)} thresholds for {len(taus)} task vectors")
    if disjoint not in DISJOINT_MODES:
        raise ValueError(f"unknown disjoint mode {disjoint!r}; allowed: {', '.join(DISJOINT_MODES)}")
    if not inplace:
        trimmed = [trim(t, th) for t, th in zip(taus, thresholds)]
        return disjoint_merge(trimmed, elect_sign(trimmed), disjoint)
    for i, th in enumerate(thresholds):
        taus[i] = trim(taus[i], th)  # the untrimmed tensor is freed here
    sign = elect_sign(taus)
    acc = torch.zeros_like(sign)
    count = torch.zeros(sign.shape, dtype=torch.uint8 if len(taus) < 256 else torch.int32, device=sign.device) \
        if disjoint == "mean" else None
    while taus:
        t = taus.pop(0).mul_(sign).clamp_(min=0.0)  # |τ̂_i| where it agrees with the elected sign, else 0
        acc.add_(t)
        if count is not None:
            count.add_(t > 0)
        del t
    if count is not None:
        acc.div_(count.float().clamp_(min=1.0))
    return acc.mul_(sign)


def tensor_thresholds(taus: Sequence[torch.Tensor], density: float) -> list[float | None]:
    """Per-tensor scope: each task's ``⌊density·numel⌋``-th largest magnitude."""
    return [magnitude_threshold(t, density) for t in taus]


def tall_masks(taus: Sequence[torch.Tensor], merged: torch.Tensor,
               lambda_t: float | Sequence[float]) -> list[torch.Tensor]:
    """TALL masks ``m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|]`` (strict, as the TALL code)."""
    lams = _lambdas(lambda_t, len(taus), "tall masks")
    return [t.abs() > (merged - t).abs_().mul_(lam) for t, lam in zip(taus, lams)]


def consensus_mask(masks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``1[Σ_t m_t ≥ k]``: k=2 drops weights used by no task or by one task only, k=0 keeps all."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        count.add_(m)
    return count >= k


# --------------------------------------------------------------------------------------------- operators
@register_merge("weight_averaging", identity_when_single=True)
def weight_averaging(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Δ = (1/n) Σ_i τ_i`` (somf §3.1)."""
    out = taus[0].clone()
    for t in taus[1:]:
        out.add_(t)
    return out.div_(len(taus))


@register_merge("task_arithmetic", identity_when_single=True)
def task_arithmetic(taus: Sequence[torch.Tensor], lam: float | Sequence[float] = 0.3) -> torch.Tensor:
    """``Δ = Σ_i λ_i τ_i`` (somf §3.2; SOMF's multi-task λ = 0.3)."""
    lams = _lambdas(lam, len(taus), "task_arithmetic")
    out = taus[0] * lams[0]
    for t, lam_i in zip(taus[1:], lams[1:]):
        out.add_(t, alpha=lam_i)
    return out


@register_merge("ties", trims=True, identity_when_single=True)
def ties(taus: Sequence[torch.Tensor], density: float = 0.2, lam: float = 1.0, disjoint: str = "mean",
         thresholds: Sequence[float | None] | None = None, inplace: bool = False) -> torch.Tensor:
    """TIES-merging (arXiv 2306.01708; somf §3.3): ``Δ = λ · disjoint_merge(trim(τ), elect(trim(τ)))``.

    ``thresholds`` (one per task) come from the driver for the ``global`` scope; without them each tensor is
    trimmed on its own (scope ``tensor``). ``inplace`` lets the operator consume the caller's list."""
    lam = _scalar(lam, "ties")
    if thresholds is None:
        thresholds = tensor_thresholds(taus, density)
    return ties_core(taus, thresholds, disjoint, inplace).mul_(lam)


@register_merge("dare")
def dare(taus: Sequence[torch.Tensor], drop: float = 0.2, lam: float | Sequence[float] = 0.3, seed: int = 0,
         key: str = "", inplace: bool = False) -> torch.Tensor:
    """DARE (arXiv 2311.03099; somf §3.4): ``Δ = Σ_i λ_i τ_i ⊙ 1[u_i ≥ p] / (1 − p)``, ``u_i ~ U[0, 1)`` drawn on a
    CPU ``torch.Generator`` seeded by :func:`tensor_seed` ``(seed, key, i)`` (same draws on every device)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"dare: drop rate must be in [0, 1), got {drop!r}")
    lams = _lambdas(lam, len(taus), "dare")
    out = torch.zeros_like(taus[0])
    for i, (t, lam_i) in enumerate(zip(taus, lams)):
        gen = torch.Generator().manual_seed(tensor_seed(seed, key, i))
        keep = (torch.rand(t.shape, generator=gen) >= drop).to(t.device)
        out.add_(t.mul_(keep) if inplace else t * keep, alpha=lam_i / (1.0 - drop))
    return out


@register_merge("consensus_ta")
def consensus_ta(taus: Sequence[torch.Tensor], lam: float = 0.3, k: int = 2,
                 lambda_t: float | Sequence[float] = 0.6) -> torch.Tensor:
    """Consensus Task Arithmetic (arXiv 2405.07813): ``Δ = λ · 1[Σ_t m_t ≥ k] ⊙ Σ_t τ_t``."""
    lam = _scalar(lam, "consensus_ta")
    merged = taus[0].clone()
    for t in taus[1:]:
        merged.add_(t)
    keep = consensus_mask(tall_masks(taus, merged, lambda_t), k)
    return merged.mul_(keep).mul_(lam)


@register_merge("consensus_ties", trims=True)
def consensus_ties(taus: Sequence[torch.Tensor], density: float = 0.2, lam: float = 1.0, disjoint: str = "sum",
                   k: int = 2, lambda_t: float | Sequence[float] = 0.6,
                   thresholds: Sequence[float | None] | None = None) -> torch.Tensor:
    """Consensus TIES (arXiv 2405.07813): ``Δ = λ · 1[Σ_t m_t ≥ k] ⊙ τ_TIES`` with TALL masks against the unscaled
    TIES merge ``τ_TIES`` and the untrimmed task vectors (as the TALL code). The disjoint step defaults to the
    TALL code's dis-sum (spec/merging.md §4, "use_ties"), unlike plain TIES's disjoint mean
    (``fusion.consensus_ties_disjoint``)."""
    lam = _scalar(lam, "consensus_ties")
    if thresholds is None:
        thresholds = tensor_thresholds(taus, density)
    merged = ties_core(taus, thresholds, disjoint)
    keep = consensus_mask(tall_masks(taus, merged, lambda_t), k)
    return merged.mul_(keep).mul_(lam)


# --------------------------------------------------------------------------------------------- dispatch
def _check_taus(taus: Sequence[torch.Tensor], key: str) -> None:
    if not taus:
        raise ValueError(f"{key or 'merge'}: no task vectors")
    first = taus[0]
    for i, t in enumerate(taus):
        if t.dtype != torch.float32:
            raise TypeError(f"{key or 'merge'}: task vector {i} is {t.dtype}; merges compute in float32")
        if t.shape != first.shape:
            raise ValueError(f"{key or 'merge'}: task vector {i} has shape {tuple(t.shape)} but task vector 0 has "
                             f"{tuple(first.shape)}")


def check_params(method: str, params: Mapping) -> MergeMethod:
    """The registered method, after checking that it accepts every parameter in ``params``."""
    spec = get_merge(method)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {unknown}; allowed: {', '.join(spec.params) or 'none'}")
    return spec


def merge_tensors(method: str, taus: Sequence[torch.Tensor], *, key: str = "",
                  thresholds: Sequence[float | None] | None = None, single_task_identity: bool = False,
                  inplace: bool = False, **params) -> torch.Tensor:
    """``Δ`` for one key: validate, then call the registered operator with the parameters it declares.

    ``inplace=True`` hands the caller's list to operators that can consume it (their values are overwritten and
    the list may be emptied); the result is the same. Unknown parameters are errors naming the allowed ones.
    ``thresholds`` are passed to trimming methods (global scope); ``key`` to methods that take it (DARE's
    per-tensor generator)."""
    spec = check_params(method, params)
    _check_taus(taus, key)
    if single_task_identity and spec.identity_when_single and len(taus) == 1:
        return taus[0] if inplace else taus[0].clone()
    kwargs = dict(params)
    sig = inspect.signature(spec.fn).parameters
    if "key" in sig:
        kwargs["key"] = key
    if spec.trims and thresholds is not None:
        kwargs["thresholds"] = list(thresholds)
    if "inplace" in sig:
        kwargs["inplace"] = inplace
    return spec.fn(taus if inplace and isinstance(taus, list) else list(taus), **kwargs)


def param_default(method: str, name: str):
    """The default of parameter ``name`` of ``method`` (from the operator's signature)."""
    return inspect.signature(get_merge(method).fn).parameters[name].default


def method_params(cfg, method: str) -> dict:
    """The operator parameters of ``method`` from a :class:`nlsr_lib.config.FusionConfig`."""
    common = {
        "lam": cfg.lam, "density": cfg.ties_density, "disjoint": cfg.ties_disjoint, "drop": cfg.dare_drop,
        "seed": cfg.dare_seed, "k": cfg.consensus_k, "lambda_t": cfg.consensus_lambda_t,
    }
    if method in ("ties", "consensus_ties"):
        common["lam"] = cfg.ties_lambda
    if method == "consensus_ties":
        common["disjoint"] = cfg.consensus_ties_disjoint
    return {name: common[name] for name in get_merge(method).params}
