"""``low_rank``, NLSR's own region scorer: activation-aware low-rank projection, then a magnitude mask
(spec nlsr.md §4.6, §9.10-9.11; merging.md §3.3 "ActSVD"; DESIGN §6 "low-rank scorer").

For every LoRA matrix ``W ∈ R^{o×k}`` with calibration inputs ``X ∈ R^{T×k}`` (statistic positions only), the
output activations are ``Y = X Wᵀ`` and their principal output directions are the top eigenvectors of

    ``YᵀY = W (XᵀX) Wᵀ``    (for ``A``: ``= ZᵀZ`` with ``Z = X Aᵀ``; for ``B``: ``= B (ZᵀZ) Bᵀ``).

With ``q = ⌊min(o, k) · rank_keep_ratio⌋`` and ``V ∈ R^{o×q}`` the top-q directions, the projected matrix is
``W' = V Vᵀ W`` (rank ≤ q), and the safety mask keeps the top ``⌈(1 − mask_sparsity)·n⌉`` entries of ``|W'|``
per matrix (:func:`~nlsr_lib.regions.selection.magnitude_keep_mask`). The two ratios are separate parameters,
both 0.8 by default (spec §9.11).

Design (the time target is ≤ 2 plain forwards): the only statistic is the r × r Gram ``ZᵀZ`` of each module's
``lora_A`` output, accumulated by forward hooks in one ``no_grad`` pass (:mod:`.activations`). The
eigendecomposition is exact (``torch.linalg.eigh`` in fp64) and never touches a ``d_out × d_out`` matrix: for
``B`` with ``d_out > r``, ``B = QR`` (thin QR) gives ``B Σ Bᵀ = Q (R Σ Rᵀ) Qᵀ``, so the eigenvectors are ``Q U``
with ``U`` those of the r × r matrix ``R Σ Rᵀ`` — exact, ``O(d_out r²)`` instead of ``O(d_out³)``. The reference
code's randomized SVD of ``Y`` (``torch.svd_lowrank``, niter 20) is ``svd="randomized"``, applied here to a
factor ``F`` with ``F Fᵀ = W Σ Wᵀ`` (same subspace, no activations stored), seeded explicitly.

``propagate=True`` reproduces the reference code's sequential processing (spec §4.6 step A.2): layer ``i``'s
statistics are recorded with layers ``0..i−1`` already projected.

The bases ``V`` are exposed (:func:`low_rank_subspaces`, :func:`save_subspaces`) for fusion inside the safety
subspace: :func:`project_onto` (``V Vᵀ W``) and :func:`project_out` (``W − V Vᵀ W``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .activations import ModuleStats, collect_lora_statistics, layerwise_pass
from .lora import lora_matrices, lora_modules
from .registry import register_scorer, seed_for
from .threads import single_thread

SVD_METHODS = ("exact", "randomized")


def rank_to_keep(shape: tuple[int, int], rank_keep_ratio: float) -> int:
    """``q = ⌊min(o, k) · rank_keep_ratio⌋`` (exact in decimal; spec §4.6: ⌊128·0.8⌋ = 102)."""
    if not 0.0 <= rank_keep_ratio <= 1.0:
        raise ValueError(f"rank_keep_ratio must be in [0, 1], got {rank_keep_ratio!r}")
    return math.floor(min(shape) * Fraction(repr(float(rank_keep_ratio))))


def _math_device(t: torch.Tensor) -> torch.device:
    return t.device if t.device.type == "cuda" else torch.device("cpu")


def _randomized(matrix: torch.Tensor, q: int, niter: int, seed: int, *,
                is_factor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q left singular vectors and eigenvalues by ``torch.svd_lowrank``. ``is_factor``: ``matrix`` is a factor
    ``F`` of the PSD matrix ``F Fᵀ`` (eigenvalues = squared singular values); else it is the symmetric PSD matrix
    itself (eigenvalues = its singular values, left singular vectors = eigenvectors)."""
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u[:, :q], s[:q].square() if is_factor else s[:q]


def principal_directions(gram: torch.Tensor, q: int, *, svd: str = "exact", niter: int = 20,
                         seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q eigenvectors ``V`` (o × q, fp32, orthonormal columns, descending eigenvalue) and eigenvalues of a
    symmetric PSD Gram ``YᵀY`` (o × o)."""
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd {svd!r}; allowed: {', '.join(SVD_METHODS)}")
    g = gram.to(_math_device(gram), torch.float64)
    g = (g + g.T) / 2
    if q == 0:
        return torch.zeros(g.shape[0], 0), torch.zeros(0)
    if svd == "randomized":
        vecs, vals = _randomized(g, q, niter, seed, is_factor=False)
    else:
        vals, vecs = torch.linalg.eigh(g)
        vals, vecs = vals.flip(0)[:q], vecs.flip(1)[:, :q]
    return vecs.float().cpu(), vals.float().cpu()


def output_directions(weight: torch.Tensor, input_gram: torch.Tensor, q: int, *, svd: str = "exact",
                      niter: int = 20, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q eigenvectors (o × q, fp32) and eigenvalues of ``W Σ Wᵀ``, ``W`` (o × k), ``Σ = XᵀX`` (k × k),
    without forming an o × o matrix when o > k (thin QR, module docstring)."""
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd {svd!r}; allowed: {', '.join(SVD_METHODS)}")
    dev = _math_device(input_gram)
    w = weight.to(dev, torch.float64)
    sigma = input_gram.to(dev, torch.float64)
    sigma = (sigma + sigma.T) / 2
    o, k = w.shape
    if o <= k:
        return principal_directions(w @ sigma @ w.T, q, svd=svd, niter=niter, seed=seed)
    if q == 0:
        return torch.zeros(o, 0), torch.zeros(0)
    if svd == "randomized":
        evals, evecs = torch.linalg.eigh(sigma)
        factor = w @ (evecs * evals.clamp_min(0).sqrt())  # F Fᵀ = W Σ Wᵀ
        vecs, vals = _randomized(factor, q, niter, seed, is_factor=True)
        return vecs.float().cpu(), vals.float().cpu()
    qmat, rmat = torch.linalg.qr(w)  # o × k, k × k
    small = rmat @ sigma @ rmat.T
    vals, u = torch.linalg.eigh((small + small.T) / 2)
    vals, u = vals.flip(0)[:q], u.flip(1)[:, :q]
    return (qmat @ u).float().cpu(), vals.float().cpu()


def project_onto(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``V Vᵀ W`` in fp32: the part of ``W``'s output space inside the subspace spanned by ``V``."""
    v = basis.float().to(weight.device)
    return v @ (v.T @ weight.float())


def project_out(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``W − V Vᵀ W`` in fp32: the part of ``W``'s output space orthogonal to the subspace."""
    return weight.float() - project_onto(weight, basis)


@dataclass(frozen=True)
class LowRankResult:
    """Per LoRA matrix (adapter key): the basis ``V`` (o × q), its eigenvalues (the output energy along each
    direction) and the projected matrix ``W' = V Vᵀ W`` (fp32, CPU)."""

    bases: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    projected: dict[str, torch.Tensor]


def _module_subspaces(name: str, layer: torch.nn.Module, st: ModuleStats, rank_keep_ratio: float, svd: str,
                      niter: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{key: (V, eigenvalues, W')}`` for the A and B of one module from its Gram ``ZᵀZ``."""
    (adapter,) = layer.active_adapters
    a = layer.lora_A[adapter].weight.detach()
    b = layer.lora_B[adapter].weight.detach()
    out = {}
    key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    q_a = rank_to_keep(tuple(a.shape), rank_keep_ratio)
    v_a, e_a = principal_directions(st.gram, q_a, svd=svd, niter=niter, seed=seed_for(seed, key_a))
    out[key_a] = (v_a, e_a, project_onto(a.float(), v_a).cpu())
    q_b = rank_to_keep(tuple(b.shape), rank_keep_ratio)
    v_b, e_b = output_directions(b, st.gram, q_b, svd=svd, niter=niter, seed=seed_for(seed, key_b))
    out[key_b] = (v_b, e_b, project_onto(b.float(), v_b).cpu())
    return out


def low_rank_subspaces(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                       rank_keep_ratio: float = 0.8, svd: str = "exact", niter: int = 20, seed: int = 42,
                       positions: str = "response", propagate: bool = False,
                       show_progress: bool = True) -> LowRankResult:
    """Bases, eigenvalues and projected matrices of every LoRA matrix of the (reference) PeftModel."""
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd {svd!r}; allowed: {', '.join(SVD_METHODS)}")
    layers = dict(lora_modules(model))
    results: dict[str, tuple] = {}

    def solve(stats: Mapping[str, ModuleStats]) -> None:
        with single_thread():
            for name, st in stats.items():
                if st.gram is None:
                    raise ValueError(f"LoRA module {name} saw no calibration tokens")
                results.update(_module_subspaces(name, layers[name], st, rank_keep_ratio, svd, niter, seed))

    if propagate:
        def on_layer(_i: int, stats: dict[str, ModuleStats]) -> bool:
            solve(stats)
            for name in stats:
                layer = layers[name]
                (adapter,) = layer.active_adapters
                for side, linears in (("A", layer.lora_A), ("B", layer.lora_B)):
                    w = linears[adapter].weight
                    w.copy_(results[f"{name}.lora_{side}.weight"][2].to(w.device, w.dtype))
            return True

        layerwise_pass(model, batches, on_layer, positions=positions, gram=True, show_progress=show_progress,
                       desc="low_rank layers")
    else:
        solve(collect_lora_statistics(model, batches, positions=positions, gram=True, show_progress=show_progress,
                                      desc="low_rank statistics"))
    order = [m.key for m in lora_matrices(model)]
    return LowRankResult(bases={k: results[k][0] for k in order}, eigenvalues={k: results[k][1] for k in order},
                         projected={k: results[k][2] for k in order})


@register_scorer("low_rank", selection="matrix",
                 options=("rank_keep_ratio", "svd", "niter", "seed", "positions", "propagate"))
def low_rank_scores(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                    rank_keep_ratio: float = 0.8, svd: str = "exact", niter: int = 20, seed: int = 42,
                    positions: str = "response", propagate: bool = False,
                    show_progress: bool = True) -> dict[str, torch.Tensor]:
    """``|W'|`` with ``W' = V Vᵀ W`` the activation-aware low-rank projection (spec §4.6 step A); the mask keeps
    the largest entries per matrix (step B)."""
    result = low_rank_subspaces(model, batches, rank_keep_ratio=rank_keep_ratio, svd=svd, niter=niter, seed=seed,
                                positions=positions, propagate=propagate, show_progress=show_progress)
    with single_thread():
        return {k: w.abs() for k, w in result.projected.items()}


def save_subspaces(path: str | Path, bases: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, object] | None = None) -> Path:
    """Write the bases (adapter key → fp32 o × q) as one safetensors file (no pickle), atomically."""
    from .masks import atomic_save_tensors

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in bases.items()}
    return atomic_save_tensors(path, tensors, metadata or {})


def load_subspaces(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .masks import read_tensors

    return read_tensors(path)
